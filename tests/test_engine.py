"""The sketch engine: native kernels equal the portable path, which equals a float64 reference; summing,
stacked uses, route timing, the pure form under jax.jit, and the non-finite check."""
from __future__ import annotations

import numpy as np
import pytest

from sdi_core import Exact, FactorUse, ParamInfo, SDIError, SketchEngine, SketchPlan, StackedUse, TensorSketch, \
    sketch_uses
from sdi_core._array import to_numpy
from sdi_core.engine import clear_route_cache
from sdi_core.reference import countsketch_loop, per_step_gradients

from conftest import to_xp

B = 3
STEPS = {"loop": 3, "coda": 1}
PARAMS = [
    ParamInfo("lin", (6, 5)),  # TensorSketched at m=16 (30 entries)
    ParamInfo("small", (3, 4)),  # 12 entries: stored exactly
    ParamInfo("emb", (7, 4)),  # TensorSketched embedding, with ignore_index
    ParamInfo("bias", (20,)),  # CountSketched
    ParamInfo("scale", (5,)),  # exact
    ParamInfo("dense", (4, 5)),  # dense gradient, hashed
    ParamInfo("head", (6, 4), group="coda"),
    ParamInfo("unused", (2, 2), group="coda"),  # never used: zeros
]


def _uses(seed=0):
    """Per-step uses of every kind, several uses of one weight in a step, a row slice, padding ids."""
    rng = np.random.default_rng(seed)
    uses = []
    for s in range(3):
        uses += [
            FactorUse("lin", s, "linear", rng.normal(size=(B, 4, 5)), rng.normal(size=(B, 4, 6))),
            FactorUse("lin", s, "linear", rng.normal(size=(B, 4, 5)), rng.normal(size=(B, 4, 3)), row_slice=(2, 5)),
            FactorUse("small", s, "linear", rng.normal(size=(B, 4)), rng.normal(size=(B, 3))),
            FactorUse("emb", s, "embedding", rng.integers(0, 7, size=(B, 4)), rng.normal(size=(B, 4, 4)),
                      ignore_index=2),
            FactorUse("bias", s, "bias", None, rng.normal(size=(B, 4, 20))),
            FactorUse("scale", s, "scale", rng.normal(size=(B, 4, 5)), rng.normal(size=(B, 4, 5))),
            FactorUse("dense", s, "dense", None, rng.normal(size=(B, 4, 5))),
        ]
    uses.append(FactorUse("head", 0, "linear", rng.normal(size=(B, 2, 4)), rng.normal(size=(B, 2, 6))))
    return uses


def _stacked(uses, xp):
    """The same uses as stacked uses ``[B, S, T, d]`` (one per parameter and slot of the list), in ``xp``."""
    by_key: dict = {}
    for u in uses:
        by_key.setdefault((u.param, u.kind, u.row_slice, u.ignore_index, np.shape(u.grad_output)), []).append(u)
    out = []
    for (param, kind, rows, ignore, _), items in by_key.items():
        def stack(x, t_axis):
            x = np.asarray(x)
            if t_axis and x.ndim == (2 if kind != "embedding" else 1):
                x = x[:, None]
            return x

        g = np.stack([stack(u.grad_output, kind != "dense") for u in items], axis=1)
        a = None if items[0].activation is None else np.stack([stack(u.activation, True) for u in items], axis=1)
        a = None if a is None else (xp.asarray(a) if kind == "embedding" else to_xp(xp, a))
        out.append(StackedUse(param, kind, a, to_xp(xp, g), [u.step for u in items], rows, ignore))
    return out


def _in(xp, uses):
    return [FactorUse(u.param, u.step, u.kind,
                      None if u.activation is None else (xp.asarray(u.activation) if u.kind == "embedding"
                                                         else to_xp(xp, u.activation)),
                      to_xp(xp, u.grad_output), row_slice=u.row_slice, ignore_index=u.ignore_index) for u in uses]


def _reference(plan, uses, summed=False):
    """float64 NumPy: materialised per-step gradients, hashed by an explicit loop."""
    grads = per_step_gradients(uses, list(plan.params.values()), B, STEPS)
    out = {}
    for g in plan.layout.groups:
        blocks = []
        for name in g.params:
            spec = plan.spec(name)
            flat = grads[name].reshape(B, STEPS[g.name], -1)
            if summed:
                flat = flat.sum(axis=1, keepdims=True)
            if spec.mode != "exact":
                t = spec.flat_table()
                flat = np.stack([[countsketch_loop(f, t.index, t.sign, t.m) for f in row] for row in flat])
            blocks.append(flat)
        out[g.name] = np.concatenate(blocks, axis=2)
    return out


def _close(got, want, what, tol=1e-10):
    for g, w in want.items():
        x = to_numpy(got[g])
        assert x.shape == w.shape, f"{what}: group {g!r} has shape {x.shape}, expected {w.shape}"
        scale = max(1.0, float(np.abs(w).max()))
        err = float(np.abs(x - w).max())
        assert err <= tol * scale, f"{what}: group {g!r} differs by {err:.3g} (scale {scale:.3g})"


SKETCH = TensorSketch(dim=16, seed=3, time_routes=False)


@pytest.mark.parametrize("summed", [False, True], ids=["per-step", "summed"])
@pytest.mark.parametrize("route", ["fft", "exact_hash"])
def test_portable_path_equals_float64_reference(xp, route, summed):
    """The portable kernels, on every namespace (array_api_strict included), against materialised gradients."""
    plan = SketchPlan(SKETCH, PARAMS)
    uses = _uses()
    want = _reference(plan, uses, summed)
    for steps in (STEPS, None):
        got = sketch_uses(plan, _in(xp, uses), B, steps=steps, route=route, summed=summed, method="portable")
        _close(got, want, f"portable, {xp.__name__}, route {route}, steps {steps}, summed {summed}")


NATIVE = ["numpy", "torch", "jax"]


def _native_xp(name, request):
    if name == "jax":
        request.getfixturevalue("jax_x64")
    mod = {"numpy": "array_api_compat.numpy", "torch": "array_api_compat.torch", "jax": "jax.numpy"}[name]
    return pytest.importorskip(mod)


@pytest.mark.parametrize("form", ["streamed", "stacked"])
@pytest.mark.parametrize("summed", [False, True], ids=["per-step", "summed"])
@pytest.mark.parametrize("route", ["fft", "exact_hash"])
@pytest.mark.parametrize("name", NATIVE)
def test_native_kernels_equal_portable(name, route, summed, form, request):
    """Every native fast path (signed halves, workspace, combined-hash embedding, blocked rows, in-place
    slots, deferred summed hashing) against the portable path on the same namespace."""
    xp = _native_xp(name, request)
    plan = SketchPlan(SKETCH, PARAMS)
    uses = _in(xp, _uses(1))
    if form == "stacked":
        uses = _stacked(_uses(1), xp)
    for steps in (STEPS, None):
        want = sketch_uses(plan, uses, B, steps=steps, route=route, summed=summed, method="portable")
        got = sketch_uses(plan, uses, B, steps=steps, route=route, summed=summed, method="native")
        _close(got, {g: to_numpy(a) for g, a in want.items()},
               f"native vs portable on {name}, route {route}, summed {summed}, {form}, steps {steps}")


def test_stacked_uses_with_repeated_steps_add(request):
    """Two uses of one weight at the same step, stacked together, add (numpy and torch in place, jax .at)."""
    rng = np.random.default_rng(5)
    plan = SketchPlan(SKETCH, [ParamInfo("lin", (6, 5))])
    a, g = rng.normal(size=(B, 4, 2, 5)), rng.normal(size=(B, 4, 2, 6))
    steps = (0, 1, 0, 1)
    per_use = [FactorUse("lin", s, "linear", a[:, j], g[:, j]) for j, s in enumerate(steps)]
    want = sketch_uses(plan, per_use, B, steps={"loop": 2}, method="portable")
    for name in NATIVE:
        xp = _native_xp(name, request)
        got = sketch_uses(plan, [StackedUse("lin", "linear", to_xp(xp, a), to_xp(xp, g), steps)], B,
                          steps={"loop": 2})
        _close(got, want, f"repeated steps on {name}")


def test_pure_form_under_jax_jit_equals_portable(request):
    jax = request.getfixturevalue("jax_x64")
    import jax.numpy as jnp

    plan = SketchPlan(TensorSketch(dim=16, seed=3), PARAMS)  # route "auto": timed while tracing
    raw = _uses(2)
    want = sketch_uses(plan, raw, B, steps=STEPS, route="exact_hash", method="portable")
    stacked = _stacked(raw, jnp)
    engine = SketchEngine(plan)

    for summed in (False, True):
        @jax.jit
        def featurize(arrays):
            uses = [StackedUse(u.param, u.kind, a, g, u.steps, u.row_slice, u.ignore_index)
                    for u, (a, g) in zip(stacked, arrays)]
            state = engine.update(engine.init(B, STEPS, summed=summed), uses)
            return engine.finalize(state)  # no finite check under jit

        got = featurize([(u.activation, u.grad_output) for u in stacked])
        expect = {g: a.sum(axis=1, keepdims=True) for g, a in want.items()} if summed else want
        _close(got, expect, f"jax.jit pure form, summed {summed}")
    routes = engine.routes()
    assert routes["lin"]["source"] in ("timed", "prior (decisive)"), routes


def test_summed_equals_sum_of_per_step_and_hashes_once(monkeypatch):
    """summed=True: the sum over steps of the per-step features, with one hash per parameter and batch."""
    from sdi_core import engine as engine_mod

    plan = SketchPlan(SKETCH, PARAMS)
    uses = _uses(3)
    per_step = sketch_uses(plan, uses, B, steps=STEPS, route="exact_hash")
    calls = []
    orig = engine_mod.NumpyKernels.flat_rows

    def counting(self, flat, spec, lo, hi):
        calls.append(spec.param.name)
        return orig(self, flat, spec, lo, hi)

    monkeypatch.setattr(engine_mod.NumpyKernels, "flat_rows", counting)
    summed = sketch_uses(plan, uses, B, steps=STEPS, route="exact_hash", summed=True)
    _close(summed, {g: a.sum(axis=1, keepdims=True) for g, a in per_step.items()}, "summed vs per-step")
    assert calls.count("lin") == 2, f"'lin' (two row ranges) should be hashed once per range, got {calls}"


def test_route_auto_times_the_routes_and_records_them():
    """Close shapes are timed (the faster measured route wins); a shape whose modelled costs differ by more
    than PRUNE_RATIO is decided by the model; forced and untimed routes say so."""
    clear_route_cache()
    rng = np.random.default_rng(6)
    params = [ParamInfo("close", (64, 64)), ParamInfo("wide", (256, 256))]
    plan = SketchPlan(TensorSketch(dim=256, seed=0), params)
    uses = [FactorUse("close", 0, "linear", rng.normal(size=(2, 8, 64)), rng.normal(size=(2, 8, 64))),
            FactorUse("wide", 0, "linear", rng.normal(size=(2, 1, 256)), rng.normal(size=(2, 1, 256)))]
    engine = SketchEngine(plan)
    engine.finalize(engine.update(engine.init(2, {"loop": 1}), uses))
    routes = engine.routes()
    close, wide = routes["close"], routes["wide"]
    assert close["source"] == "timed" and set(close["ms"]) == {"fft", "exact_hash"}, close
    assert all(v > 0 for v in close["ms"].values()) and close["route"] == min(close["ms"], key=close["ms"].get)
    assert wide == {"route": "fft", "source": "prior (decisive)", "prior": "fft"}, wide
    again = SketchEngine(plan)  # the timing is cached for the process: same choice, no new timing
    again.update(again.init(2, {"loop": 1}), uses)
    assert again.routes()["close"] == close
    forced = SketchEngine(plan, route="exact_hash")
    forced.update(forced.init(2, {"loop": 1}), uses)
    assert forced.routes()["wide"] == {"route": "exact_hash", "source": "forced"}
    prior = SketchEngine(SketchPlan(TensorSketch(dim=256, seed=0, time_routes=False), params))
    prior.update(prior.init(2, {"loop": 1}), uses)
    assert {r["source"] for r in prior.routes().values()} == {"prior"}
    clear_route_cache()


def test_route_timing_picks_the_faster_candidate(monkeypatch):
    """The choice follows the measured times, not the cost model."""
    from sdi_core import engine as engine_mod

    clear_route_cache()
    plan = SketchPlan(TensorSketch(dim=16, seed=0), [ParamInfo("lin", (6, 5))])
    use = FactorUse("lin", 0, "linear", np.ones((B, 4, 5)), np.ones((B, 4, 6)))
    for fake, want in (({"fft": 1e-3, "exact_hash": 5e-3}, "fft"), ({"fft": 5e-3, "exact_hash": 1e-3}, "exact_hash")):
        clear_route_cache()
        order = iter(engine_mod.OUTER_ROUTES)
        monkeypatch.setattr(engine_mod.Kernels, "best_time", lambda self, fn, args, repeats=2: fake[next(order)])
        engine = SketchEngine(plan)
        engine.update(engine.init(B, {"loop": 1}), use)
        assert engine.routes()["lin"]["route"] == want, (fake, engine.routes())
    clear_route_cache()


def test_non_finite_features_name_parameter_and_step():
    plan = SketchPlan(SKETCH, PARAMS)
    uses = _uses(4)
    uses[4 + 7].grad_output[0, 1, 3] = np.inf  # the bias use of step 1
    with pytest.raises(SDIError, match=r"Non-finite.*'bias' at step 1 of group 'loop'"):
        sketch_uses(plan, uses, B, steps=STEPS)


def test_bad_input_names_the_use():
    plan = SketchPlan(SKETCH, PARAMS)
    engine = SketchEngine(plan)
    rng = np.random.default_rng(7)
    state = engine.init(B, STEPS)
    with pytest.raises(SDIError, match=r"'lin' at step 3.*outside the 3 steps"):
        engine.update(state, FactorUse("lin", 3, "linear", rng.normal(size=(B, 5)), rng.normal(size=(B, 6))))
    with pytest.raises(SDIError, match=r"stacked grad_output must be \[B, S=2"):
        engine.update(state, StackedUse("lin", "linear", rng.normal(size=(B, 3, 1, 5)), rng.normal(size=(B, 3, 1, 6)),
                                        (0, 1)))
    with pytest.raises(SDIError, match="batch size 2 differs"):
        engine.update(state, FactorUse("lin", 0, "linear", rng.normal(size=(2, 5)), rng.normal(size=(2, 6))))
    with pytest.raises(SDIError, match="No use of any selected parameter"):
        engine.finalize(engine.init(B, STEPS))
    with pytest.raises(SDIError, match="non-negative"):
        StackedUse("lin", "linear", None, None, (0, -1))


def test_float64_use_after_float32_promotes_the_state(request):
    plan = SketchPlan(SKETCH, PARAMS)
    uses = _uses(8)
    want = sketch_uses(plan, uses, B, steps=STEPS, route="exact_hash", method="portable")
    for name in NATIVE:
        xp = _native_xp(name, request)
        mixed = _in(xp, uses)
        for u in mixed[:5]:
            u.grad_output = xp.astype(u.grad_output, xp.float32)
            if u.activation is not None and u.kind != "embedding":
                u.activation = xp.astype(u.activation, xp.float32)
        got = sketch_uses(plan, mixed, B, steps=STEPS, route="exact_hash")
        assert all(str(a.dtype).endswith("float64") for a in got.values()), {g: a.dtype for g, a in got.items()}
        _close(got, want, f"float32 then float64 uses on {name}", tol=1e-5)


def test_exact_sketch_equals_materialised_gradients():
    plan = SketchPlan(Exact(), PARAMS)
    uses = _uses(9)
    _close(sketch_uses(plan, uses, B, steps=STEPS), _reference(plan, uses), "Exact()")
