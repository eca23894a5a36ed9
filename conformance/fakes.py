"""Deliberately broken backends: each has one realistic bug and must fail the check meant for it.

They prove that every check can fail (a check that cannot fail is a defect).
Each derives from the NumPy reference backend and has a ``broken`` switch:
``Fake(broken=True)`` has the bug, ``Fake(broken=False)`` is the fixed
version and must pass.  :data:`FAKES` maps each fake to the checks it is
meant to fail; the meta-tests (``tests/test_conformance_meta.py``) run them,
and ``python -m sdi_conformance sdi_conformance.fakes:StepsReversed`` shows
what a failure report looks like.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Mapping

import numpy as np

from sdi_core import CheckpointInfo, Features, SketchPlan

from .models import get_model
from .numpy_backend import NumpyBackend, NumpyModel
from .protocol import Capabilities

__all__ = ["FAKES"]


class _Fake(NumpyBackend):
    """A NumPy reference backend with one bug, switched on by ``broken``."""

    meant_for: tuple[str, ...] = ()

    def __init__(self, broken: bool = True):
        self.broken = broken
        self.name = f"fake:{type(self).__name__}{'' if broken else ' (fixed)'}"


def _is_loop(model: NumpyModel, param: str) -> bool:
    return any(p.name == param and p.group == "loop" for p in model.spec.params)


class StepsReversed(_Fake):
    """Labels loop steps backwards (``s -> tau-1-s``): the step index came from backward-callback order."""

    meant_for = ("check_factor_stream",)

    def _uses(self, model, batch, weights=None):
        uses = super()._uses(model, batch, weights)
        if self.broken:
            tau = model.spec.tau
            for u in uses:
                if _is_loop(model, u.param):
                    u.step = tau - 1 - u.step
        return uses


class BackwardOrder(_Fake):
    """Returns the factor stream in backward (callback) order, with the right step labels."""

    meant_for = ("check_factor_stream",)

    def factor_stream(self, model, batch):
        uses = super().factor_stream(model, batch)
        return uses[::-1] if self.broken else uses


class ActivationWrongStep(_Fake):
    """Pairs each loop step's grad-output with the activation of the next step (a stack popped off by one)."""

    meant_for = ("check_factor_stream",)

    def _uses(self, model, batch, weights=None):
        uses = super()._uses(model, batch, weights)
        if self.broken:
            tau = model.spec.tau
            table = {}
            for u in uses:
                table.setdefault((u.param, u.step), []).append(u.activation)
            counters: dict = {}
            for u in uses:
                if _is_loop(model, u.param) and u.kind == "linear":
                    occ = counters.get((u.param, u.step), 0)
                    counters[(u.param, u.step)] = occ + 1
                    u.activation = table[(u.param, (u.step + 1) % tau)][occ]
        return uses


class _FeatureOnly(_Fake):
    """Helper: the bug only affects the uses that reach featurize."""

    _in_featurize = False

    def featurize(self, model, batches, sketch, checkpoints=None):
        self._in_featurize = True
        try:
            return super().featurize(model, batches, sketch, checkpoints)
        finally:
            self._in_featurize = False


class BiasDropped(_FeatureOnly):
    """Drops the loop-body bias uses from the features (a capture that only understands matmuls)."""

    meant_for = ("check_tracin_conservation", "check_sketched_features")

    def _uses(self, model, batch, weights=None):
        uses = super()._uses(model, batch, weights)
        if self.broken and self._in_featurize:
            uses = [u for u in uses if not (_is_loop(model, u.param) and u.kind == "bias")]
        return uses


class PerStepLumped(_Fake):
    """Puts the whole tied gradient in the last step: sums are right, the decomposition is not."""

    meant_for = ("check_per_step_gradients",)

    def per_step_gradients(self, model, batch):
        grads = super().per_step_gradients(model, batch)
        if self.broken:
            for name, g in grads.items():
                total = g.sum(axis=1)
                g[:] = 0.0
                g[:, -1] = total
        return grads


class Downcast(_Fake):
    """Computes the factors in float32 and returns them as float64 (silent precision loss)."""

    meant_for = ("check_float64",)

    def _uses(self, model, batch, weights=None):
        uses = super()._uses(model, batch, weights)
        if self.broken:
            for u in uses:
                if u.grad_output is not None:
                    u.grad_output = u.grad_output.astype(np.float32).astype(u.grad_output.dtype)
                if u.activation is not None and u.kind != "embedding":
                    u.activation = u.activation.astype(np.float32).astype(u.activation.dtype)
        return uses


class Float32Features(_Fake):
    """Returns float32 features from a float64 model (an accumulator created in the default dtype)."""

    meant_for = ("check_float64",)

    def featurize(self, model, batches, sketch, checkpoints=None):
        feats = super().featurize(model, batches, sketch, checkpoints)
        if self.broken:
            feats = dataclasses.replace(
                feats, data=[{g: a.astype(np.float32) for g, a in block.items()} for block in feats.data]
            )
        return feats


class HookLeftBehind(_Fake):
    """Removes its capture hook on success but not when the featurisation raises."""

    meant_for = ("check_no_side_effects",)

    def featurize(self, model, batches, sketch, checkpoints=None):
        if not self.broken:
            return super().featurize(model, batches, sketch, checkpoints)
        model.hooks.append("tensor-hook")
        out = super().featurize(model, batches, sketch, checkpoints)  # raises on NaN: the hook stays
        model.hooks.remove("tensor-hook")
        return out


class StateMutated(_Fake):
    """Loads each checkpoint into the model and never restores the original weights."""

    meant_for = ("check_no_side_effects",)

    def featurize(self, model, batches, sketch, checkpoints=None):
        if self.broken and checkpoints:
            for ck in checkpoints:
                for k, w in ck.source.items():
                    if k in model.weights and np.shape(w) == model.weights[k].shape:
                        model.weights[k][...] = w
        return super().featurize(model, batches, sketch, checkpoints)


class GlobalStateChanged(_Fake):
    """Silences NumPy floating-point errors globally (``np.seterr``) and leaves them silenced."""

    meant_for = ("check_no_side_effects",)

    def featurize(self, model, batches, sketch, checkpoints=None):
        if self.broken:
            np.seterr(all="ignore")
        return super().featurize(model, batches, sketch, checkpoints)


class BatchMeanLoss(_Fake):
    """Differentiates the batch-mean loss: every grad-output is divided by B (rows not independent)."""

    meant_for = ("check_batch_split_invariance",)

    def _uses(self, model, batch, weights=None):
        uses = super()._uses(model, batch, weights)
        if self.broken:
            b = int(np.asarray(next(iter(batch.values()))).shape[0])
            for u in uses:
                u.grad_output = u.grad_output / b
        return uses


class AccumulatorNotReset(_Fake):
    """Keeps a feature accumulator across calls: the second call returns the sum of both."""

    meant_for = ("check_repeat_calls_identical",)

    def featurize(self, model, batches, sketch, checkpoints=None):
        feats = super().featurize(model, batches, sketch, checkpoints)
        if not self.broken:
            return feats
        acc = getattr(model, "_acc", None)
        key = (repr(sketch.fingerprint()), feats.n_examples)
        if acc is None:
            acc = model._acc = {}
        if key in acc:
            data = [{g: a + acc[key][k][g] for g, a in block.items()} for k, block in enumerate(feats.data)]
            feats = dataclasses.replace(feats, data=data)
        acc[key] = feats.data
        return feats


class TransposedParameters(_Fake):
    """Reports weights in the framework's storage layout ``(d_in, d_out)`` instead of the canonical one."""

    meant_for = ("check_parameters_roundtrip",)

    def parameters(self, model):
        params = super().parameters(model)
        if self.broken:
            params = {k: (w.T if w.ndim == 2 and "emb" not in k else w) for k, w in params.items()}
        return params


class JitStaleCache(_Fake):
    """A compiled ``featurize`` that closes over the first call's weights and batch instead of taking them as arguments."""

    meant_for = ("check_jit_matches_eager",)

    def __init__(self, broken: bool = True):
        super().__init__(broken)
        self.capabilities = dataclasses.replace(NumpyBackend.capabilities, jit=True)
        self._compiled: dict = {}

    def featurize_eager(self, model, batches, sketch, checkpoints=None):
        return NumpyBackend.featurize(self, model, batches, sketch, checkpoints)

    def featurize(self, model, batches, sketch, checkpoints=None):
        shapes = tuple(tuple((k, np.shape(v)) for k, v in sorted(b.items())) for b in batches)
        key = (id(model), repr(sketch.fingerprint()), shapes, len(checkpoints or ()))
        if key not in self._compiled:
            # "Trace": the broken version bakes the first inputs into the compiled function.
            first = (batches, checkpoints)
            self._compiled[key] = (
                (lambda b, c: self.featurize_eager(model, first[0], sketch, first[1])) if self.broken
                else (lambda b, c: self.featurize_eager(model, b, sketch, c))
            )
        feats = self._compiled[key](batches, checkpoints)
        infos = self.featurize_eager(model, batches[:1], sketch, checkpoints).checkpoints
        return dataclasses.replace(feats, checkpoints=infos)


class DevicesDisagree(_Fake):
    """Declares a second device on which the factors are rounded to float32 (like TF32 matmuls on a GPU)."""

    meant_for = ("check_devices_agree",)

    def __init__(self, broken: bool = True):
        super().__init__(broken)
        self.capabilities = dataclasses.replace(NumpyBackend.capabilities, devices=("cpu", "cpu:1"))

    def build(self, spec, *, dtype="float64", device=None):
        model = super().build(spec, dtype=dtype, device=device)
        model.device = device or "cpu"
        return model

    def _uses(self, model, batch, weights=None):
        uses = super()._uses(model, batch, weights)
        if self.broken and getattr(model, "device", "cpu") == "cpu:1":
            for u in uses:
                u.grad_output = u.grad_output.astype(np.float32).astype(np.float64)
        return uses


class AcceptsBadCheckpoint(_Fake):
    """Loads checkpoints leniently: missing entries keep the model's weights, extra and misshapen ones are ignored."""

    meant_for = ("check_bad_checkpoint_rejected",)

    def _check_weights(self, spec, weights: Mapping):
        if not self.broken:
            return super()._check_weights(spec, weights)
        out = {}
        for k, w in spec.weights.items():
            cand = weights.get(k)
            out[k] = np.array(cand if cand is not None and np.shape(cand) == np.shape(w) else w, copy=True)
        return out


class NaNsZeroed(_Fake):
    """Replaces NaN/inf factors with zeros (``nan_to_num``) instead of reporting them."""

    meant_for = ("check_nonfinite_rejected",)

    def _uses(self, model, batch, weights=None):
        uses = super()._uses(model, batch, weights)
        if self.broken:
            for u in uses:
                u.grad_output = np.nan_to_num(u.grad_output, nan=0.0, posinf=0.0, neginf=0.0)
                if u.activation is not None and u.kind != "embedding":
                    u.activation = np.nan_to_num(u.activation, nan=0.0, posinf=0.0, neginf=0.0)
        return uses


class LocalCheckpointIds(_Fake):
    """Names unnamed checkpoints by a hash of its own (the weights in storage layout), not sdi_core.checkpoint_id."""

    meant_for = ("check_checkpoint_ids_are_canonical",)

    def featurize(self, model, batches, sketch, checkpoints=None):
        feats = super().featurize(model, batches, sketch, checkpoints)
        if not self.broken:
            return feats
        sources = [model.weights] if checkpoints is None else [c.source for c in checkpoints]
        infos = tuple(info if (checkpoints is not None and checkpoints[k].name) else
                      dataclasses.replace(info, id=hashlib.sha256(b"".join(np.asarray(w[n]).tobytes() for n in sorted(w)))
                              .hexdigest()[:16])
                      for k, (info, w) in enumerate(zip(feats.checkpoints, sources)))
        return dataclasses.replace(feats, checkpoints=infos)


class IgnoresSelection(_Fake):
    """Silently skips selected parameters that are unused or unknown (zero features for them)."""

    meant_for = ("check_bad_selection_rejected",)

    def _check_selection(self, spec, uses):
        if not self.broken:
            super()._check_selection(spec, uses)


class SketchNotRecorded(_Fake):
    """Records only the sketch kind in the layout, so features of different seeds/dims look compatible."""

    meant_for = ("check_mismatched_sketches_rejected",)

    def featurize(self, model, batches, sketch, checkpoints=None):
        feats = super().featurize(model, batches, sketch, checkpoints)
        if self.broken:
            layout = dataclasses.replace(feats.layout, sketch={"kind": dict(feats.layout.sketch)["kind"]})
            feats = dataclasses.replace(feats, layout=layout)
        return feats


class CheckpointIdsByPosition(_Fake):
    """Names checkpoints by position (``checkpoint-0``, ...) and ignores their names and weights."""

    meant_for = ("check_mismatched_checkpoints_rejected",)

    def featurize(self, model, batches, sketch, checkpoints=None):
        feats = super().featurize(model, batches, sketch, checkpoints)
        if self.broken:
            infos = tuple(CheckpointInfo(f"checkpoint-{k}", c.eta, c.step) for k, c in enumerate(feats.checkpoints))
            feats = dataclasses.replace(feats, checkpoints=infos)
        return feats


class SelectionIgnoredInLayout(_Fake):
    """Lays out features for every parameter of the model, whatever the selection (zeros for the unselected)."""

    meant_for = ("check_mismatched_selection_rejected",)

    def featurize(self, model, batches, sketch, checkpoints=None):
        feats = super().featurize(model, batches, sketch, checkpoints)
        full = get_model(model.spec.name)
        if not self.broken or len(full.params) == len(model.spec.params):
            return feats
        plan = SketchPlan(sketch, full.params)
        data = []
        for block in feats.data:
            out = {}
            for g in plan.layout.groups:
                have = feats.layout.group(g.name)
                n, s = block[g.name].shape[:2]
                arr = np.zeros((n, s, g.width))
                for name, (lo, hi) in zip(g.params, g.offsets):
                    if name in have.params:
                        a, b = have.offsets[have.params.index(name)]
                        arr[:, :, lo:hi] = block[g.name][:, :, a:b]
                out[g.name] = arr
            data.append(out)
        return Features(data, plan.layout, feats.checkpoints, feats.steps, feats.example_ids)


class BatchAxisBySize(_Fake):
    """Finds the example axis from sizes: a sequence-first activation ``[T, B, d]`` has no leading axis of size
    B, so it refuses when B != T; when B == T it takes the token axis for the example axis and credits every
    token's factors to the wrong example, silently (what sdi_torch did before the example axis was tracked)."""

    meant_for = ("check_sequence_first_body",)

    def _uses(self, model, batch, weights=None):
        uses = super()._uses(model, batch, weights)
        if not (self.broken and model.spec.arch.get("seq_first")):
            return uses
        b, t = np.asarray(batch["x"]).shape[:2]
        for u in uses:
            if u.param.startswith("block.") or u.param.startswith("embed."):
                if b != t:
                    raise ValueError(f"activation of shape {(t, b) + u.grad_output.shape[2:]} has no leading "
                                     f"batch axis of size {b}")
                u.grad_output = np.swapaxes(u.grad_output, 0, 1)  # read [T, B, d] as [B, T, d]
                if u.activation is not None:
                    u.activation = np.swapaxes(u.activation, 0, 1)
        return uses


FAKES: dict[str, type[_Fake]] = {
    cls.__name__: cls
    for cls in (
        StepsReversed, BackwardOrder, ActivationWrongStep, BiasDropped, PerStepLumped, Downcast, Float32Features,
        HookLeftBehind, StateMutated, GlobalStateChanged, BatchMeanLoss, AccumulatorNotReset, TransposedParameters,
        JitStaleCache, DevicesDisagree, AcceptsBadCheckpoint, NaNsZeroed, IgnoresSelection, LocalCheckpointIds,
        SketchNotRecorded,
        CheckpointIdsByPosition, SelectionIgnoredInLayout, BatchAxisBySize,
    )
}  # fmt: skip
"""Fake name -> class; ``cls.meant_for`` names the checks it must fail."""
