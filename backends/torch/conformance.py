"""sdi_torch under the conformance suite: the :class:`sdi_conformance.Backend` protocol through sdi_torch's public API.

Run the suite on it with ``python -m sdi_conformance sdi_torch.conformance:backend``
or ``pytest --sdi-backend sdi_torch.conformance:backend``.

Every call goes through what a user calls: :class:`sdi_torch.Attributor` for
features (with ``loop=model.block`` and the other groups as ``groups=``),
:func:`sdi_torch.capture_factors` for factor streams,
:func:`sdi_torch.untied_gradients` (the untied ``torch.func`` baseline) for
per-step gradients, and plain ``torch.func.vmap(grad)`` of the tied model for
the tied gradients.  The canonical looped transformer is
:class:`sdi_torch.models.LoopedGPT`; the canonical looped MLP is defined here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import sdi_core
from sdi_core import Checkpoint, Exact, SDIError
from sdi_conformance import Capabilities, ModelSpec

from .attributor import Attributor
from .baseline import untied_gradients
from .capture import capture_factors
from .models import LoopedConfig, LoopedGPT, per_example_loss

__all__ = ["LoopedMLP", "TorchBackend", "backend", "backend_untied"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class _MLPBody(nn.Module):
    """One loop step of the canonical looped MLP (see :mod:`sdi_conformance.models`)."""

    def __init__(self, d: int, d_mlp: int, body: str):
        super().__init__()
        self.body = body
        if body == "two_layer":
            self.fc1 = nn.Linear(d, d_mlp)
            self.fc2 = nn.Linear(d_mlp, d)
        elif body == "shared_twice":
            self.fc = nn.Linear(d, d)
        else:
            raise SDIError(f"looped_mlp: unknown body {body!r}.")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.body == "two_layer":
            return h + self.fc2(torch.tanh(self.fc1(h)))
        return h + torch.tanh(self.fc(torch.tanh(self.fc(h))))  # one weight, two uses per step


class LoopedMLP(nn.Module):
    """The canonical looped MLP: ``embed``, ``block`` applied ``tau`` times, ``head`` (and an unused parameter)."""

    def __init__(self, arch: Mapping[str, Any]):
        super().__init__()
        d = arch["d_hidden"]
        self.tau = int(arch["tau"])
        self.tokens = bool(arch.get("tokens"))
        self.seq_first = bool(arch.get("seq_first"))
        self.embed = nn.Linear(arch["d_in"], d)
        self.block = _MLPBody(d, arch["d_mlp"], arch["body"])
        self.head = nn.Linear(d, arch["n_classes"])
        if arch.get("unused_param"):
            self.unused = nn.ParameterDict({"weight": nn.Parameter(torch.zeros(d, d))})  # "unused.weight"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        if self.seq_first:
            h = h.transpose(0, 1)  # [T, B, d]: the body runs sequence-first
        for _ in range(self.tau):
            h = self.block(h)
        if self.seq_first:
            h = h.transpose(0, 1)
        return self.head(h.mean(1) if self.tokens else h)


def mlp_loss(model: LoopedMLP, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-example cross-entropy ``[B]``."""
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def _transformer_loss(model: LoopedGPT, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return per_example_loss(model, batch)


@dataclass
class TorchHandle:
    """What :meth:`TorchBackend.build` returns."""

    spec: ModelSpec
    model: nn.Module
    loss_fn: Callable
    loop: Any
    groups: dict[str, list[str]]
    dtype: torch.dtype
    device: torch.device


class _LossOf(nn.Module):
    """``loss_fn(model, batch)`` as a module, so ``torch.func.functional_call`` can swap the weights."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


class TorchBackend:
    """The conformance protocol implemented with :mod:`sdi_torch`.

    Args:
        per_step: where :meth:`per_step_gradients` comes from: ``"capture"``
            (the Attributor with :class:`sdi_core.Exact`, fast) or ``"untied"``
            (:func:`sdi_torch.untied_gradients`, the ``torch.func`` baseline
            that shares no code with the capture; slow).
    """

    name = "sdi_torch"

    def __init__(self, per_step: str = "capture") -> None:
        if per_step not in ("capture", "untied"):
            raise SDIError(f"TorchBackend(per_step={per_step!r}): expected 'capture' or 'untied'.")
        self.per_step = per_step
        if per_step == "untied":
            self.name = "sdi_torch (untied per-step gradients)"
        self.version = f"{sdi_core.__version__} (torch {torch.__version__})"
        devices = ("cpu",) + (("cuda",) if torch.cuda.is_available() else ())
        self.capabilities = Capabilities(float64=True, jit=False, devices=devices)

    # ------------------------------------------------------------------ build
    def build(self, spec: ModelSpec, *, dtype: str = "float64", device: str | None = None) -> TorchHandle:
        if dtype not in _DTYPES:
            raise SDIError(f"build(dtype={dtype!r}): expected one of {list(_DTYPES)}.")
        dev = torch.device(device or self.capabilities.devices[0])
        tdtype = _DTYPES[dtype]
        if spec.family == "looped_transformer":
            model = LoopedGPT.from_numpy(LoopedConfig(**spec.arch["config"]), spec.weights, dtype=tdtype)
            loss_fn = _transformer_loss
        elif spec.family == "looped_mlp":
            model = LoopedMLP(spec.arch).to(tdtype)
            model.load_state_dict(self._state(spec.weights, tdtype, torch.device("cpu")), strict=True)
            loss_fn = mlp_loss
        else:
            raise SDIError(f"sdi_torch's conformance adapter cannot build family {spec.family!r}.")
        model = model.to(dev).eval()
        loop_names = [p.name for p in spec.params if p.group == "loop"]
        block_names = [f"block.{n}" for n, _ in model.block.named_parameters()]
        # A step is one call of the body module when the whole body is selected; a
        # partial selection is given by names (steps counted by uses).
        loop = model.block if sorted(loop_names) == sorted(block_names) else loop_names
        groups: dict[str, list[str]] = {}
        for p in spec.params:
            if p.group != "loop":
                groups.setdefault(p.group, []).append(p.name)
        return TorchHandle(spec, model, loss_fn, loop, groups, tdtype, dev)

    @staticmethod
    def _state(weights: Mapping[str, np.ndarray], dtype: torch.dtype, device: torch.device) -> dict:
        """A canonical NumPy dict as a state_dict (names and shapes kept as given, so bad ones reach sdi_torch)."""
        return {k: torch.as_tensor(np.asarray(v), dtype=dtype, device=device) for k, v in weights.items()}

    def _batch(self, h: TorchHandle, batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in batch.items():
            v = np.asarray(v)
            t = torch.as_tensor(v, device=h.device)
            out[k] = t.to(h.dtype) if np.issubdtype(v.dtype, np.floating) else t
        return out

    def _checkpoints(self, h: TorchHandle, checkpoints) -> list[Checkpoint] | None:
        if checkpoints is None:
            return None
        return [Checkpoint(self._state(c.source, h.dtype, h.device), eta=c.eta, name=c.name, step=c.step)
                for c in checkpoints]

    def _attributor(self, h: TorchHandle, sketch) -> Attributor:
        return Attributor(h.model, loop=h.loop, loss_fn=h.loss_fn, sketch=sketch, groups=h.groups or None,
                          progress=False)

    # -------------------------------------------------------------- compute
    def factor_stream(self, h: TorchHandle, batch) -> list:
        _, uses, _ = capture_factors(h.model, h.loop, h.loss_fn, self._batch(h, batch), groups=h.groups or None)
        return uses

    def featurize(self, h: TorchHandle, batches: Sequence, sketch, checkpoints=None):
        attr = self._attributor(h, sketch)
        return attr.featurize([self._batch(h, b) for b in batches], checkpoints=self._checkpoints(h, checkpoints))

    def per_step_gradients(self, h: TorchHandle, batch) -> dict[str, torch.Tensor]:
        tb = self._batch(h, batch)
        if self.per_step == "untied" and isinstance(h.loop, nn.Module):
            grads, _ = untied_gradients(h.model, h.loop, h.loss_fn, tb, groups=h.groups or None)
            return {p.name: grads[p.name] for p in h.spec.params}
        # The exact per-step gradients are the Exact() features, reshaped per parameter.
        feats = self._attributor(h, Exact()).featurize([tb])
        out = {}
        for g in feats.layout.groups:
            arr = feats.data[0][g.name]
            for name, (lo, hi) in zip(g.params, g.offsets):
                out[name] = arr[:, :, lo:hi].reshape(arr.shape[0], arr.shape[1], *feats.layout.param_shapes[name])
        return out

    def full_gradients(self, h: TorchHandle, batch) -> dict[str, torch.Tensor]:
        wrapper = _LossOf(h.model, h.loss_fn)
        params = {f"model.{n}": p.detach() for n, p in h.model.named_parameters()}

        def loss_one(params, example):
            one = {k: v.unsqueeze(0) for k, v in example.items()}
            return torch.func.functional_call(wrapper, params, (one,))[0]

        grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0))(params, self._batch(h, batch))
        return {p.name: grads[f"model.{p.name}"] for p in h.spec.params}

    # ----------------------------------------------------------- inspection
    def parameters(self, h: TorchHandle) -> dict[str, torch.Tensor]:
        named = dict(h.model.named_parameters())
        return {p.name: named[p.name].detach() for p in h.spec.params if p.name in named}

    def to_numpy(self, x) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach()
            if x.dtype == torch.bfloat16:
                x = x.float()
            return x.cpu().numpy()
        return np.asarray(x)

    def side_effect_probe(self, h: TorchHandle):
        """Hooks on every module and parameter, modes, flags, and torch's global state."""
        modules = tuple(
            (name, m.training, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
             len(m._backward_pre_hooks))
            for name, m in h.model.named_modules()
        )
        params = tuple(
            (name, p.requires_grad, p.grad is None, len(p._backward_hooks or {}),
             len(getattr(p, "_post_accumulate_grad_hooks", None) or {}))
            for name, p in h.model.named_parameters()
        )
        from torch.nn.modules import module as module_mod

        global_hooks = tuple(len(getattr(module_mod, n, {}) or {}) for n in (
            "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
            "_global_backward_pre_hooks"))  # fmt: skip
        mode_stack = torch._C._len_torch_function_stack() if hasattr(torch._C, "_len_torch_function_stack") else -1
        return (modules, params, global_hooks, mode_stack, torch.get_default_dtype(), torch.is_grad_enabled(),
                torch.is_inference_mode_enabled(), torch.are_deterministic_algorithms_enabled(),
                torch.get_num_threads())


backend = TorchBackend()
"""The instance named by ``sdi_torch.conformance:backend``."""

backend_untied = TorchBackend(per_step="untied")
"""Per-step gradients from the untied ``torch.func`` baseline (``sdi_torch.conformance:backend_untied``)."""
