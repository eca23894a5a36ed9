"""The checks: one ``check_<property>(backend, model)`` function per property.

Every check takes a backend (see :class:`~sdi_conformance.protocol.Backend`)
and the name of a canonical model, returns None when the property holds and
raises :class:`~sdi_conformance.compare.CheckFailure` when it does not, with
a message that says what was called, with what, what was expected and what
came back.  :func:`yield_checks` generates the checks a backend's declared
capabilities call for.

Ground truth is always the float64 NumPy reference: the reference looped
transformer's or looped MLP's factor stream (:mod:`sdi_conformance.models`),
materialised per-step gradients, :func:`sdi_core.sketch_uses` on the
reference factors for sketched features (same seed, same features), and
:func:`sdi_core.reference.exact_sdi` for trajectories.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from sdi_core import (
    Checkpoint,
    Exact,
    FactorUse,
    Features,
    ParamInfo,
    SDIError,
    SketchPlan,
    TensorSketch,
    checkpoint_id,
    influence,
    sketch_uses,
)
from sdi_core.reference import exact_sdi, use_gradient

from .compare import CheckFailure, assert_close, assert_equal_arrays, describe_array, fail
from .models import CANONICAL_MODELS, ModelSpec, get_model

__all__ = [
    "ALL_CHECKS",
    "CheckSpec",
    "check_parameters_roundtrip",
    "check_factor_stream",
    "check_per_step_gradients",
    "check_sketched_features",
    "check_tracin_conservation",
    "check_batch_split_invariance",
    "check_no_side_effects",
    "check_repeat_calls_identical",
    "check_float64",
    "check_jit_matches_eager",
    "check_devices_agree",
    "check_bad_checkpoint_rejected",
    "check_nonfinite_rejected",
    "check_bad_selection_rejected",
    "check_mismatched_sketches_rejected",
    "check_mismatched_checkpoints_rejected",
    "check_mismatched_selection_rejected",
    "yield_checks",
]

RTOL_FLOAT64 = 1e-10
RTOL_FLOAT32 = 2e-4
BATCH = 4  # examples per batch; halves of 2 for the batch-split check
SKETCH_DIM = 32  # small enough that most weights are TensorSketched, biases stored exactly
# One sketch for most checks (and few distinct sketches and batch shapes overall), so that a
# compiling backend traces each model a handful of times, not once per check.
SKETCH = TensorSketch(SKETCH_DIM, seed=1)


# --------------------------------------------------------------------------- context


@dataclass
class _Ctx:
    """What every check needs: the backend, the dtype and tolerance its capabilities imply."""

    backend: Any
    spec: ModelSpec
    dtype: str
    rtol: float
    device: str

    def call(self, text: str) -> str:
        return f"{text} on model {self.spec.describe()}, dtype {self.dtype}, device {self.device!r}"

    def build(self, spec: ModelSpec | None = None, *, dtype: str | None = None, device: str | None = None):
        spec = self.spec if spec is None else spec
        dtype = dtype or self.dtype
        device = device or self.device
        # Backends get a copy, so a backend that writes into the weights cannot corrupt the reference.
        spec_copy = _spec_copy(spec)
        return self.invoke(
            f"backend.build(spec {spec.name!r}, dtype={dtype!r}, device={device!r})",
            self.backend.build, spec_copy, dtype=dtype, device=device,
        )  # fmt: skip

    def invoke(self, text: str, fn: Callable, *args, **kwargs):
        """Call ``fn``; an unexpected exception becomes a CheckFailure naming the call."""
        try:
            return fn(*args, **kwargs)
        except CheckFailure:
            raise
        except Exception as exc:  # noqa: BLE001 - any error of the backend is a failed check
            fail(self.call(text), "a successful call", f"{type(exc).__name__}: {exc}")

    def np(self, x, what: str) -> np.ndarray:
        if x is None:
            return None
        try:
            return np.asarray(self.backend.to_numpy(x))
        except Exception as exc:  # noqa: BLE001
            fail(self.call(f"backend.to_numpy({what})"), "a NumPy array", f"{type(exc).__name__}: {exc}")

    def featurize(self, handle, batches, sketch, checkpoints=None, *, eager: bool = False) -> Features:
        method = "featurize_eager" if eager else "featurize"
        text = f"backend.{method}(handle, {_batches_text(batches)}, {_sketch_text(sketch)}, {_ckpts_text(checkpoints)})"
        feats = self.invoke(text, getattr(self.backend, method), handle, batches, sketch, checkpoints)
        if not isinstance(feats, Features):
            fail(self.call(text), "an sdi_core.Features", f"{type(feats).__name__}")
        return feats


def _make_ctx(backend, model: str, device: str | None = None) -> _Ctx:
    caps = backend.capabilities
    float64 = bool(caps.float64)
    return _Ctx(
        backend=backend,
        spec=get_model(model),
        dtype="float64" if float64 else "float32",
        rtol=RTOL_FLOAT64 if float64 else RTOL_FLOAT32,
        device=device or caps.devices[0],
    )


def _spec_copy(spec: ModelSpec) -> ModelSpec:
    import dataclasses

    return dataclasses.replace(spec, weights=spec.copy_weights())


def _batches_text(batches) -> str:
    sizes = [int(np.asarray(next(iter(b.values()))).shape[0]) for b in batches]
    return f"[{len(sizes)} batch{'es' if len(sizes) != 1 else ''} of {'+'.join(map(str, sizes))} examples]"


def _sketch_text(sketch) -> str:
    if isinstance(sketch, TensorSketch):
        return f"TensorSketch(dim={sketch.dim}, seed={sketch.seed}, route={sketch.route!r})"
    return "Exact()"


def _ckpts_text(ckpts) -> str:
    if ckpts is None:
        return "checkpoints=None"
    return "checkpoints=[" + ", ".join(f"Checkpoint(name={c.name!r}, eta={c.eta})" for c in ckpts) + "]"


def _n(batch) -> int:
    return int(np.asarray(next(iter(batch.values()))).shape[0])


def _split(batch, lo: int, hi: int) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[lo:hi] for k, v in batch.items()}


def _group_of(spec: ModelSpec) -> dict[str, str]:
    return {p.name: p.group for p in spec.params}


# --------------------------------------------------------------------------- features helpers


def _check_features_structure(ctx: _Ctx, feats: Features, plan: SketchPlan, n: int, n_ckpts: int, call: str):
    """Layout, steps, shapes, checkpoint count of what featurize returned."""
    diff = feats.layout.diff(plan.layout)
    if diff is not None:
        fail(call, "Features.layout equal to SketchPlan(sketch, spec.params).layout", diff,
             "build the layout from the sketch and the selected parameters, in the spec's order")
    want_steps = {g: int(ctx.spec.steps[g]) for g in plan.group_names}
    got_steps = {g: int(feats.steps.get(g, -1)) for g in plan.group_names}
    if got_steps != want_steps:
        fail(call, f"Features.steps == {want_steps}", f"{dict(feats.steps)}")
    if feats.summed:
        fail(call, "per-step features (summed=False)", "features summed over steps")
    if len(feats.checkpoints) != n_ckpts:
        fail(call, f"{n_ckpts} checkpoint block(s)", f"{len(feats.checkpoints)}")
    if feats.n_examples != n:
        fail(call, f"features of {n} examples", f"{feats.n_examples}")


def _features_np(ctx: _Ctx, feats: Features) -> list[dict[str, np.ndarray]]:
    return [{g: ctx.np(a, f"features[{k}][{g!r}]") for g, a in block.items()} for k, block in enumerate(feats.data)]


def _compare_features(ctx: _Ctx, got: Features, want: Sequence[Mapping[str, np.ndarray]], call: str, what: str,
                      rtol: float | None = None, exact: bool = False,
                      against: str = "the float64 NumPy reference") -> None:
    got_np = _features_np(ctx, got)
    for k, block in enumerate(want):
        for g, arr in block.items():
            label = f"{what}: checkpoint {k}, group {g!r} [N, steps, D]"
            if exact:
                assert_equal_arrays(got_np[k][g], arr, call=call, what=label)
            else:
                assert_close(got_np[k][g], arr, rtol=ctx.rtol if rtol is None else rtol, call=call, what=label,
                             against=against)


def _reference_features(spec: ModelSpec, plan: SketchPlan, batches, weights_list) -> list[dict[str, np.ndarray]]:
    out = []
    for w in weights_list:
        blocks = []
        for b in batches:
            _, uses = spec.reference_factors(b, w)
            blocks.append(sketch_uses(plan, uses, _n(b), steps=dict(spec.steps)))
        out.append({g: np.concatenate([bl[g] for bl in blocks], axis=0) for g in plan.group_names})
    return out


def _checkpoints(spec: ModelSpec, etas=(0.5, 0.25), names=("ckpt-a", "ckpt-b")) -> list[Checkpoint]:
    return [Checkpoint(spec.perturbed_weights(i + 1), eta=e, name=n) for i, (e, n) in enumerate(zip(etas, names))]


# --------------------------------------------------------------------------- checks


def check_parameters_roundtrip(backend, model: str = "looped_transformer") -> None:
    """``parameters(build(spec))`` returns the spec's weights, canonical names and shapes, bit for bit.

    A backend that stores weights in another layout (JAX kernels ``(d_in, d_out)``)
    must report them in the canonical frame; float64 weights round-trip exactly.
    """
    ctx = _make_ctx(backend, model)
    handle = ctx.build()
    call = ctx.call("backend.parameters(backend.build(spec))")
    got = ctx.invoke("backend.parameters(handle)", backend.parameters, handle)
    want_names = [p.name for p in ctx.spec.params]
    if not isinstance(got, Mapping) or sorted(got) != sorted(want_names):
        keys = sorted(got) if isinstance(got, Mapping) else type(got).__name__
        fail(call, f"a dict with the selected parameters {want_names}", f"{keys}")
    for name in want_names:
        arr = ctx.np(got[name], f"parameters[{name!r}]")
        want = np.asarray(ctx.spec.weights[name]).astype(ctx.dtype)
        assert_equal_arrays(arr, want, call=call, what=f"parameter {name!r} (canonical shape {want.shape})",
                            hint="report weights in the canonical frame: linear (d_out, d_in), embedding (num, dim)")


def _uses_np(ctx: _Ctx, uses, call: str) -> list[FactorUse]:
    if not isinstance(uses, (list, tuple)):
        fail(call, "a list of sdi_core.FactorUse", type(uses).__name__)
    out = []
    for i, u in enumerate(uses):
        if not isinstance(u, FactorUse):
            fail(call, "a list of sdi_core.FactorUse", f"item {i} is a {type(u).__name__}")
        act = None if u.activation is None else ctx.np(u.activation, f"uses[{i}].activation")
        grad = None if u.grad_output is None else ctx.np(u.grad_output, f"uses[{i}].grad_output")
        out.append(FactorUse(u.param, u.step, u.kind, act, grad, u.use_index, u.row_slice, u.ignore_index))
    return out


def _with_tokens(x: np.ndarray | None, kind: str) -> np.ndarray | None:
    """Add the singleton token axis that a ``[B, d]`` (or ``[B]`` ids) factor leaves out."""
    if x is None:
        return None
    if kind == "embedding":
        return x[:, None] if x.ndim == 1 else x
    return x[:, None, :] if x.ndim == 2 else x


def _compare_streams(ctx: _Ctx, got: list[FactorUse], ref: list[FactorUse], call: str, rtol: float) -> None:
    spec = ctx.spec
    groups = _group_of(spec)
    infos = {p.name: p for p in spec.params}
    # Forward order: list order, use_index increasing when set, loop steps non-decreasing.
    idx = [u.use_index for u in got]
    if all(i >= 0 for i in idx) and any(b <= a for a, b in zip(idx, idx[1:])):
        pos = next(k for k, (a, b) in enumerate(zip(idx, idx[1:])) if b <= a)
        fail(call, "uses listed in forward order (use_index strictly increasing)",
             f"use_index {idx[pos]} at list position {pos} followed by {idx[pos + 1]}",
             "return uses sorted by their forward-time index, not in backward (callback) order")
    last_step = -1
    for i, u in enumerate(got):
        if u.param not in groups:
            fail(call, f"uses of the selected parameters {list(groups)}", f"use {i} of unknown parameter {u.param!r}")
        if groups[u.param] != "loop":
            if u.step != 0:
                fail(call, f"step 0 for every use of {u.param!r} (group {groups[u.param]!r} has one slot)",
                     f"use {i} at step {u.step}")
            continue
        if u.step < last_step:
            fail(call, "loop steps in forward order (non-decreasing along the stream)",
                 f"use {i} ({u.param!r}) at step {u.step} after a use at step {last_step}",
                 "assign step indices at forward time; backward hooks fire in reverse step order")
        last_step = u.step
    by_key_got: dict[tuple[str, int], list[tuple[int, FactorUse]]] = defaultdict(list)
    by_key_ref: dict[tuple[str, int], list[tuple[int, FactorUse]]] = defaultdict(list)
    for i, u in enumerate(got):
        by_key_got[(u.param, int(u.step))].append((i, u))
    for i, u in enumerate(ref):
        by_key_ref[(u.param, u.step)].append((i, u))
    missing = sorted(k for k in by_key_ref if k not in by_key_got)
    extra = sorted(k for k in by_key_got if k not in by_key_ref)
    if missing or extra:
        fail(call, f"uses at the reference's (parameter, step) pairs ({len(by_key_ref)} pairs)",
             f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected {extra[:6]}"
             f"{' ...' if len(extra) > 6 else ''}")
    ref_grads = [use_gradient(r, infos[r.param]) for r in ref]
    # Per-use gradients can be exactly zero (a key bias under softmax): tolerate rounding
    # relative to the largest per-use gradient of the stream.
    floor = 1e-3 * max(float(np.abs(gr).max()) for gr in ref_grads)
    for key, ref_list in by_key_ref.items():
        got_list = by_key_got[key]
        if len(got_list) != len(ref_list):
            fail(call, f"{len(ref_list)} use(s) of {key[0]!r} at step {key[1]} (the reference's count)",
                 f"{len(got_list)}")
        for occ, ((gi, g), (ri, r)) in enumerate(zip(got_list, ref_list)):
            label = f"use {gi} ({g.param!r}, step {g.step}, occurrence {occ} in that step, kind {g.kind!r})"
            if g.kind == r.kind:
                if r.kind == "embedding":
                    a_got, a_ref = _with_tokens(g.activation, "embedding"), _with_tokens(r.activation, "embedding")
                    if a_got is None or a_got.shape != a_ref.shape or not np.array_equal(a_got, a_ref):
                        fail(call, f"{label}: ids {describe_array(a_ref)} equal to the reference",
                             f"{describe_array(a_got)}" + ("" if a_got is None or a_got.shape != a_ref.shape
                                                            else " with different values"))
                elif r.activation is not None:
                    assert_close(_with_tokens(g.activation, g.kind), _with_tokens(r.activation, r.kind), rtol=rtol,
                                 call=call, what=f"activation of {label}")
                assert_close(_with_tokens(g.grad_output, g.kind), _with_tokens(r.grad_output, r.kind), rtol=rtol,
                             call=call, what=f"grad_output of {label}",
                             hint="grad_output is d(loss_b)/d(output) of each example's own loss (rows independent)")
            try:
                g_grad = use_gradient(g, infos[g.param])
            except Exception as exc:  # noqa: BLE001
                fail(call, f"{label}: factors that fit the FactorUse contract for shape {infos[g.param].shape}",
                     f"{type(exc).__name__}: {exc}")
            assert_close(g_grad, ref_grads[ri], rtol=rtol, call=call, floor=floor,
                         what=f"per-example gradient [B, *shape] of {label}")


def check_factor_stream(backend, model: str = "looped_transformer") -> None:
    """Factor streams equal the NumPy reference's, use for use, in forward step order.

    Uses are matched by (parameter, step, occurrence within the step).  Uses of
    the reference's kind must carry the reference's activation and grad_output
    (a ``[B, d]`` factor may stand for ``[B, 1, d]``); uses of another kind
    (e.g. an exact ``"dense"`` fallback) must give the same per-example
    gradient.  Every use's per-example gradient must match.
    """
    ctx = _make_ctx(backend, model)
    handle = ctx.build()
    batch = ctx.spec.batch(BATCH, seed=0)
    call = ctx.call(f"backend.factor_stream(handle, {_batches_text([batch])[1:-1]})")
    got = _uses_np(ctx, ctx.invoke("backend.factor_stream(handle, batch)", backend.factor_stream, handle, batch), call)
    _, ref = ctx.spec.reference_factors(batch)
    _compare_streams(ctx, got, ref, call, ctx.rtol)


def check_sequence_first_body(backend, model: str = "seq_first_mlp") -> None:
    """A sequence-first body (``[T, B, d]`` activations) gives the reference's exact features, also when the
    batch size equals the sequence length.

    A backend that reads the example axis from sizes refuses the first batch (no leading axis of size B)
    or, worse, silently credits rows to the wrong examples in the second (B == T): both fail here.
    """
    ctx = _make_ctx(backend, model)
    T = int(ctx.spec.arch["tokens"])
    plan = SketchPlan(Exact(), ctx.spec.params)
    for size in (T + 2, T):
        handle = ctx.build()
        batch = ctx.spec.batch(size, seed=3)
        call = ctx.call(f"backend.featurize(handle, [a batch of {size} examples of {T} tokens], Exact())")
        got = ctx.featurize(handle, [batch], Exact())
        _check_features_structure(ctx, got, plan, size, 1, call)
        want = _reference_features(ctx.spec, plan, [batch], [ctx.spec.weights])
        _compare_features(ctx, got, want, call, f"exact features with B {'==' if size == T else '!='} T")


def check_per_step_gradients(backend, model: str = "looped_transformer") -> None:
    """Per-step gradients equal the reference, and sum over steps to the gradient of the tied weights.

    Three comparisons: ``per_step_gradients`` against the reference's
    materialised per-step gradients; its sum over steps against the backend's
    own ``full_gradients`` (plain autodiff of the tied model); and
    ``full_gradients`` against the reference.
    """
    ctx = _make_ctx(backend, model)
    spec = ctx.spec
    handle = ctx.build()
    batch = spec.batch(BATCH, seed=0)
    call_ps = ctx.call("backend.per_step_gradients(handle, batch of 4)")
    call_full = ctx.call("backend.full_gradients(handle, batch of 4)")
    per_step = ctx.invoke("backend.per_step_gradients(handle, batch)", backend.per_step_gradients, handle, batch)
    full = ctx.invoke("backend.full_gradients(handle, batch)", backend.full_gradients, handle, batch)
    want_ps = spec.reference_per_step_gradients(batch)
    want_full = spec.reference_full_gradients(batch)
    names = [p.name for p in spec.params]
    floor = 1e-3 * max(float(np.abs(g).max()) for g in want_ps.values())  # see _compare_streams
    for got, call in ((per_step, call_ps), (full, call_full)):
        if not isinstance(got, Mapping) or sorted(got) != sorted(names):
            fail(call, f"a dict over the selected parameters {names}",
                 f"{sorted(got) if isinstance(got, Mapping) else type(got).__name__}")
    for p in spec.params:
        ps = ctx.np(per_step[p.name], f"per_step[{p.name!r}]")
        fu = ctx.np(full[p.name], f"full[{p.name!r}]")
        assert_close(ps, want_ps[p.name], rtol=ctx.rtol, call=call_ps, floor=floor,
                     what=f"per-step gradient of {p.name!r} [B, S={spec.steps[p.group]}, *{p.shape}]",
                     hint="entry [b, s] is d loss_b / d w^(s), the copy of the weight used at step s")
        if ps.shape == want_ps[p.name].shape:
            assert_close(ps.sum(axis=1), fu, rtol=ctx.rtol, call=f"{call_ps} summed over steps, vs {call_full}",
                         floor=floor,
                         what=f"sum over steps of the per-step gradients of {p.name!r}",
                         against="the backend's gradient of the tied weight (full_gradients)")
        assert_close(fu, want_full[p.name], rtol=ctx.rtol, call=call_full, floor=floor,
                     what=f"per-example gradient of the tied weight {p.name!r} [B, *{p.shape}]")


def check_sketched_features(backend, model: str = "looped_transformer") -> None:
    """Sketched features equal the sketch of the reference factors (same seed, same features).

    Three sketches: TensorSketch by FFT (seed 2), TensorSketch with the
    default route (seed 1; exact-then-hash at these sizes) and Exact.  The layout, steps and checkpoint bookkeeping must match
    :class:`sdi_core.SketchPlan`; the values must match
    :func:`sdi_core.sketch_uses` applied to the NumPy reference's factors.
    """
    ctx = _make_ctx(backend, model)
    spec = ctx.spec
    handle = ctx.build()
    batch = spec.batch(BATCH, seed=0)
    for sketch in (TensorSketch(SKETCH_DIM, seed=2, route="fft"), SKETCH, Exact()):
        plan = SketchPlan(sketch, spec.params)
        feats = ctx.featurize(handle, [batch], sketch)
        call = ctx.call(f"backend.featurize(handle, [batch of {BATCH}], {_sketch_text(sketch)})")
        _check_features_structure(ctx, feats, plan, BATCH, 1, call)
        if abs(feats.checkpoints[0].eta - 1.0) > 0:
            fail(call, "eta 1.0 for checkpoints=None (current weights)", f"{feats.checkpoints[0].eta}")
        want = _reference_features(spec, plan, [batch], [spec.weights])
        _compare_features(ctx, feats, want, call, "features")


def check_tracin_conservation(backend, model: str = "looped_transformer") -> None:
    """Trajectories sum over query steps to TracIn of the tied gradients, at two checkpoints.

    With ``Exact()`` features of a train batch (4 examples) and a query batch
    (3 examples) at two checkpoints (etas 0.5 and 0.25): the trajectory equals
    the brute-force reference (:func:`sdi_core.reference.exact_sdi`), and
    ``trajectory.sum(-1)`` and ``tracin`` equal ``sum_k eta_k <grad l_i, grad l_j>``
    with the reference's tied per-example gradients.  With a TensorSketch the
    sketched trajectory sums to the sketched TracIn.
    """
    ctx = _make_ctx(backend, model)
    spec = ctx.spec
    handle = ctx.build()
    train_b, query_b = spec.batch(BATCH, seed=1), spec.batch(BATCH // 2, seed=2)
    ckpts = _checkpoints(spec)
    etas = [c.eta for c in ckpts]
    tr = ctx.featurize(handle, [train_b], Exact(), ckpts)
    q = ctx.featurize(handle, [query_b], Exact(), ckpts)
    call = ctx.call(f"sdi_core.influence(backend.featurize(handle, [train batch of {BATCH}], Exact(), "
                    f"{_ckpts_text(ckpts)}), backend.featurize(handle, [query batch of {BATCH // 2}], ...))")
    res = ctx.invoke("sdi_core.influence(train, query)", influence, tr, q)
    traj = ctx.np(res.trajectory, "trajectory")
    tracin = ctx.np(res.tracin, "tracin")
    tr_grads = [spec.reference_per_step_gradients(train_b, c.source) for c in ckpts]
    q_grads = [spec.reference_per_step_gradients(query_b, c.source) for c in ckpts]
    groups = [g for g in ("prelude", "loop", "coda") if g in spec.steps]
    ref = exact_sdi(tr_grads, q_grads, etas, spec.params, groups)
    n_tr, n_q = BATCH, BATCH // 2
    tied = np.zeros((n_tr, n_q))
    for k, c in enumerate(ckpts):
        f_tr = spec.reference_full_gradients(train_b, c.source)
        f_q = spec.reference_full_gradients(query_b, c.source)
        for p in spec.params:
            tied += etas[k] * f_tr[p.name].reshape(n_tr, -1) @ f_q[p.name].reshape(n_q, -1).T
    assert_close(traj, ref["trajectory"], rtol=ctx.rtol, call=call,
                 what="query-step trajectory [N_train, N_query, slots] (Exact features)")
    assert_close(traj.sum(axis=-1), tied, rtol=ctx.rtol, call=call, what="trajectory summed over query slots",
                 against="TracIn of the reference's tied per-example gradients",
                 hint="a use missing from the features (a dropped bias, a skipped step) breaks conservation")
    assert_close(tracin, tied, rtol=ctx.rtol, call=call, what="TracIn [N_train, N_query]",
                 against="TracIn of the reference's tied per-example gradients")
    sketch = SKETCH
    tr_s = ctx.featurize(handle, [train_b], sketch, ckpts)
    q_s = ctx.featurize(handle, [query_b], sketch, ckpts)
    res_s = ctx.invoke("sdi_core.influence(train, query) (TensorSketch)", influence, tr_s, q_s)
    traj_s = ctx.np(res_s.trajectory, "trajectory")
    assert_close(traj_s.sum(axis=-1), ctx.np(res_s.tracin, "tracin"), rtol=ctx.rtol,
                 call=call.replace("Exact()", _sketch_text(sketch)),
                 what="sketched trajectory summed over query slots",
                 against="the sketched TracIn (conservation holds per sketch draw)")


def check_batch_split_invariance(backend, model: str = "looped_transformer") -> None:
    """Featurising a batch equals featurising its halves (as two batches of one call, and as two calls).

    Rows must be independent: a loss averaged over the batch, batch-level
    normalisation or a step whose output no example of a half reaches must
    not change any example's features.
    """
    ctx = _make_ctx(backend, model)
    spec = ctx.spec
    handle = ctx.build()
    batch = spec.batch(BATCH, seed=3)
    halves = [_split(batch, 0, BATCH // 2), _split(batch, BATCH // 2, BATCH)]
    sketch = SKETCH
    whole = ctx.featurize(handle, [batch], sketch)
    both = ctx.featurize(handle, halves, sketch)
    parts = [ctx.featurize(handle, [h], sketch) for h in halves]
    joined = ctx.invoke("Features.concat(per-half features)", Features.concat, parts)
    want = _features_np(ctx, whole)
    call_whole = ctx.call(f"backend.featurize(handle, [batch of {BATCH}], {_sketch_text(sketch)})")
    for got, how in ((both, "backend.featurize(handle, [first half, second half], ...)"),
                     (joined, "Features.concat([featurize(handle, [first half]), featurize(handle, [second half])])")):
        call = ctx.call(how) + f", compared with {call_whole}"
        if got.n_examples != BATCH:
            fail(call, f"{BATCH} examples", f"{got.n_examples}")
        _compare_features(ctx, got, want, call, "features of the split batch",
                          against="the whole batch's features")
    # And the whole batch must itself be right (a batch-mean loss scales every row by 1/B).
    plan = SketchPlan(sketch, spec.params)
    _compare_features(ctx, whole, _reference_features(spec, plan, [batch], [spec.weights]), call_whole,
                      "features of the whole batch")


def _numpy_global_state() -> tuple:
    state = np.random.get_state()
    digest = hashlib.sha256(np.ascontiguousarray(state[1]).tobytes()).hexdigest()[:16]
    return (state[0], digest, int(state[2]), int(state[3]), float(state[4]), tuple(sorted(np.geterr().items())))


def check_no_side_effects(backend, model: str = "looped_transformer") -> None:
    """Calls leave nothing behind: parameters bit-identical, probe unchanged, no global state changed.

    After each of ``factor_stream``, ``featurize`` at two other checkpoints,
    ``per_step_gradients``, ``full_gradients`` (and ``featurize_eager`` when
    declared), and after a ``featurize`` that fails (a checkpoint with a NaN
    weight), the suite compares :meth:`parameters` bit for bit,
    :meth:`side_effect_probe` with ``==`` and NumPy's global RNG and error
    state with their values before the calls.
    """
    ctx = _make_ctx(backend, model)
    spec = ctx.spec
    handle = ctx.build()
    batch = spec.batch(BATCH, seed=0)
    sketch = SKETCH
    ckpts = _checkpoints(spec)

    def snapshot():
        params = ctx.invoke("backend.parameters(handle)", backend.parameters, handle)
        params = {k: np.array(ctx.np(v, f"parameters[{k!r}]"), copy=True) for k, v in params.items()}
        probe = ctx.invoke("backend.side_effect_probe(handle)", backend.side_effect_probe, handle)
        return params, probe, _numpy_global_state()

    nan_w = spec.copy_weights()
    first = next(p.name for p in spec.params if p.group == "loop")  # always used, so the NaN reaches the loss
    nan_w[first] = nan_w[first].copy()
    nan_w[first].flat[0] = np.nan
    calls: list[tuple[str, Callable[[], Any], bool]] = [
        ("backend.factor_stream(handle, batch)", lambda: backend.factor_stream(handle, batch), False),
        (f"backend.featurize(handle, [batch], {_sketch_text(sketch)}, {_ckpts_text(ckpts)})",
         lambda: backend.featurize(handle, [batch], sketch, ckpts), False),
        ("backend.per_step_gradients(handle, batch)", lambda: backend.per_step_gradients(handle, batch), False),
        ("backend.full_gradients(handle, batch)", lambda: backend.full_gradients(handle, batch), False),
    ]
    if backend.capabilities.jit:
        calls.append((f"backend.featurize_eager(handle, [batch], {_sketch_text(sketch)}, {_ckpts_text(ckpts)})",
                      lambda: backend.featurize_eager(handle, [batch], sketch, ckpts), False))
    calls.append((f"backend.featurize(handle, [batch], {_sketch_text(sketch)}, [checkpoint with a NaN in {first!r}]) "
                  "(expected to fail)",
                  lambda: backend.featurize(handle, [batch], sketch, [Checkpoint(nan_w, eta=1.0, name="nan")]), True))
    params0, probe0, global0 = snapshot()
    for text, fn, may_fail in calls:
        if may_fail:
            try:
                fn()
            except Exception:  # noqa: BLE001 - the failure itself is check_nonfinite_rejected's business
                pass
        else:
            ctx.invoke(text, fn)
        params1, probe1, global1 = snapshot()
        call = ctx.call(text)
        if sorted(params1) != sorted(params0):
            fail(call, f"parameters {sorted(params0)} afterwards", f"{sorted(params1)}")
        for k in params0:
            assert_equal_arrays(params1[k], params0[k], call=call, what=f"parameter {k!r} after the call",
                                hint="load checkpoints temporarily and restore the original weights, even on error")
        if probe1 != probe0:
            fail(call, f"side_effect_probe unchanged: {probe0!r}", f"{probe1!r}",
                 "remove every hook / callback and restore modes and flags on exit, even on error")
        if global1 != global0:
            fail(call, "NumPy's global RNG and error state unchanged",
                 f"before {global0[1:]} vs after {global1[1:]}", "never change global state in library code")


def check_repeat_calls_identical(backend, model: str = "looped_transformer") -> None:
    """The same call twice gives identical arrays (bit-identical when the backend is deterministic)."""
    ctx = _make_ctx(backend, model)
    spec = ctx.spec
    handle = ctx.build()
    batch = spec.batch(BATCH, seed=0)
    sketch = SKETCH
    exact = bool(backend.capabilities.deterministic)
    rtol = 0.0 if exact else 1e-12 if ctx.dtype == "float64" else 1e-5
    first = ctx.featurize(handle, [batch], sketch)
    second = ctx.featurize(handle, [batch], sketch)
    call = ctx.call(f"backend.featurize(handle, [batch of {BATCH}], {_sketch_text(sketch)}) twice")
    _compare_features(ctx, second, _features_np(ctx, first), call, "features of the second call",
                      rtol=rtol, exact=exact, against="the first call's")
    text = "backend.factor_stream(handle, batch)"
    a = _uses_np(ctx, ctx.invoke(text, backend.factor_stream, handle, batch), ctx.call(text))
    b = _uses_np(ctx, ctx.invoke(text, backend.factor_stream, handle, batch), ctx.call(text))
    call = ctx.call(f"{text} twice")
    if len(a) != len(b):
        fail(call, f"{len(a)} uses the second time (as the first)", f"{len(b)}")
    for i, (u, v) in enumerate(zip(a, b)):
        if (u.param, u.step, u.kind) != (v.param, v.step, v.kind):
            fail(call, f"use {i}: {(u.param, u.step, u.kind)}", f"{(v.param, v.step, v.kind)}")
        for field in ("activation", "grad_output"):
            x, y = getattr(u, field), getattr(v, field)
            if x is None or y is None:
                continue
            if exact:
                assert_equal_arrays(y, x, call=call, what=f"{field} of use {i} ({u.param!r}, step {u.step})")
            else:
                assert_close(y, x, rtol=rtol, call=call, what=f"{field} of use {i}", against="the first call's")


def check_float64(backend, model: str = "looped_transformer") -> None:
    """Built with ``dtype="float64"``, every array is float64 and float64-accurate (1e-10 relative).

    Catches a backend that computes in float32 and returns float64 arrays
    (accuracy ~1e-7), or returns float32 arrays.
    """
    ctx = _make_ctx(backend, model)
    ctx.dtype, ctx.rtol = "float64", RTOL_FLOAT64
    spec = ctx.spec
    handle = ctx.build()
    batch = spec.batch(BATCH, seed=0)
    sketch = SKETCH

    def want_f64(arr: np.ndarray, call: str, what: str) -> None:
        if arr.dtype != np.float64:
            fail(call, f"{what} in float64", f"{arr.dtype}", "accumulate in the model's dtype; never downcast")

    feats = ctx.featurize(handle, [batch], sketch)
    call = ctx.call(f"backend.featurize(handle, [batch of {BATCH}], {_sketch_text(sketch)})")
    got = _features_np(ctx, feats)
    for g, arr in got[0].items():
        want_f64(arr, call, f"features of group {g!r}")
    plan = SketchPlan(sketch, spec.params)
    _compare_features(ctx, feats, _reference_features(spec, plan, [batch], [spec.weights]), call,
                      "float64 features")
    text = "backend.factor_stream(handle, batch)"
    uses = _uses_np(ctx, ctx.invoke(text, backend.factor_stream, handle, batch), ctx.call(text))
    for i, u in enumerate(uses):
        for field in ("activation", "grad_output"):
            arr = getattr(u, field)
            if arr is not None and not (field == "activation" and u.kind == "embedding"):
                want_f64(arr, ctx.call(text), f"{field} of use {i} ({u.param!r}, step {u.step})")
    ps = ctx.invoke("backend.per_step_gradients(handle, batch)", backend.per_step_gradients, handle, batch)
    want_ps = spec.reference_per_step_gradients(batch)
    floor = 1e-3 * max(float(np.abs(g).max()) for g in want_ps.values())  # see _compare_streams
    call = ctx.call("backend.per_step_gradients(handle, batch)")
    for name, arr in ps.items():
        arr = ctx.np(arr, f"per_step[{name!r}]")
        want_f64(arr, call, f"per-step gradient of {name!r}")
        if name in want_ps:
            assert_close(arr, want_ps[name], rtol=RTOL_FLOAT64, call=call, floor=floor,
                         what=f"float64 per-step gradient of {name!r}")


def check_jit_matches_eager(backend, model: str = "looped_transformer") -> None:
    """The compiled ``featurize`` equals ``featurize_eager`` for new weights and new batches of a traced shape.

    Four calls in a row (batch/checkpoint: A/a, B/b, A/b, [A, B]/[a, b]) catch
    a compiled function that caches values it should take as arguments.
    """
    ctx = _make_ctx(backend, model)
    spec = ctx.spec
    handle = ctx.build()
    sketch = SKETCH
    b1, b2 = spec.batch(BATCH, seed=0), spec.batch(BATCH, seed=9)
    ck_a, ck_b = _checkpoints(spec, etas=(0.5, 0.25), names=("jit-a", "jit-b"))
    for batches, ckpts in (([b1], [ck_a]), ([b2], [ck_b]), ([b1], [ck_b]), ([b1, b2], [ck_a, ck_b])):
        jitted = ctx.featurize(handle, batches, sketch, ckpts)
        eager = ctx.featurize(handle, batches, sketch, ckpts, eager=True)
        call = ctx.call(f"backend.featurize(handle, {_batches_text(batches)}, {_sketch_text(sketch)}, "
                        f"{_ckpts_text(ckpts)}) vs backend.featurize_eager(...)")
        plan = SketchPlan(sketch, spec.params)
        _check_features_structure(ctx, jitted, plan, sum(_n(b) for b in batches), len(ckpts), call)
        if [c.id for c in jitted.checkpoints] != [c.id for c in eager.checkpoints]:
            fail(call, f"checkpoint ids {[c.id for c in eager.checkpoints]}", f"{[c.id for c in jitted.checkpoints]}")
        _compare_features(ctx, jitted, _features_np(ctx, eager), call, "jitted features",
                          against="the eager features")


def check_devices_agree(backend, model: str = "looped_mlp") -> None:
    """Every declared device gives the features and per-step gradients of the first one."""
    devices = backend.capabilities.devices
    base = _make_ctx(backend, model, devices[0])
    spec = base.spec
    batch = spec.batch(BATCH, seed=0)
    sketch = SKETCH
    want = _features_np(base, base.featurize(base.build(), [batch], sketch))
    for dev in devices[1:]:
        ctx = _make_ctx(backend, model, dev)
        handle = ctx.build()
        feats = ctx.featurize(handle, [batch], sketch)
        call = ctx.call(f"backend.featurize(handle, [batch of {BATCH}], {_sketch_text(sketch)})") + \
            f", compared with device {devices[0]!r}"
        _compare_features(ctx, feats, want, call, f"features on {dev!r}",
                          against=f"the features on {devices[0]!r}")


# --------------------------------------------------------------------------- bad input


def _expect_sdierror(ctx: _Ctx, text: str, fn: Callable[[], Any], must_mention: Sequence[str] = (),
                     any_of: Sequence[str] = ()) -> None:
    """``fn()`` must raise SDIError whose message mentions every string of ``must_mention``."""
    call = ctx.call(text)
    try:
        fn()
    except SDIError as exc:
        msg = str(exc)
        missing = [s for s in must_mention if s not in msg]
        if missing:
            fail(call, f"an SDIError naming {list(must_mention)}", f"SDIError({msg!r})",
                 "error messages name the problem (the parameter) and the fix")
        if any_of and not any(s.lower() in msg.lower() for s in any_of):
            fail(call, f"an SDIError mentioning one of {list(any_of)}", f"SDIError({msg!r})")
        return
    except Exception as exc:  # noqa: BLE001
        fail(call, f"sdi_core.SDIError{' naming ' + str(list(must_mention)) if must_mention else ''}",
             f"{type(exc).__name__}: {exc}", "raise sdi_core.SDIError for bad input, with the fix in the message")
    fail(call, f"sdi_core.SDIError{' naming ' + str(list(must_mention)) if must_mention else ''}",
         "no error (the bad input was accepted silently)")


def check_bad_checkpoint_rejected(backend, model: str = "looped_transformer") -> None:
    """A checkpoint with a missing parameter, an unexpected parameter or a wrong shape raises SDIError naming it."""
    ctx = _make_ctx(backend, model)
    spec = ctx.spec
    handle = ctx.build()
    batch = spec.batch(BATCH, seed=0)
    first = spec.params[0].name
    missing = spec.copy_weights()
    del missing[first]
    extra = spec.copy_weights()
    extra["not_a_parameter.weight"] = np.zeros((2, 2))
    mat = next(p for p in spec.params if len(p.shape) == 2)
    wrong = spec.copy_weights()
    wrong[mat.name] = np.zeros((mat.shape[0] + 1, mat.shape[1]))
    for weights, name, what in ((missing, first, f"without {first!r}"),
                                (extra, "not_a_parameter.weight", "with an unexpected 'not_a_parameter.weight'"),
                                (wrong, mat.name, f"with {mat.name!r} of shape {wrong[mat.name].shape}")):
        ck = [Checkpoint(weights, eta=1.0, name="bad")]
        _expect_sdierror(ctx, f"backend.featurize(handle, [batch], Exact(), [checkpoint {what}])",
                         lambda ck=ck: backend.featurize(handle, [batch], Exact(), ck), must_mention=[name])


def check_nonfinite_rejected(backend, model: str = "looped_transformer") -> None:
    """A checkpoint with a NaN weight raises SDIError (NaN/inf gradients are never returned as features)."""
    ctx = _make_ctx(backend, model)
    spec = ctx.spec
    handle = ctx.build()
    batch = spec.batch(BATCH, seed=0)
    loop_param = next(p.name for p in spec.params if p.group == "loop")
    for value in (np.nan, np.inf):
        w = spec.copy_weights()
        w[loop_param] = w[loop_param].copy()
        w[loop_param].flat[0] = value
        ck = [Checkpoint(w, eta=1.0, name="nonfinite")]
        _expect_sdierror(ctx, f"backend.featurize(handle, [batch], TensorSketch(dim={SKETCH_DIM}), "
                              f"[checkpoint with {value} in {loop_param!r}])",
                         lambda ck=ck: backend.featurize(handle, [batch], SKETCH, ck),
                         any_of=["nan", "inf", "finite"])


def check_bad_selection_rejected(backend, model: str = "looped_mlp") -> None:
    """A selected group that the forward pass never uses, or a selected name the model lacks, raises SDIError.

    The model variant owns ``unused.weight``, never used in the forward pass,
    selected as the group ``"unused"``; the error must name it.  (One unused
    parameter inside a used group is not an error: its features are zeros.)
    """
    ctx = _make_ctx(backend, model)
    spec = ctx.spec
    batch = spec.batch(BATCH, seed=0)
    unused = spec.with_unused_parameter()
    _expect_sdierror(
        ctx, "backend.featurize(backend.build(spec + never-used 'unused.weight' selected as group 'unused'), [batch])",
        lambda: backend.featurize(backend.build(_spec_copy(unused), dtype=ctx.dtype, device=ctx.device), [batch],
                                  Exact()),
        must_mention=["unused.weight"])
    d = spec.params[0].shape[0]
    phantom = ModelSpec(spec.name, spec.arch, spec.copy_weights(),
                        spec.params + (ParamInfo("block.missing.weight", (d, d), "loop"),), spec.steps,
                        spec.description)
    _expect_sdierror(
        ctx, "backend.featurize(backend.build(spec with 'block.missing.weight' selected, a name the model lacks), "
             "[batch])",
        lambda: backend.featurize(backend.build(phantom, dtype=ctx.dtype, device=ctx.device), [batch], Exact()),
        must_mention=["block.missing.weight"])


def _expect_influence_error(ctx: _Ctx, a: Features, b: Features, text: str, must_mention=()) -> None:
    _expect_sdierror(ctx, f"sdi_core.influence({text})", lambda: influence(a, b), must_mention=must_mention)


def _expect_compatible(ctx: _Ctx, a: Features, b: Features, text: str) -> None:
    call = ctx.call(f"sdi_core.influence({text})")
    try:
        influence(a, b)
    except Exception as exc:  # noqa: BLE001
        fail(call, "compatible features (same sketch, selection and checkpoints)", f"{type(exc).__name__}: {exc}")


def check_mismatched_sketches_rejected(backend, model: str = "looped_transformer") -> None:
    """Train and query featurised with different sketches (seed, dim, Exact) cannot be combined.

    The features must record the sketch (``layout.sketch``) so that
    :func:`sdi_core.influence` raises :class:`SDIError`; features of the same
    sketch combine.
    """
    ctx = _make_ctx(backend, model)
    spec = ctx.spec
    handle = ctx.build()
    batch = spec.batch(BATCH, seed=0)
    a = ctx.featurize(handle, [batch], SKETCH)
    same = ctx.featurize(handle, [batch], TensorSketch(SKETCH_DIM, seed=1, route="fft"))
    _expect_compatible(ctx, a, same, "features at TensorSketch(dim=32, seed=1) twice (routes differ)")
    for other in (TensorSketch(SKETCH_DIM, seed=2), TensorSketch(2 * SKETCH_DIM, seed=1), Exact()):
        b = ctx.featurize(handle, [batch], other)
        _expect_influence_error(ctx, a, b, f"train at TensorSketch(dim={SKETCH_DIM}, seed=1), query at "
                                           f"{_sketch_text(other)}")


def check_mismatched_checkpoints_rejected(backend, model: str = "looped_transformer") -> None:
    """Train and query featurised at different checkpoints (names, etas, or unnamed different weights) raise.

    Checkpoint ids are the checkpoint's ``name``, else a hash of its weights:
    unnamed checkpoints with equal weights combine, with different weights do not.
    """
    ctx = _make_ctx(backend, model)
    spec = ctx.spec
    handle = ctx.build()
    batch = spec.batch(BATCH, seed=0)
    sk = SKETCH
    w1, w2 = spec.perturbed_weights(1), spec.perturbed_weights(2)

    def feats(ckpts):
        return ctx.featurize(handle, [batch], sk, ckpts)

    base = feats([Checkpoint(w1, eta=0.5, name="a")])
    _expect_compatible(ctx, base, feats([Checkpoint(w1, eta=0.5, name="a")]), "features at checkpoint 'a' twice")
    _expect_influence_error(ctx, base, feats([Checkpoint(w1, eta=0.5, name="b")]),
                            "train at checkpoint 'a', query at checkpoint 'b'")
    _expect_influence_error(ctx, base, feats([Checkpoint(w1, eta=0.25, name="a")]),
                            "train at checkpoint 'a' with eta 0.5, query with eta 0.25")
    _expect_influence_error(ctx, base, feats([Checkpoint(w1, eta=0.5, name="a"), Checkpoint(w2, eta=0.5, name="b")]),
                            "train at checkpoint ['a'], query at ['a', 'b']")
    un1 = feats([Checkpoint(w1, eta=0.5)])
    _expect_compatible(ctx, un1, feats([Checkpoint(spec.perturbed_weights(1), eta=0.5)]),
                       "unnamed checkpoints with equal weights")
    _expect_influence_error(ctx, un1, feats([Checkpoint(w2, eta=0.5)]),
                            "unnamed checkpoints with different weights (ids must hash the weights)")


def check_checkpoint_ids_are_canonical(backend, model: str = "looped_transformer") -> None:
    """An unnamed checkpoint's id is ``sdi_core.checkpoint_id`` of its canonical weights (in the model's dtype).

    So the same weights featurised by two backends get the same id, and the
    features can be combined without naming every checkpoint.
    """
    ctx = _make_ctx(backend, model)
    spec = ctx.spec
    handle = ctx.build()
    batch = spec.batch(BATCH, seed=0)
    dtype = np.float64 if ctx.dtype == "float64" else np.float32
    for what, ckpts, weights in (("an unnamed checkpoint", [Checkpoint(spec.perturbed_weights(1), eta=0.5)],
                                  spec.perturbed_weights(1)),
                                 ("the current weights (checkpoints=None)", None, spec.weights)):
        want = checkpoint_id({k: np.asarray(v).astype(dtype) for k, v in weights.items()})
        feats = ctx.featurize(handle, [batch], SKETCH, ckpts)
        got = feats.checkpoints[0].id
        if got != want:
            fail(ctx.call(f"backend.featurize(handle, [batch], sketch, {_ckpts_text(ckpts)})"),
                 f"checkpoint id {want!r} for {what}: sdi_core.checkpoint_id of the canonical weights", repr(got),
                 hint="name unnamed checkpoints with sdi_core.checkpoint_id({name: array}) of the weights (any "
                      "orientation), so that other backends give the same weights the same id")


def check_mismatched_selection_rejected(backend, model: str = "looped_transformer") -> None:
    """Features of two different parameter selections cannot be combined; the error names the parameter."""
    ctx = _make_ctx(backend, model)
    spec = ctx.spec
    batch = spec.batch(BATCH, seed=0)
    dropped = next(p.name for p in spec.params if p.group == "loop" and p.name.endswith(".bias"))
    sk = SKETCH
    full = ctx.featurize(ctx.build(), [batch], sk)
    fewer = ctx.featurize(ctx.build(spec.without_params([dropped])), [batch], sk)
    _expect_influence_error(ctx, full, fewer, f"train with every parameter, query without {dropped!r}",
                            must_mention=[dropped])


# --------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class CheckSpec:
    """How one check is generated.

    Attributes:
        func: the ``check_<property>(backend, model)`` function.
        models: canonical models it runs on: ``"all"`` (every supported one)
            or a tuple of preferences (the first supported one is used).
        requires: capability the check needs (``"float64"``, ``"jit"``,
            ``"devices"``), or None.
    """

    func: Callable[..., None]
    models: str | tuple[str, ...] = "all"
    requires: str | None = None
    required: bool = False  # generated even when the backend does not declare the model: it must support it

    @property
    def name(self) -> str:
        return self.func.__name__


_TRANSFORMER_FIRST = ("looped_transformer", "early_exit", "prelude_coda_tied", "looped_mlp", "weight_used_twice")
_MLP_FIRST = ("looped_mlp", "weight_used_twice", "looped_transformer", "early_exit", "prelude_coda_tied")

ALL_CHECKS: tuple[CheckSpec, ...] = (
    CheckSpec(check_parameters_roundtrip),
    CheckSpec(check_factor_stream),
    CheckSpec(check_per_step_gradients),
    CheckSpec(check_sequence_first_body, ("seq_first_mlp",), required=True),
    CheckSpec(check_sketched_features),
    CheckSpec(check_tracin_conservation),
    CheckSpec(check_batch_split_invariance),
    CheckSpec(check_no_side_effects, _TRANSFORMER_FIRST),
    CheckSpec(check_repeat_calls_identical, _TRANSFORMER_FIRST),
    CheckSpec(check_float64, _TRANSFORMER_FIRST, requires="float64"),
    CheckSpec(check_jit_matches_eager, _TRANSFORMER_FIRST, requires="jit"),
    CheckSpec(check_devices_agree, _MLP_FIRST, requires="devices"),
    CheckSpec(check_bad_checkpoint_rejected, _TRANSFORMER_FIRST),
    CheckSpec(check_nonfinite_rejected, _MLP_FIRST),
    CheckSpec(check_bad_selection_rejected, ("looped_mlp", "weight_used_twice")),
    CheckSpec(check_mismatched_sketches_rejected, _MLP_FIRST),
    CheckSpec(check_mismatched_checkpoints_rejected, _MLP_FIRST),
    CheckSpec(check_checkpoint_ids_are_canonical, _TRANSFORMER_FIRST),
    CheckSpec(check_mismatched_selection_rejected, _MLP_FIRST),
)

CHECK_NAMES: tuple[str, ...] = tuple(c.name for c in ALL_CHECKS)


def _has(caps, requirement: str | None) -> bool:
    if requirement is None:
        return True
    if requirement == "devices":
        return len(caps.devices) > 1
    return bool(getattr(caps, requirement))


def yield_checks(backend, checks: Sequence[str] | None = None) -> Iterator[tuple[str, Callable[[], None]]]:
    """Yield ``(check_id, check)`` for every check the backend's capabilities call for.

    ``check_id`` is ``"<check name>[<model>]"``; ``check()`` takes no
    argument and raises :class:`CheckFailure` when the property does not hold.

    Args:
        backend: the backend under test.
        checks: restrict to these check names (e.g. ``["check_factor_stream"]``).
    """
    caps = backend.capabilities
    if checks is not None:
        unknown = sorted(set(checks) - set(CHECK_NAMES))
        if unknown:
            raise SDIError(f"Unknown check name(s) {unknown}; the checks are {list(CHECK_NAMES)}.")
    supported = [m for m in CANONICAL_MODELS if m in caps.models]
    for spec in ALL_CHECKS:
        if checks is not None and spec.name not in checks:
            continue
        if not _has(caps, spec.requires):
            continue
        if spec.models == "all":
            models = supported
        elif spec.required:
            models = list(spec.models[:1])
        else:
            models = [m for m in spec.models if m in caps.models][:1]
        for m in models:
            yield f"{spec.name}[{m}]", partial(spec.func, backend, m)
