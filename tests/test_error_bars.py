"""Error bars from independent sketches: coverage of the exact value, top-k of the mean, stores, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from sdi_core import CheckpointInfo, Exact, FactorUse, Features, ParamInfo, SDIError, SketchPlan, TensorSketch, influence
from sdi_core import sketch_uses
from sdi_core._array import to_numpy
from sdi_core.error_bars import (
    Estimate,
    influence_with_error_bars,
    score_stores_with_error_bars,
    sketch_seeds,
)
from sdi_core.store import write_features

# Every tensor is larger than the sketch (m = 64), so every one of them is really sketched.
PARAMS = [ParamInfo("emb.weight", (40, 12), "prelude"), ParamInfo("block.fc.weight", (24, 12), "loop"),
          ParamInfo("block.out.weight", (12, 24), "loop")]
STEPS = {"prelude": 1, "loop": 3}
M = 64
R = 16  # seeds: mean +- 2 SE is a Student-t interval with 15 degrees of freedom, nominal coverage 93.6 %


def _uses(rng, n, T=4):
    uses = [FactorUse("emb.weight", 0, "embedding", rng.integers(0, 40, (n, T)), rng.normal(size=(n, T, 12)))]
    for s in range(STEPS["loop"]):
        uses.append(FactorUse("block.fc.weight", s, "linear", rng.normal(size=(n, T, 12)), rng.normal(size=(n, T, 24))))
        uses.append(FactorUse("block.out.weight", s, "linear", rng.normal(size=(n, T, 24)), rng.normal(size=(n, T, 12))))
    return uses


def _features(sketch, uses_per_ckpt, n):
    plan = SketchPlan(sketch, PARAMS)
    data = [sketch_uses(plan, uses, n, steps=STEPS) for uses in uses_per_ckpt]
    cks = tuple(CheckpointInfo(f"ckpt{k}", eta) for k, eta in enumerate((0.5, 0.25)))
    return Features(data, plan.layout, cks, dict(STEPS), example_ids=np.arange(n) + 1000)


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    n_train, n_query = 24, 6
    train_uses = [_uses(rng, n_train) for _ in range(2)]
    query_uses = [_uses(rng, n_query) for _ in range(2)]
    exact = influence(_features(Exact(), train_uses, n_train), _features(Exact(), query_uses, n_query))
    seeds = sketch_seeds(TensorSketch(dim=M, seed=3), R)
    trains = [_features(s, train_uses, n_train) for s in seeds]
    queries = [_features(s, query_uses, n_query) for s in seeds]
    return exact, trains, queries


def test_mean_plus_minus_two_se_covers_the_exact_value_for_about_95_percent(case):
    exact, trains, queries = case
    est = influence_with_error_bars(trains, queries)
    for name in ("trajectory", "tracin", "train_trajectory"):
        e = getattr(est, name)
        ref = to_numpy(getattr(exact, name))
        lo, hi = e.interval(2.0)
        covered = np.mean((ref >= lo) & (ref <= hi))
        # Nominal 93.6 % (t with 15 dof); 2 x 24 x 6 x ... entries, correlated through shared factors.
        assert 0.88 <= covered <= 0.99, f"{name}: mean +- 2 SE covers {covered:.3f} of the exact entries"
        # The error bars are informative: the sketch error is real and the SE tracks it.
        rel = np.linalg.norm(e.mean - ref) / np.linalg.norm(ref)
        assert 0.01 < rel < 1.0  # random factors: exact influences are small, the m = 64 sketch is coarse
        ratio = np.sqrt(np.mean((e.mean - ref) ** 2)) / np.sqrt(np.mean(e.se ** 2))
        assert 0.7 < ratio < 1.4, f"{name}: RMS error / RMS SE = {ratio:.2f}"
    # Conservation holds for the mean as for every draw.
    np.testing.assert_allclose(est.trajectory.mean.sum(-1), est.tracin.mean, rtol=1e-10, atol=1e-12)


def test_top_k_of_the_mean_equals_ranking_the_dense_mean_and_reports_stability(case):
    _, trains, queries = case
    est = influence_with_error_bars(trains, queries, train_block=5)  # several train blocks streamed
    mean = est.trajectory.mean
    for step in (None, 2):
        top = est.top_k(4, step=step)
        dense = mean.sum(-1) if step is None else mean[:, :, step]
        want = np.argsort(-dense.T, axis=1, kind="stable")[:, :4]
        np.testing.assert_array_equal(top.indices, want)
        np.testing.assert_array_equal(top.ids, want + 1000)
        np.testing.assert_allclose(top.scores.mean, np.take_along_axis(dense.T, want, 1), rtol=1e-10)
        se = est.tracin.se if step is None else est.trajectory.se[:, :, step]
        np.testing.assert_allclose(top.scores.se, np.take_along_axis(se.T, want, 1), rtol=1e-8)
        # Frequency by hand from the seeds' own top-k sets.
        per = [np.argsort(-(r.tracin if step is None else r.trajectory[:, :, step]).T, 1, kind="stable")[:, :4]
               for r in est.results]
        freq = np.mean([[[w in p[q] for w in top.indices[q]] for q in range(6)] for p in per], axis=0)
        np.testing.assert_allclose(top.frequency, freq)
        assert np.all((top.overlap > 0) & (top.overlap <= 1))


def test_stores_per_seed_give_the_in_memory_error_bars(case, tmp_path):
    _, trains, queries = case
    stores = [write_features(tmp_path / f"s{r}", f, dtype="float64") for r, f in enumerate(trains[:4])]
    out = score_stores_with_error_bars(stores, queries[:4], k=4, dense=("trajectory",))
    mem = influence_with_error_bars(trains[:4], queries[:4])
    np.testing.assert_allclose(out["trajectory"].mean, mem.trajectory.mean, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(out["trajectory"].se, mem.trajectory.se, rtol=1e-8, atol=1e-14)
    top = mem.top_k(4)
    np.testing.assert_array_equal(out["total"].indices, top.indices)
    np.testing.assert_allclose(out["total"].scores.mean, top.scores.mean, rtol=1e-10)
    np.testing.assert_allclose(out["total"].frequency, top.frequency)
    assert len(out["slots"]) == 4


def test_bad_inputs_are_refused(case):
    _, trains, queries = case
    with pytest.raises(SDIError, match="at least 2"):
        sketch_seeds(TensorSketch(dim=8), 1)
    with pytest.raises(SDIError, match="Exact"):
        sketch_seeds(Exact(), 3)
    with pytest.raises(SDIError, match="same sketch"):
        influence_with_error_bars([trains[0], trains[0]], [queries[0], queries[0]])
    with pytest.raises(SDIError, match="one of each per sketch seed"):
        influence_with_error_bars(trains[:3], queries[:2])
    with pytest.raises(SDIError, match="at least 2"):
        Estimate.of([np.zeros(3)])
