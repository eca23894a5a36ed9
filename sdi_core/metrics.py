"""How close an estimate of influence is to a reference: one set of metrics, one set of names.

Every function takes arrays of any supported library (copied to NumPy,
computed in float64).  With ``axis=None`` a metric is taken over all entries;
with an ``axis`` it is taken along that axis, once for every position of the
other axes (e.g. ``spearman(est, ref, axis=0)`` is one rank correlation over
the train examples per query), and :func:`compare` averages such per-query
values where its names say ``per_query``.

Names (the keys of :func:`compare`) are ``<metric>_<quantity>``:

- metric: ``rel_error`` (``||est - ref||_F / ||ref||_F``), ``pearson``,
  ``spearman`` (Pearson of average ranks, ties sharing their mean rank),
  ``topk_overlap`` (``|top_k(est) & top_k(ref)| / k``, largest first, ties to
  the smaller index);
- quantity: ``trajectory`` (all entries ``I(i, j, t)``), ``tracin`` (the sum
  over slots, ``T(i, j)``), ``per_slot`` (one value per query slot ``t``) and
  ``per_query`` (per query, then averaged).
"""

from __future__ import annotations

import math

import numpy as np

from ._array import to_numpy
from .factors import SDIError

__all__ = ["compare", "pearson", "relative_error", "spearman", "topk_overlap", "topk_overlap_curve"]


def _pair(estimate, reference, what: str) -> tuple[np.ndarray, np.ndarray]:
    e = np.asarray(to_numpy(estimate), dtype=np.float64)
    r = np.asarray(to_numpy(reference), dtype=np.float64)
    if e.shape != r.shape:
        raise SDIError(f"{what}: expected an estimate and a reference of the same shape; got {e.shape} and {r.shape}.")
    return e, r


def _along(x: np.ndarray, axis: int | None) -> np.ndarray:
    """``x`` as ``[..., n]``: all entries in one row (axis None), or ``axis`` moved last."""
    return x.reshape(1, -1) if axis is None else np.moveaxis(x, axis, -1)


def _scalar_or(v: np.ndarray, axis: int | None):
    return float(v.reshape(-1)[0]) if axis is None else v


def relative_error(estimate, reference, axis: int | None = None):
    """``||estimate - reference|| / ||reference||`` (Frobenius over all entries, or along ``axis``); NaN where 0."""
    e, r = _pair(estimate, reference, "relative_error")
    e, r = _along(e, axis), _along(r, axis)
    den = np.linalg.norm(r, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > 0, np.linalg.norm(e - r, axis=-1) / np.where(den > 0, den, 1), np.nan)
    return _scalar_or(out, axis)


def pearson(a, b, axis: int | None = None):
    """Pearson correlation over all entries, or along ``axis``; NaN where either side is constant."""
    a, b = _pair(a, b, "pearson")
    a, b = _along(a, axis), _along(b, axis)
    a, b = a - a.mean(-1, keepdims=True), b - b.mean(-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > 0, (a * b).sum(-1) / np.where(den > 0, den, 1), np.nan)
    return _scalar_or(out, axis)


def spearman(a, b, axis: int | None = None):
    """Spearman rank correlation (average ranks for ties) over all entries, or along ``axis``."""
    from scipy.stats import rankdata

    a, b = _pair(a, b, "spearman")
    a, b = _along(a, axis), _along(b, axis)
    if a.shape[-1] < 2:
        return _scalar_or(np.full(a.shape[:-1], np.nan), axis)
    return pearson(rankdata(a, axis=-1), rankdata(b, axis=-1), axis=None if axis is None else -1)


def _top(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest entries of every row of ``x [..., n]`` (ties to the smaller index)."""
    return np.argsort(-x, axis=-1, kind="stable")[..., :k]


def topk_overlap(estimate, reference, k: int, axis: int = 0):
    """Per position of the other axes, ``|top_k(estimate) & top_k(reference)| / k`` along ``axis``.

    ``axis`` is the axis that is ranked (the train examples: 0).  ``k`` is
    clipped to its length.  Returns an array over the other axes.
    """
    return topk_overlap_curve(estimate, reference, k, axis)[..., -1]


def topk_overlap_curve(estimate, reference, k: int, axis: int = 0):
    """:func:`topk_overlap` for ``1 .. k`` at once: ``[..., k]`` over the other axes."""
    e, r = _pair(estimate, reference, "topk_overlap")
    e, r = np.moveaxis(e, axis, -1), np.moveaxis(r, axis, -1)
    k = int(max(1, min(int(k), e.shape[-1])))
    te, tr = _top(e, k), _top(r, k)
    return np.stack([(te[..., :kk, None] == tr[..., None, :kk]).any(-1).sum(-1) / kk for kk in range(1, k + 1)], -1)


def compare(estimate, reference, k: int = 10) -> dict:
    """All metrics of an estimated query-step trajectory against a reference one.

    Args:
        estimate, reference: ``[n_train, n_query, S]`` trajectories of the same
            examples (e.g. sketched and exact).
        k: size of the top-k sets (clipped to ``n_train``).

    Returns:
        dict with ``rel_error_trajectory``, ``rel_error_tracin``,
        ``rel_error_per_slot [S]``, ``pearson_trajectory``, ``pearson_tracin``,
        ``pearson_per_slot [S]``, ``spearman_trajectory``, ``spearman_tracin``,
        ``spearman_per_query`` (Spearman over train examples of each query's
        TracIn, averaged over queries), ``topk_overlap_tracin`` (averaged over
        queries), ``topk_overlap_per_slot`` (averaged over queries and slots),
        ``topk_overlap_curve [k]`` (TracIn, for ``1..k``) and ``k``.
    """
    e, r = _pair(estimate, reference, "compare")
    if e.ndim != 3:
        raise SDIError(f"compare: expected two [n_train, n_query, S] trajectories of the same shape; got {e.shape}.")
    if e.shape[0] == 0 or e.shape[1] == 0:
        raise SDIError("compare: the comparison needs at least one train and one query example.")
    te, tr = e.sum(axis=2), r.sum(axis=2)
    curve = topk_overlap_curve(te, tr, k).mean(axis=0)
    s_rows = spearman(te, tr, axis=0)
    return {
        "rel_error_trajectory": relative_error(e, r),
        "rel_error_tracin": relative_error(te, tr),
        "rel_error_per_slot": [float(v) for v in relative_error(e.reshape(-1, e.shape[2]), r.reshape(-1, e.shape[2]), 0)],
        "pearson_trajectory": pearson(e, r),
        "pearson_tracin": pearson(te, tr),
        "pearson_per_slot": [float(v) for v in pearson(e.reshape(-1, e.shape[2]), r.reshape(-1, e.shape[2]), 0)],
        "spearman_trajectory": spearman(e, r),
        "spearman_tracin": spearman(te, tr),
        "spearman_per_query": float(np.nanmean(s_rows)) if np.isfinite(s_rows).any() else math.nan,
        "topk_overlap_tracin": float(curve[-1]),
        "topk_overlap_per_slot": float(topk_overlap(e, r, k).mean()),
        "topk_overlap_curve": [float(v) for v in curve],
        "k": int(max(1, min(int(k), e.shape[0]))),
    }
