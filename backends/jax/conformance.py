"""sdi_jax under the conformance suite: the :class:`sdi_conformance.Backend` protocol through sdi_jax's public API.

Run the suite on it with float64 enabled (the library never enables it itself)::

    JAX_ENABLE_X64=1 python -m sdi_conformance sdi_jax.conformance:backend
    JAX_ENABLE_X64=1 pytest --sdi-backend sdi_jax.conformance:backend_scan   # the lax.scan models

Every call goes through what a user calls: :class:`sdi_jax.Attributor` (jitted
for ``featurize``, ``jit=False`` for ``featurize_eager``; ``Attributor.factors``
for factor streams; :class:`sdi_core.Exact` features for the exact per-step
gradients) and plain ``jax.vmap(jax.grad(...))`` of the tied loss for the tied
gradients.  The canonical looped transformer is :mod:`sdi_jax.models`
(``forward`` or ``forward_scan``); the canonical looped MLP is defined here,
with its body marked by :func:`sdi_jax.loop_step` (or run by ``lax.scan``).
Linear kernels are stored ``(d_in, d_out)``, the JAX convention, and reported
in the canonical ``(d_out, d_in)`` frame.

Attributors (and so their compiled functions) are cached per model
architecture, selection, dtype and sketch, and shared by all handles of that
model, as a user would keep one Attributor per model: a compiled function
must take weights and batches as arguments, never bake them in, which is
exactly what ``check_jit_matches_eager`` tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import sdi_core
from sdi_core import Checkpoint, Exact, SDIError
from sdi_conformance import Capabilities, ModelSpec
from sdi_conformance.models import mlp_param_shapes

from .attributor import Attributor
from .capture import leaf_names, loop_step
from .models import LoopedConfig, params_from_numpy, params_to_numpy, per_example_loss

__all__ = ["JaxBackend", "backend", "backend_scan", "mlp_loss", "mlp_params_from_numpy"]

_MLP_LINEAR = ("embed.weight", "block.fc1.weight", "block.fc2.weight", "block.fc.weight", "head.weight")


# --------------------------------------------------------------------------- the looped MLP in JAX


def mlp_params_from_numpy(weights: Mapping[str, np.ndarray], arch: Mapping[str, Any], dtype) -> dict:
    """Canonical NumPy dict -> nested params pytree, linear kernels transposed to ``(d_in, d_out)``."""
    shapes = mlp_param_shapes(arch)
    missing = [n for n in shapes if n not in weights]
    extra = [n for n in weights if n not in shapes]
    if missing or extra:
        raise SDIError(f"looped_mlp params: missing {missing}, unexpected {extra}; pass this model's weights.")
    params: dict = {}
    for name, shape in shapes.items():
        w = np.asarray(weights[name])
        if w.shape != shape:
            raise SDIError(f"looped_mlp params: {name!r} has shape {w.shape}, expected canonical {shape}.")
        *path, leaf = name.split(".")
        node = params
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = jnp.asarray(w.T if name in _MLP_LINEAR else w, dtype=dtype)
    return params


def _mlp_params_to_numpy(tree) -> dict[str, np.ndarray]:
    """Nested params (or per-example gradients ``[B, ...]``) -> canonical dotted-name NumPy dict."""
    out = {}
    for name, leaf in zip(leaf_names(tree), jax.tree_util.tree_leaves(tree)):
        w = np.asarray(leaf)
        out[name] = np.swapaxes(w, -1, -2) if name in _MLP_LINEAR else w
    return out


def _mlp_body(block, h, body: str):
    if body == "two_layer":
        a = jnp.tanh(h @ block["fc1"]["weight"] + block["fc1"]["bias"])
        return h + a @ block["fc2"]["weight"] + block["fc2"]["bias"]
    a = jnp.tanh(h @ block["fc"]["weight"] + block["fc"]["bias"])
    return h + jnp.tanh(a @ block["fc"]["weight"] + block["fc"]["bias"])  # one weight, two uses per step


_marked_body = loop_step(_mlp_body)


def mlp_loss(params, batch, arch: Mapping[str, Any], scan: bool = False):
    """Per-example cross-entropy ``[B]`` of the canonical looped MLP (see :mod:`sdi_conformance.models`)."""
    h = jnp.asarray(batch["x"]) @ params["embed"]["weight"] + params["embed"]["bias"]
    if arch.get("seq_first"):
        h = jnp.swapaxes(h, 0, 1)  # [T, B, d]: the body runs sequence-first
    if scan:
        h, _ = jax.lax.scan(lambda h, _: (_mlp_body(params["block"], h, arch["body"]), None), h, None,
                            length=arch["tau"])
    else:
        for _ in range(arch["tau"]):
            h = _marked_body(params["block"], h, arch["body"])
    if arch.get("seq_first"):
        h = jnp.swapaxes(h, 0, 1)
    if arch.get("tokens"):
        h = h.mean(1)
    logits = h @ params["head"]["weight"] + params["head"]["bias"]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, jnp.asarray(batch["y"])[:, None], axis=-1)[:, 0]


# --------------------------------------------------------------------------- the backend


def _get(tree, name: str):
    node = tree
    for key in name.split("."):
        node = node[key]
    return node


@dataclass
class JaxHandle:
    """What :meth:`JaxBackend.build` returns."""

    spec: ModelSpec
    params: dict
    loss_fn: Callable
    to_numpy: Callable
    from_numpy: Callable
    dtype: Any
    device: Any
    key: tuple


class JaxBackend:
    """The conformance protocol implemented with :mod:`sdi_jax`.

    Args:
        scan: run the loop as ``lax.scan`` (``sdi_jax.models.forward_scan``)
            instead of a Python-unrolled loop.
    """

    def __init__(self, scan: bool = False) -> None:
        self.scan = bool(scan)
        self.name = "sdi_jax" + (" (lax.scan)" if scan else "")
        self.version = f"{sdi_core.__version__} (jax {jax.__version__})"
        platforms = tuple(dict.fromkeys(d.platform for d in jax.devices()))
        self.capabilities = Capabilities(float64=True, jit=True, devices=platforms)
        self._models: dict = {}  # model key -> (from_numpy, to_numpy, loss_fn)
        self._attributors: dict = {}  # (model key, sketch, jit) -> Attributor
        self._full_grad_fns: dict = {}  # model key -> jitted vmap(grad)

    # ------------------------------------------------------------------ build
    def build(self, spec: ModelSpec, *, dtype: str = "float64", device: str | None = None) -> JaxHandle:
        if dtype == "float64" and not jax.config.jax_enable_x64:
            raise SDIError(
                "build(dtype='float64') needs JAX's float64 mode, which sdi_jax never switches on itself: run with "
                "JAX_ENABLE_X64=1 or call jax.config.update('jax_enable_x64', True) in your test setup."
            )
        if dtype not in ("float64", "float32"):
            raise SDIError(f"build(dtype={dtype!r}): expected 'float64' or 'float32'.")
        jdtype = jnp.float64 if dtype == "float64" else jnp.float32
        dev = jax.devices(device or self.capabilities.devices[0])[0]
        key = (repr(sorted(spec.arch.items())), tuple((p.name, p.group) for p in spec.params), dtype, str(dev))
        if key not in self._models:
            if spec.family == "looped_transformer":
                config = LoopedConfig(**spec.arch["config"])
                self._models[key] = (partial(params_from_numpy, config=config, dtype=jdtype), params_to_numpy,
                                     partial(_transformer_loss, config=config, scan=self.scan))
            elif spec.family == "looped_mlp":
                self._models[key] = (partial(mlp_params_from_numpy, arch=spec.arch, dtype=jdtype),
                                     _mlp_params_to_numpy, partial(mlp_loss, arch=dict(spec.arch), scan=self.scan))
            else:
                raise SDIError(f"sdi_jax's conformance adapter cannot build family {spec.family!r}.")
        from_numpy, to_numpy, loss_fn = self._models[key]
        params = jax.device_put(from_numpy(spec.weights), dev)
        known = set(leaf_names(params))
        unknown = [p.name for p in spec.params if p.name not in known]
        if unknown:
            raise SDIError(f"Selected parameters {unknown} are not leaves of the params pytree (leaves: "
                           f"{sorted(known)[:6]} ...).")
        return JaxHandle(spec, params, loss_fn, to_numpy, from_numpy, jdtype, dev, key)

    def _attributor(self, h: JaxHandle, sketch, jit: bool) -> Attributor:
        key = (h.key, sketch, jit)
        attr = self._attributors.get(key)
        if attr is None:
            groups: dict[str, list[str]] = {}
            for p in h.spec.params:
                groups.setdefault(p.group, []).append(p.name)
            selectors = {g: (lambda params, names=tuple(names): [_get(params, n) for n in names])
                         for g, names in groups.items()}
            loop = selectors.pop("loop", None)
            attr = Attributor(h.loss_fn, loop=loop, sketch=sketch, groups=selectors or None, jit=jit, progress=False)
            self._attributors[key] = attr
        return attr

    def _batch(self, h: JaxHandle, batch: Mapping[str, np.ndarray]) -> dict:
        out = {}
        for k, v in batch.items():
            v = np.asarray(v)
            arr = jnp.asarray(v, dtype=h.dtype) if np.issubdtype(v.dtype, np.floating) else jnp.asarray(v)
            out[k] = jax.device_put(arr, h.device)
        return out

    def _checkpoints(self, h: JaxHandle, checkpoints) -> list[Checkpoint]:
        if checkpoints is None:
            return [Checkpoint(h.params, eta=1.0)]
        return [Checkpoint(jax.device_put(h.from_numpy(c.source), h.device), eta=c.eta, name=c.name, step=c.step)
                for c in checkpoints]

    # -------------------------------------------------------------- compute
    def _featurize(self, h: JaxHandle, batches, sketch, checkpoints, jit: bool):
        attr = self._attributor(h, sketch, jit)
        return attr.featurize([self._batch(h, b) for b in batches], self._checkpoints(h, checkpoints))

    def featurize(self, h: JaxHandle, batches: Sequence, sketch, checkpoints=None):
        return self._featurize(h, batches, sketch, checkpoints, jit=True)

    def featurize_eager(self, h: JaxHandle, batches: Sequence, sketch, checkpoints=None):
        return self._featurize(h, batches, sketch, checkpoints, jit=False)

    def factor_stream(self, h: JaxHandle, batch) -> list:
        _, uses = self._attributor(h, Exact(), jit=True).factors(h.params, self._batch(h, batch))
        return uses

    def per_step_gradients(self, h: JaxHandle, batch) -> dict[str, np.ndarray]:
        feats = self._featurize(h, [batch], Exact(), None, jit=True)
        out = {}
        for g in feats.layout.groups:
            arr = np.asarray(feats.data[0][g.name])
            for name, (lo, hi) in zip(g.params, g.offsets):
                out[name] = arr[:, :, lo:hi].reshape(arr.shape[0], arr.shape[1], *feats.layout.param_shapes[name])
        return out

    def full_gradients(self, h: JaxHandle, batch) -> dict[str, np.ndarray]:
        fn = self._full_grad_fns.get(h.key)
        if fn is None:
            loss_fn = h.loss_fn

            def loss_one(params, example):
                return loss_fn(params, jax.tree_util.tree_map(lambda v: v[None], example))[0]

            fn = self._full_grad_fns[h.key] = jax.jit(jax.vmap(jax.grad(loss_one), in_axes=(None, 0)))
        grads = fn(h.params, self._batch(h, batch))
        flat = h.to_numpy(grads)
        return {p.name: flat[p.name] for p in h.spec.params}

    # ----------------------------------------------------------- inspection
    def parameters(self, h: JaxHandle) -> dict[str, np.ndarray]:
        flat = h.to_numpy(h.params)
        return {p.name: flat[p.name] for p in h.spec.params if p.name in flat}

    def to_numpy(self, x) -> np.ndarray:
        return np.asarray(x)

    def side_effect_probe(self, h: JaxHandle):
        """JAX is functional: what a call could leave behind is global configuration."""
        names = ("jax_enable_x64", "jax_default_matmul_precision", "jax_disable_jit", "jax_numpy_rank_promotion",
                 "jax_default_device", "jax_debug_nans")
        return tuple((n, str(getattr(jax.config, n, None))) for n in names)


def _transformer_loss(params, batch, config: LoopedConfig, scan: bool):
    return per_example_loss(params, batch, config, scan=scan)


backend = JaxBackend()
"""The instance named by ``sdi_jax.conformance:backend`` (Python-unrolled loops)."""

backend_scan = JaxBackend(scan=True)
"""``sdi_jax.conformance:backend_scan``: the same models with the loop as ``lax.scan``."""
