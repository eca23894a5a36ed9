"""sdi_core.metrics against scipy.stats and hand-computed cases; one set of names."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from sdi_core import SDIError
from sdi_core import metrics


def _pair(seed=0, shape=(30, 4, 5)):
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=shape)
    return ref + 0.4 * rng.normal(size=shape), ref


def test_scalar_metrics_match_scipy():
    est, ref = _pair()
    assert metrics.pearson(est, ref) == pytest.approx(stats.pearsonr(est.ravel(), ref.ravel())[0], rel=1e-12)
    assert metrics.spearman(est, ref) == pytest.approx(stats.spearmanr(est.ravel(), ref.ravel())[0], rel=1e-12)
    assert metrics.relative_error(est, ref) == pytest.approx(np.linalg.norm(est - ref) / np.linalg.norm(ref), rel=1e-12)
    assert metrics.relative_error(ref, np.zeros_like(ref)) != metrics.relative_error(ref, np.zeros_like(ref))  # NaN


def test_metrics_along_an_axis_are_one_value_per_row():
    est, ref = _pair(1)
    te, tr = est.sum(2), ref.sum(2)  # [n_train, n_query]
    per_query = metrics.spearman(te, tr, axis=0)
    assert per_query.shape == (4,)
    for j in range(4):
        assert per_query[j] == pytest.approx(stats.spearmanr(te[:, j], tr[:, j])[0], rel=1e-12)
        assert metrics.pearson(te, tr, axis=0)[j] == pytest.approx(stats.pearsonr(te[:, j], tr[:, j])[0], rel=1e-12)
    ties = np.array([[1.0, 1.0, 2.0, 3.0], [0.0, 0.0, 0.0, 1.0]])
    other = np.array([[1.0, 2.0, 2.0, 5.0], [3.0, 1.0, 2.0, 0.0]])
    want = [stats.spearmanr(a, b)[0] for a, b in zip(ties, other)]
    np.testing.assert_allclose(metrics.spearman(ties, other, axis=1), want, rtol=1e-12)


def test_topk_overlap_counts_shared_members():
    exact = np.array([6.0, 5, 4, 3, 2, 1])[:, None]
    swapped = exact.copy()
    swapped[[2, 3]] = swapped[[3, 2]]  # ranks 3 and 4 trade places
    np.testing.assert_allclose(metrics.topk_overlap_curve(swapped, exact, 3)[0], [1.0, 1.0, 2 / 3])
    assert metrics.topk_overlap(swapped, exact, 4)[0] == 1.0
    assert metrics.topk_overlap(-exact, exact, 2)[0] == 0.0


def test_compare_names_and_values():
    est, ref = _pair(2)
    m = metrics.compare(est, ref, k=5)
    assert set(m) == {"rel_error_trajectory", "rel_error_tracin", "rel_error_per_slot", "pearson_trajectory",
                      "pearson_tracin", "pearson_per_slot", "spearman_trajectory", "spearman_tracin",
                      "spearman_per_query", "topk_overlap_tracin", "topk_overlap_per_slot", "topk_overlap_curve", "k"}
    te, tr = est.sum(2), ref.sum(2)
    assert m["spearman_per_query"] == pytest.approx(np.mean([stats.spearmanr(te[:, j], tr[:, j])[0] for j in range(4)]))
    per_slot = np.mean([len(set(np.argsort(-est[:, j, t])[:5]) & set(np.argsort(-ref[:, j, t])[:5])) / 5
                        for j in range(4) for t in range(5)])
    assert m["topk_overlap_per_slot"] == pytest.approx(per_slot)
    for t in range(5):
        assert m["pearson_per_slot"][t] == pytest.approx(stats.pearsonr(est[..., t].ravel(), ref[..., t].ravel())[0])
    with pytest.raises(SDIError, match="same shape"):
        metrics.compare(est, ref[:, :, :2])


def test_metrics_take_any_namespace(xp):
    est, ref = _pair(3, (8, 2, 3))
    got = metrics.compare(xp.asarray(est), xp.asarray(ref), k=3)
    want = metrics.compare(est, ref, k=3)
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-12, err_msg=f"{name} on {xp.__name__}")
