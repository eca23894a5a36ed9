"""sdi_core.validate: statistics against independent computations, and the retraining harness on a
deterministic NumPy retrainer (ridge regression) with a planted case."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import spearmanr

from sdi_core import SDIError
from sdi_core.validate import (
    Attributions,
    RetrainCache,
    RetrainJob,
    ValidationConfig,
    counterfactual_effects,
    counterfactual_jobs,
    linear_datamodeling_score,
    mislabel_detection,
    random_subsets,
    run_jobs,
    validate,
)


class RidgeRetrainer:
    """A two-"step" ridge regression: readout step t uses the first t * d / 2 input features.

    Deterministic, closed form, picklable: retraining is exact, so the harness's bookkeeping
    can be checked without training noise.
    """

    readout_steps = (1, 2)

    def __init__(self, x, y, xq, yq, lam=1e-2):
        self.x, self.y, self.xq, self.yq, self.lam = x, y, xq, yq, lam
        self.n_train, self.n_query = x.shape[0], xq.shape[0]
        self.calls = 0

    def config(self):
        return {"kind": "ridge", "lam": self.lam, "n": int(self.n_train), "sum_y": float(self.y.sum())}

    def setup_worker(self):
        pass

    def initial_weights(self, seed):
        d = self.x.shape[1]
        return {f"w{t}": np.zeros(t * d // 2) for t in self.readout_steps}

    def retrain(self, idx, seed):
        self.calls += 1
        d = self.x.shape[1]
        out = {}
        for t in self.readout_steps:
            xs = self.x[idx, : t * d // 2]
            out[f"w{t}"] = np.linalg.solve(xs.T @ xs + self.lam * np.eye(xs.shape[1]), xs.T @ self.y[idx])
        return out

    def weights(self, model):
        return model

    def query_losses(self, model, steps):
        d = self.x.shape[1]
        return np.stack([(self.xq[:, : t * d // 2] @ model[f"w{t}"] - self.yq) ** 2 for t in steps])


class UnchangedRetrainer(RidgeRetrainer):
    def retrain(self, idx, seed):
        return self.initial_weights(seed)


def _planted(n_clean=60, n_dup=15, d=6, seed=0):
    """Clean linear data plus one outlier point duplicated ``n_dup`` times; the query is that point."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    x = rng.normal(size=(n_clean, d))
    y = x @ w + 0.1 * rng.normal(size=n_clean)
    xq = rng.normal(size=(1, d))
    yq = xq @ w + 6.0  # far off the clean fit
    x = np.concatenate([x, np.repeat(xq, n_dup, axis=0)])
    y = np.concatenate([y, np.repeat(yq, n_dup)])
    perm = rng.permutation(len(y))
    dup = np.flatnonzero(perm >= n_clean)
    return x[perm], y[perm], xq, yq, dup


def _grad_dot_scores(r: RidgeRetrainer, steps=(1, 2)):
    """Per-step gradient dot products of the full model (a TracIn with one checkpoint): [N, Q, S]."""
    full = r.retrain(np.arange(r.n_train), 0)
    d = r.x.shape[1]
    out = []
    for t in steps:
        k = t * d // 2
        w = full[f"w{t}"]
        gi = (r.x[:, :k] @ w - r.y)[:, None] * r.x[:, :k]
        gq = (r.xq[:, :k] @ w - r.yq)[:, None] * r.xq[:, :k]
        out.append(gi @ gq.T)  # positive: a descent step on i lowers the query loss
    return np.stack(out, axis=-1)


def test_lds_equals_scipy_spearman_per_query_and_interval_brackets_it():
    rng = np.random.default_rng(1)
    n, q, m = 40, 5, 30
    scores = rng.normal(size=(n, q))
    masks = random_subsets(n, m, 0.5, seed=3)
    loss = -(masks @ scores) + rng.normal(scale=2.0, size=(m, q))
    r = linear_datamodeling_score(scores, masks, loss, n_boot=300, seed=0)
    want = [spearmanr(masks.astype(float) @ scores[:, j], -loss[:, j]).statistic for j in range(q)]
    np.testing.assert_allclose(r.per_query, want, rtol=1e-12, atol=1e-12)
    assert r.mean == pytest.approx(np.mean(want), abs=1e-12)
    assert r.ci_low <= r.mean <= r.ci_high and r.ci_high - r.ci_low > 0
    assert r.mean > 0.3  # the losses were built to follow the scores


def test_random_subsets_are_distinct_halves_and_bad_counts_are_refused():
    masks = random_subsets(20, 10, 0.5, seed=0)
    assert masks.shape == (10, 20) and np.all(masks.sum(1) == 10)
    assert len({row.tobytes() for row in masks}) == 10
    with pytest.raises(SDIError, match="exceeds the 20 training examples"):
        random_subsets(20, 21, 0.5, seed=0)
    with pytest.raises(SDIError, match="strictly between 0 and 1"):
        random_subsets(20, 4, 1.0, seed=0)


def test_mislabel_auc_equals_pair_count_and_top_fraction():
    rng = np.random.default_rng(2)
    s = rng.normal(size=50)
    s[:5] = s[:5].round(1)  # some ties
    flipped = np.zeros(50, dtype=bool)
    flipped[rng.choice(50, 8, replace=False)] = True
    r = mislabel_detection(s, flipped, inspect=0.1)
    pos, neg = s[flipped], s[~flipped]
    want = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    assert r.auc == pytest.approx(want, abs=1e-12)
    top = np.argsort(-s, kind="stable")[:5]
    assert r.found_at == pytest.approx(flipped[top].sum() / 8)
    assert r.curve[0, 1] == 0 and r.curve[-1, 1] == 1
    with pytest.raises(SDIError, match="both flipped and clean"):
        mislabel_detection(s, np.zeros(50, bool))


def test_planted_duplicates_are_found_and_their_removal_moves_the_query_loss():
    x, y, xq, yq, dup = _planted()
    r = RidgeRetrainer(x, y, xq, yq)
    traj = _grad_dot_scores(r)
    plan = counterfactual_jobs(traj, traj.sum(-1), queries=[0], k=len(dup), n_random=4, seeds=[0], seed=0)
    # The harness finds the planted duplicates: the top-k by TracIn and by every step are exactly them.
    assert set(plan["removed"][("tracin", 0)].tolist()) == set(dup.tolist())
    for st in range(2):
        assert set(plan["removed"][("sdi", 0, st)].tolist()) == set(dup.tolist())
    jobs = [j for part in ("full", "sdi", "tracin", "random") for j in plan[part].values()]
    losses = run_jobs(r, jobs, progress=False)
    res = counterfactual_effects(plan, losses, steps=(1, 2), queries=[0], seeds=[0], k=len(dup))
    # Independent check of one effect: retrain by hand without the duplicates.
    keep = np.setdiff1d(np.arange(len(y)), dup)
    by_hand = r.query_losses(r.retrain(keep, 0), (1, 2))[:, 0] - r.query_losses(r.retrain(np.arange(len(y)), 0), (1, 2))[:, 0]
    np.testing.assert_allclose(res.delta["tracin"][0, :, 0], by_hand, rtol=1e-10)
    assert np.all(res.mean["tracin"] > 5 * np.abs(res.mean["random"]))
    assert np.all(res.mean["tracin"] > 1.0)


def test_validate_end_to_end_with_cache_resume_and_workers(tmp_path):
    x, y, xq, yq, _ = _planted(n_clean=40, n_dup=8)
    rng = np.random.default_rng(0)
    xq = np.concatenate([xq, rng.normal(size=(2, x.shape[1]))])
    yq = np.concatenate([yq, rng.normal(size=2)])
    r = RidgeRetrainer(x, y, xq, yq)
    traj = _grad_dot_scores(r)
    attr = Attributions(traj, traj.sum(-1), last_checkpoint=traj.sum(-1))
    cfg = ValidationConfig(n_subsets=12, seeds=(0,), removal_k=8, counterfactual_queries=2, n_random=2, n_boot=50)
    before = r.calls
    res = validate(r, attr, cfg, cache_dir=tmp_path / "cache", workers=1, progress=False)
    first_calls = r.calls - before
    # 12 LDS subsets, the full model, 2 x 2 step removals, 2 TracIn and 2 random removals; equal kept sets run once.
    assert first_calls == res.n_retrained <= 12 + 1 + 2 * 2 + 2 + 2
    assert res.lds["tracin"].mean == pytest.approx(res.lds["sdi_step_sum"].mean, abs=1e-12)
    json.dumps(res.to_dict())  # serialisable
    again = validate(r, attr, cfg, cache_dir=tmp_path / "cache", workers=1, progress=False)
    assert r.calls - before == first_calls, "a rerun must take every retraining from the cache"
    np.testing.assert_array_equal(again.counterfactual.delta["sdi"], res.counterfactual.delta["sdi"])
    parallel = validate(RidgeRetrainer(x, y, xq, yq), attr, cfg, cache_dir=tmp_path / "cache2", workers=2,
                        progress=False)
    np.testing.assert_allclose(parallel.counterfactual.delta["sdi"], res.counterfactual.delta["sdi"], rtol=1e-12)
    assert parallel.lds["tracin"].mean == pytest.approx(res.lds["tracin"].mean, abs=1e-12)


def test_cache_of_another_configuration_is_refused(tmp_path):
    x, y, xq, yq, _ = _planted()
    RetrainCache(tmp_path, RidgeRetrainer(x, y, xq, yq).config())
    with pytest.raises(SDIError, match=r"another configuration \(retrainer\.lam: cached 0\.01, now 0\.5"):
        RetrainCache(tmp_path, RidgeRetrainer(x, y, xq, yq, lam=0.5).config())


def test_bad_inputs_are_refused():
    x, y, xq, yq, _ = _planted(n_clean=10, n_dup=2)
    r = RidgeRetrainer(x, y, xq, yq)
    traj = _grad_dot_scores(r)
    attr = Attributions(traj, traj.sum(-1))
    with pytest.raises(SDIError, match="exceeds the 12 training examples"):
        validate(r, attr, ValidationConfig(n_subsets=13, seeds=(0,), counterfactual_queries=0), progress=False)
    with pytest.raises(SDIError, match="returned the initial model unchanged"):
        run_jobs(UnchangedRetrainer(x, y, xq, yq), [RetrainJob(tuple(range(6)), 0)], progress=False)
    with pytest.raises(SDIError, match="step slots"):
        validate(r, Attributions(traj, traj.sum(-1), step_slots=(0,)), ValidationConfig(n_subsets=4, seeds=(0,)),
                 progress=False)
    with pytest.raises(SDIError, match="k=12"):
        counterfactual_jobs(traj, traj.sum(-1), queries=[0], k=12, n_random=0, seeds=[0])
    bad = traj.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(SDIError, match="NaN"):
        Attributions(bad, traj.sum(-1))
