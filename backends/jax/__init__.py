"""sdi_jax: the JAX backend of SDI (Step-Decomposed Influence).

Pure functions in, :class:`sdi_core.Features` out::

    import sdi_core, sdi_jax

    attr = sdi_jax.Attributor(loss_fn, loop=lambda p: p["block"], sketch=sdi_core.TensorSketch(4096, seed=0))
    train = attr.featurize(train_batches, checkpoints=[sdi_core.Checkpoint(params, eta=1e-3)])

``loss_fn(params, batch) -> [B]`` is traced to a jaxpr and the uses of the
selected leaves are found there (:mod:`sdi_jax.capture`); nothing is
rewritten by hand and ``jax.config`` is never touched.  The canonical looped
transformer lives in :mod:`sdi_jax.models`, the exact untied ``vmap(grad)``
baseline in :mod:`sdi_jax.baseline`.

Submodules are imported on first attribute access, so ``import sdi_jax``
(and the application's ``sdi_jax.app`` entry point) loads no JAX until used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Attributor": "attributor",
    "named_leaves": "attributor",
    "CapturePlan": "capture",
    "leaf_names": "capture",
    "loop_step": "capture",
    "untied_baseline": "baseline",
    "exact_features": "baseline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'sdi_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
