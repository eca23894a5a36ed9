"""The NumPy reference backend: the protocol implemented with the exact float64 references.

It passes every check (it *is* the reference), it is the worked example of
``conformance/README.md``, and the deliberately broken backends of
:mod:`sdi_conformance.fakes` derive from it.  Run the suite on it with::

    python -m sdi_conformance sdi_conformance.numpy_backend:backend

A framework backend looks the same: ``build`` turns the architecture
description and canonical weights into a framework model, the other methods
call the backend's public API and convert what it returns.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

import sdi_core
from sdi_core import Checkpoint, CheckpointInfo, Features, SDIError, SketchEngine, SketchPlan, checkpoint_id, driver

from .models import ModelSpec
from .protocol import Capabilities

__all__ = ["NumpyBackend", "NumpyModel", "backend"]


class NumpyModel:
    """What :meth:`NumpyBackend.build` returns: the spec, the current weights and some mutable state.

    ``hooks`` and ``training`` mirror what a framework model carries (hooks
    installed during a call, a train/eval flag), so that the broken backends
    in :mod:`sdi_conformance.fakes` can leave them behind.
    """

    def __init__(self, spec: ModelSpec, weights: dict[str, np.ndarray], dtype: np.dtype):
        self.spec = spec
        self.weights = weights
        self.dtype = dtype
        self.hooks: list[str] = []
        self.training = False


class NumpyBackend:
    """Implements :class:`sdi_conformance.Backend` with :mod:`sdi_core.reference` (float64, eager)."""

    name = "numpy-reference"
    version = sdi_core.__version__
    capabilities = Capabilities(float64=True, jit=False, devices=("cpu",))

    # ------------------------------------------------------------------ build
    def build(self, spec: ModelSpec, *, dtype: str = "float64", device: str | None = None) -> NumpyModel:
        if dtype not in ("float64", "float32"):
            raise SDIError(f"build(dtype={dtype!r}): expected 'float64' or 'float32'.")
        if device not in (None, *self.capabilities.devices):
            raise SDIError(f"build(device={device!r}): this backend runs on {list(self.capabilities.devices)}.")
        weights = self._check_weights(spec, spec.weights)
        dt = np.dtype(dtype)
        return NumpyModel(spec, {k: w.astype(dt) for k, w in weights.items()}, dt)

    def _check_weights(self, spec: ModelSpec, weights: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Validate a weight dict against the spec; an error names the offending parameter."""
        expected = {k: np.shape(w) for k, w in spec.weights.items()}
        missing = [k for k in expected if k not in weights]
        extra = [k for k in weights if k not in expected]
        if missing or extra:
            raise SDIError(
                f"Weights do not match model {spec.name!r}: missing {missing}, unexpected {extra}. "
                "Pass a checkpoint saved from this model (same parameter names)."
            )
        out = {}
        for k, shape in expected.items():
            w = np.array(weights[k], copy=True)
            if w.shape != shape:
                raise SDIError(f"Weight {k!r} has shape {w.shape}; model {spec.name!r} expects {shape}.")
            out[k] = w
        return out

    def _check_selection(self, spec: ModelSpec, uses) -> None:
        known = set(spec.weights)
        unknown = [p.name for p in spec.params if p.name not in known]
        if unknown:
            raise SDIError(f"Selected parameters {unknown} are not parameters of model {spec.name!r}.")
        # A group none of whose parameters is used is a selection mistake.  One unused
        # parameter in a used group is not: its gradient is exactly zero, and so are its features.
        used = {u.param for u in uses}
        for group in dict.fromkeys(p.group for p in spec.params):
            names = [p.name for p in spec.params if p.group == group]
            if not any(n in used for n in names):
                raise SDIError(
                    f"None of the parameters of group {group!r} ({names}) is used in the forward pass of model "
                    f"{spec.name!r}; deselect them or fix the selection."
                )

    # -------------------------------------------------------------- compute
    def _uses(self, model: NumpyModel, batch, weights=None):
        """Reference factors at ``weights`` (default: the model's), in the model's dtype."""
        weights = model.weights if weights is None else weights
        with np.errstate(invalid="ignore", over="ignore"):  # NaN weights: the sketcher reports them by name
            _, uses = model.spec.reference_factors(batch, {k: np.asarray(w, np.float64) for k, w in weights.items()})
        self._check_selection(model.spec, uses)
        for u in uses:
            if u.grad_output is not None:
                u.grad_output = u.grad_output.astype(model.dtype)
            if u.activation is not None and u.kind != "embedding":
                u.activation = u.activation.astype(model.dtype)
        return uses

    def factor_stream(self, model: NumpyModel, batch) -> list:
        return self._uses(model, batch)

    def featurize(
        self,
        model: NumpyModel,
        batches: Sequence[Mapping[str, np.ndarray]],
        sketch,
        checkpoints: Sequence[Checkpoint] | None = None,
    ) -> Features:
        batches = list(batches)
        if not batches:
            raise SDIError("featurize: no batches given; pass a non-empty list of batches.")
        return driver.featurize(_Session(self, model, SketchPlan(sketch, model.spec.params)), batches, checkpoints,
                                progress=False)

    def per_step_gradients(self, model: NumpyModel, batch) -> dict[str, np.ndarray]:
        uses = self._uses(model, batch)
        b = int(np.asarray(next(iter(batch.values()))).shape[0])
        from sdi_core.reference.looped_transformer import factors_to_gradients

        grads = factors_to_gradients(uses, model.spec.params, b, dict(model.spec.steps))
        return {k: g.astype(model.dtype) for k, g in grads.items()}

    def full_gradients(self, model: NumpyModel, batch) -> dict[str, np.ndarray]:
        return {k: g.sum(axis=1) for k, g in self.per_step_gradients(model, batch).items()}

    # ----------------------------------------------------------- inspection
    def parameters(self, model: NumpyModel) -> dict[str, np.ndarray]:
        return {p.name: model.weights[p.name] for p in model.spec.params}

    def to_numpy(self, x) -> np.ndarray:
        return np.asarray(x)

    def side_effect_probe(self, model: NumpyModel):
        return (tuple(model.hooks), model.training)


class _Session:
    """The driver's session (:mod:`sdi_core.driver`): what a framework backend installs and restores per call."""

    def __init__(self, backend: NumpyBackend, model: NumpyModel, plan: SketchPlan):
        self.backend, self.model, self.plan = backend, model, plan
        self.engine = SketchEngine(plan)
        self.weights = model.weights

    def __enter__(self):
        # A framework backend installs hooks here; the reference models them so the
        # broken backends can forget to remove them.
        self.model.hooks.append("capture")
        return self

    def __exit__(self, *exc) -> None:
        self.model.hooks.remove("capture")

    def load(self, ckpt: Checkpoint | None) -> CheckpointInfo:
        if ckpt is None:  # the current weights
            self.weights = self.model.weights
            return CheckpointInfo(checkpoint_id(self.weights), 1.0, None)
        self.weights = self.backend._check_weights(self.model.spec, ckpt.source)
        return CheckpointInfo(ckpt.name if ckpt.name is not None else checkpoint_id(self.weights),
                              1.0 if ckpt.eta is None else ckpt.eta, ckpt.step)

    def run(self, batch, *, summed: bool) -> driver.BatchFeatures:
        steps = dict(self.model.spec.steps)
        n = int(np.asarray(next(iter(batch.values()))).shape[0])
        state = self.engine.init(n, steps, summed=summed)
        state = self.engine.update(state, self.backend._uses(self.model, batch, self.weights))
        return driver.BatchFeatures(self.engine.finalize(state), steps, self.plan.layout)  # raises on NaN/inf

    def meta(self) -> dict:
        return {"backend": self.backend.name, "routes": self.engine.routes()}


backend = NumpyBackend()
"""The instance named by ``sdi_conformance.numpy_backend:backend``."""
