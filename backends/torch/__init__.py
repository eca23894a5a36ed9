"""sdi_torch: the PyTorch backend of SDI.

``Attributor(model, loop=..., loss_fn=..., sketch=...)`` captures the per-step
factor stream of any looped ``nn.Module`` with a ``TorchFunctionMode`` and
hands it to the core's sketch engine; ``untied_baseline`` computes the
same features the slow way (the loop body untied into one weight copy per
step, per-example gradients with ``torch.func``) as independent ground truth.
The reference looped transformer lives in :mod:`sdi_torch.models`.

Submodules are imported on first attribute access, so ``import sdi_torch``
stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Attributor": "attributor",
    "load_checkpoint": "attributor",
    "ModelSession": "attributor",
    "FactorCapture": "capture",
    "capture_factors": "capture",
    "resolve_selection": "selection",
    "Selection": "selection",
    "untied_baseline": "baseline",
    "untied_gradients": "baseline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'sdi_torch' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
