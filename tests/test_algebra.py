"""Step-decomposition algebra against brute force; conservation; blocking; top-k; bad input."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import sdi_core
from sdi_core import (
    CheckpointInfo,
    Exact,
    FactorUse,
    Features,
    ParamInfo,
    SDIError,
    SketchPlan,
    TensorSketch,
    influence,
    self_influence,
    sketch_uses,
)
from sdi_core._array import to_numpy
from sdi_core.reference import exact_sdi, per_step_gradients

PARAMS = [
    ParamInfo("emb.weight", (7, 4), "prelude"),
    ParamInfo("block.fc.weight", (6, 4), "loop"),
    ParamInfo("block.fc.bias", (6,), "loop"),
    ParamInfo("block.ln.weight", (4,), "loop"),
    ParamInfo("head.weight", (5, 4), "coda"),
]
ORDER = ["prelude", "loop", "coda"]


def random_uses(rng, n, tau, T=3):
    """A synthetic factor stream: one embedding use, tau steps of loop uses (fc used twice), a head use."""
    uses = [FactorUse("emb.weight", 0, "embedding", rng.integers(0, 7, (n, T)), rng.normal(size=(n, T, 4)))]
    for s in range(tau):
        for _ in range(2):
            uses.append(FactorUse("block.fc.weight", s, "linear", rng.normal(size=(n, T, 4)), rng.normal(size=(n, T, 6))))
        uses.append(FactorUse("block.fc.bias", s, "bias", None, rng.normal(size=(n, T, 6))))
        uses.append(FactorUse("block.ln.weight", s, "scale", rng.normal(size=(n, T, 4)), rng.normal(size=(n, T, 4))))
    uses.append(FactorUse("head.weight", 0, "linear", rng.normal(size=(n, T, 4)), rng.normal(size=(n, T, 5))))
    return uses


def make_features(plan, uses_per_ckpt, n, tau, etas, xp=None):
    data = []
    for uses in uses_per_ckpt:
        if xp is not None:
            uses = [FactorUse(u.param, u.step, u.kind,
                              None if u.activation is None else xp.asarray(u.activation),
                              xp.asarray(u.grad_output)) for u in uses]
        data.append(sketch_uses(plan, uses, n, steps={"prelude": 1, "loop": tau, "coda": 1}))
    return Features(
        data=data,
        layout=plan.layout,
        checkpoints=tuple(CheckpointInfo(f"ckpt{k}", eta) for k, eta in enumerate(etas)),
        steps={"prelude": 1, "loop": tau, "coda": 1},
        example_ids=np.arange(n) + 100,
    )


@pytest.fixture(scope="module")
def streams():
    rng = np.random.default_rng(0)
    etas = [0.5, 0.25]
    train = [random_uses(rng, 6, 3) for _ in etas]
    query = [random_uses(rng, 4, 5) for _ in etas]  # query tau (5) != train tau (3)
    return train, query, etas


def brute(streams):
    train, query, etas = streams
    tr = [per_step_gradients(u, PARAMS, 6, {"prelude": 1, "loop": 3, "coda": 1}) for u in train]
    q = [per_step_gradients(u, PARAMS, 4, {"prelude": 1, "loop": 5, "coda": 1}) for u in query]
    return exact_sdi(tr, q, etas, PARAMS, ORDER)


def test_exact_features_equal_brute_force(streams, xp):
    train, query, etas = streams
    plan = SketchPlan(Exact(), PARAMS)
    res = influence(make_features(plan, train, 6, 3, etas, xp), make_features(plan, query, 4, 5, etas, xp),
                    train_block=4, query_block=3)
    ref = brute(streams)
    for name in ("trajectory", "tracin", "train_trajectory", "step_matrix"):
        got = to_numpy(getattr(res, name))
        assert got.shape == ref[name].shape, f"{name}: shape {got.shape}, expected {ref[name].shape}"
        np.testing.assert_allclose(got, ref[name], rtol=1e-12, atol=1e-12, err_msg=f"{name} on {xp.__name__}")
    assert res.query_slot_labels == ["prelude"] + [f"loop[{t}]" for t in range(5)] + ["coda"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conservation_for_every_sketch_draw(streams, seed):
    train, query, etas = streams
    plan = SketchPlan(TensorSketch(dim=8, seed=seed), PARAMS)
    res = influence(make_features(plan, train, 6, 3, etas), make_features(plan, query, 4, 5, etas))
    traj = np.asarray(res.trajectory)
    tracin = np.asarray(res._dense("tracin"))  # computed independently of the trajectory
    np.testing.assert_allclose(traj.sum(-1), tracin, rtol=0, atol=1e-12, err_msg="sum_t trajectory != tracin")
    np.testing.assert_allclose(np.asarray(res.train_trajectory).sum(-1), tracin, atol=1e-12)
    np.testing.assert_allclose(np.asarray(res.step_matrix).sum((2, 3)), tracin, atol=1e-12)


def test_summed_train_features_give_same_trajectory(streams):
    train, query, etas = streams
    plan = SketchPlan(Exact(), PARAMS)
    tr = make_features(plan, train, 6, 3, etas)
    q = make_features(plan, query, 4, 5, etas)
    a = np.asarray(influence(tr, q).trajectory)
    b = np.asarray(influence(tr.sum_steps(), q).trajectory)
    np.testing.assert_allclose(a, b, atol=1e-12)
    with pytest.raises(SDIError, match="per-step train features"):
        influence(tr.sum_steps(), q).step_matrix


def test_blocking_and_top_k(streams):
    train, query, etas = streams
    plan = SketchPlan(TensorSketch(dim=16, seed=3), PARAMS)
    tr = make_features(plan, train, 6, 3, etas)
    q = make_features(plan, query, 4, 5, etas)
    dense = np.asarray(influence(tr, q).trajectory)
    blocked = influence(tr, q, train_block=1, query_block=1)
    np.testing.assert_allclose(np.asarray(blocked.trajectory), dense, atol=1e-12)
    for step in (None, 0, 3, -1):
        top = blocked.top_k(3, step=step)
        scores = dense.sum(-1) if step is None else dense[..., step]
        expect = np.argsort(-scores, axis=0, kind="stable")[:3].T
        np.testing.assert_array_equal(top.indices, expect, err_msg=f"top_k(3, step={step})")
        np.testing.assert_allclose(top.scores, np.take_along_axis(scores.T, expect, 1), atol=1e-12)
        np.testing.assert_array_equal(top.ids, expect + 100)
    with pytest.raises(SDIError, match="slots"):
        blocked.top_k(2, step=99)


def test_cosine_normalisation_conserves(streams):
    train, query, etas = streams
    plan = SketchPlan(Exact(), PARAMS)
    tr = make_features(plan, train, 6, 3, etas)
    q = make_features(plan, query, 4, 5, etas)
    res = influence(tr, q, normalize="cosine")
    traj = np.asarray(res.trajectory)
    np.testing.assert_allclose(traj.sum(-1), np.asarray(res._dense("tracin")), atol=1e-12)
    # one checkpoint's cosine TracIn of an example with itself is 1
    single = Features([tr.data[0]], tr.layout, (tr.checkpoints[0],), tr.steps, tr.example_ids)
    self_cos = np.asarray(influence(single, single, normalize="cosine").tracin)
    np.testing.assert_allclose(np.diag(self_cos), etas[0] * np.ones(6), atol=1e-12)


def test_self_influence_matches_diagonal(streams):
    train, _, etas = streams
    plan = SketchPlan(Exact(), PARAMS)
    tr = make_features(plan, train, 6, 3, etas)
    si = np.asarray(self_influence(tr))
    full = np.asarray(influence(tr, tr).trajectory)
    np.testing.assert_allclose(si, full[np.arange(6), np.arange(6)], atol=1e-12)


def test_mismatched_features_raise(streams):
    train, query, etas = streams
    a = make_features(SketchPlan(TensorSketch(dim=8, seed=0), PARAMS), train, 6, 3, etas)
    b = make_features(SketchPlan(TensorSketch(dim=8, seed=1), PARAMS), query, 4, 5, etas)
    with pytest.raises(SDIError, match="sketch differs"):
        influence(a, b)
    c = make_features(SketchPlan(TensorSketch(dim=16, seed=0), PARAMS), query, 4, 5, etas)
    with pytest.raises(SDIError, match="sketch differs"):
        influence(a, c)
    d = make_features(SketchPlan(TensorSketch(dim=8, seed=0), PARAMS), query, 4, 5, [0.5, 0.1])
    with pytest.raises(SDIError, match="etas differ"):
        influence(a, d)
    fewer = [p for p in PARAMS if p.name != "block.fc.bias"]
    e_uses = [[u for u in s if u.param != "block.fc.bias"] for s in query]
    e = make_features(SketchPlan(TensorSketch(dim=8, seed=0), fewer), e_uses, 4, 5, etas)
    with pytest.raises(SDIError, match="block.fc.bias"):
        influence(a, e)


def test_bad_factor_input_raises():
    plan = SketchPlan(TensorSketch(dim=8, seed=0), PARAMS)
    rng = np.random.default_rng(1)
    ok_a, ok_g = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 6))
    cases = [
        (FactorUse("block.fc.weight", 0, "linear", ok_a, rng.normal(size=(2, 3, 5))), "d_out"),
        (FactorUse("block.fc.weight", 0, "linear", rng.normal(size=(2, 4, 4)), ok_g), "disagree"),
        (FactorUse("block.fc.weight", 0, "linear", ok_a.astype(np.int64), ok_g), "floating-point"),
        (FactorUse("block.fc.weight", 0, "linear", ok_a + 0j, ok_g), "floating-point"),
        (FactorUse("nope.weight", 0, "linear", ok_a, ok_g), "not in the sketch plan"),
        (FactorUse("block.fc.weight", -1, "linear", ok_a, ok_g), "step"),
    ]
    for use, pattern in cases:
        with pytest.raises(SDIError, match=pattern):
            sketch_uses(plan, [use], 2)
    bad = ok_g.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(SDIError, match=r"block.fc.weight.*step 2"):
        sketch_uses(plan, [FactorUse("block.fc.weight", 2, "linear", ok_a, bad)], 2)
    with pytest.raises(SDIError, match="kind"):
        FactorUse("block.fc.weight", 0, "conv", ok_a, ok_g)
    for dim in (0, -3, 2.5):
        with pytest.raises(SDIError, match="positive int"):
            TensorSketch(dim=dim)


def test_mixing_array_libraries_raises():
    torch = pytest.importorskip("torch")
    plan = SketchPlan(Exact(), PARAMS)
    rng = np.random.default_rng(2)
    use = FactorUse("block.fc.weight", 0, "linear", torch.from_numpy(rng.normal(size=(2, 3, 4))),
                    rng.normal(size=(2, 3, 6)))
    with pytest.raises(SDIError, match="different libraries"):
        sketch_uses(plan, [use], 2)


def test_import_sdi_core_imports_no_framework():
    code = (
        "import sys, sdi_core, sdi_core.reference, sdi_core.app.cli; "
        "bad = [m for m in ('torch', 'jax', 'jaxlib') if m in sys.modules]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"import sdi_core pulled in a framework: {proc.stderr}"


@pytest.mark.parametrize("sketch", [Exact(), TensorSketch(dim=8, seed=4)], ids=["exact", "ts8"])
def test_sum_steps_sketcher_equals_summed_features(streams, sketch):
    """Hashing the step-summed gradient once equals summing per-step features (the sketch is linear)."""
    train, _, etas = streams
    plan = SketchPlan(sketch, PARAMS)
    steps = {"prelude": 1, "loop": 3, "coda": 1}
    per_step = sketch_uses(plan, train[0], 6, steps=steps, route="exact_hash")
    summed = sketch_uses(plan, train[0], 6, steps=steps, route="exact_hash", summed=True)
    for g, arr in per_step.items():
        assert summed[g].shape == (6, 1, arr.shape[2]), f"group {g}: {summed[g].shape}"
        np.testing.assert_allclose(summed[g][:, 0], arr.sum(axis=1), atol=1e-12, err_msg=f"group {g}")
