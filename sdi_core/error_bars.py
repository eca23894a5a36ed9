"""Error bars from independent sketches: mean and standard error of every result of the algebra.

A TensorSketch inner product is an unbiased estimate of the exact one, and
sketches drawn with different seeds are independent.  Featurising with ``R``
seeds (:func:`sketch_seeds`, :func:`featurize_seeds`) and scoring each draw
gives ``R`` independent estimates; their mean is the estimate to report (it
equals one sketch ``R`` times larger) and their standard error
``std(ddof=1) / sqrt(R)`` is its error bar.  ``mean +- 2 SE`` covers the exact
value for about 95 % of entries when ``R`` is not tiny (a Student-t with
``R - 1`` degrees of freedom: 91 % at ``R = 8``, 94 % at ``R = 16``).

- :func:`influence_with_error_bars` (in memory): :class:`SeededInfluence` with
  ``trajectory``, ``tracin``, ``train_trajectory``, ``step_matrix`` as
  :class:`Estimate` and :meth:`SeededInfluence.top_k` with rank stability
  (:class:`TopKStability`): the top-k of the mean, exactly, streamed over
  train blocks, how often each winner is in a single seed's top-k, and how much
  the seeds' top-k sets overlap.
- :func:`score_stores_with_error_bars` (on disk, one store per seed): the same
  top-k stability from :func:`sdi_core.scoring.score_store` per seed; the
  top-k of the mean is taken among the union of the seeds' top-k lists
  (which holds it unless a winner of the mean is in no seed's top-k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np

from ._array import array_namespace, to_numpy
from .algebra import InfluenceResult, TopK, influence
from .factors import SDIError
from .features import Features
from .specs import TensorSketch
from .topk import make_merger

__all__ = [
    "Estimate",
    "TopKStability",
    "SeededInfluence",
    "sketch_seeds",
    "featurize_seeds",
    "influence_with_error_bars",
    "score_stores_with_error_bars",
]


def sketch_seeds(sketch: TensorSketch, n_seeds: int) -> list[TensorSketch]:
    """``n_seeds`` independent copies of ``sketch``: seeds ``sketch.seed, sketch.seed + 1, ...``."""
    if not isinstance(sketch, TensorSketch):
        raise SDIError(f"sketch_seeds needs a TensorSketch (an Exact feature set has no sketch error), "
                       f"got {type(sketch).__name__}.")
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, (int, np.integer)) or n_seeds < 2:
        raise SDIError(f"n_seeds={n_seeds!r}: error bars need at least 2 independent sketches.")
    return [replace(sketch, seed=sketch.seed + r) for r in range(int(n_seeds))]


def featurize_seeds(featurize: Callable[[TensorSketch], Features], sketch: TensorSketch, n_seeds: int) -> list[Features]:
    """``[featurize(s) for s in sketch_seeds(sketch, n_seeds)]``; ``featurize`` builds features with sketch ``s``.

    Example (PyTorch)::

        feats = featurize_seeds(lambda s: sdi_torch.Attributor(model, loop, loss, sketch=s).featurize(batches),
                                TensorSketch(dim=2048, seed=0), 8)
    """
    return [featurize(s) for s in sketch_seeds(sketch, n_seeds)]


@dataclass(frozen=True)
class Estimate:
    """The mean of ``n_seeds`` independent estimates and its standard error (same namespace and shape).

    Attributes:
        mean: the average over seeds.
        se: ``std(ddof=1) / sqrt(n_seeds)``.
        n_seeds: ``R``.
    """

    mean: Any
    se: Any
    n_seeds: int

    def interval(self, z: float = 2.0):
        """``(mean - z * se, mean + z * se)``."""
        return self.mean - z * self.se, self.mean + z * self.se

    @staticmethod
    def of(values: Sequence[Any]) -> "Estimate":
        """Mean and standard error of a sequence of same-shape arrays (any namespace)."""
        values = list(values)
        if len(values) < 2:
            raise SDIError("Estimate.of needs at least 2 independent estimates.")
        xp = array_namespace(*values)
        stack = xp.stack(values, axis=0)
        return Estimate(xp.mean(stack, axis=0), xp.std(stack, axis=0, correction=1) / math.sqrt(len(values)),
                        len(values))


@dataclass(frozen=True)
class TopKStability:
    """Top-k of the mean over seeds, with how stable the ranking is across seeds.

    Attributes:
        indices, ids: ``[N_query, k]`` train positions and ids of the top-k by
            the mean score (most influential first).
        scores: :class:`Estimate` of their scores ``[N_query, k]``.
        frequency: ``[N_query, k]`` fraction of seeds whose own top-k holds the winner.
        overlap: ``[N_query]`` mean over pairs of seeds of ``|top_k(a) & top_k(b)| / k``.
    """

    indices: np.ndarray
    ids: np.ndarray
    scores: Estimate
    frequency: np.ndarray
    overlap: np.ndarray


def _stability(per_seed: Sequence[np.ndarray], winners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frequency of each winner in the seeds' top-k index sets, and their mean pairwise overlap."""
    r = len(per_seed)
    freq = np.mean([(winners[:, :, None] == s[:, None, :]).any(-1) for s in per_seed], axis=0)
    pairs = [(a, b) for a in range(r) for b in range(a + 1, r)]
    overlap = np.mean([(per_seed[a][:, :, None] == per_seed[b][:, None, :]).any(-1).sum(-1) / max(per_seed[a].shape[1], 1)
                       for a, b in pairs], axis=0)
    return freq, overlap


class SeededInfluence:
    """:class:`~sdi_core.algebra.InfluenceResult` of ``R`` independent sketches, as mean and standard error.

    Dense results are :class:`Estimate` objects in the features' namespace:
    ``trajectory`` ``[N_train, N_query, S_query]``, ``tracin`` ``[N_train,
    N_query]``, ``train_trajectory`` and ``step_matrix`` (per-step train
    features).  The conservation ``sum_t trajectory.mean = tracin.mean`` holds
    exactly, as for every single draw.
    """

    def __init__(self, results: Sequence[InfluenceResult]) -> None:
        self.results = list(results)
        if len(self.results) < 2:
            raise SDIError("SeededInfluence needs the results of at least 2 independent sketches.")
        fps = [r.train.layout.sketch for r in self.results]
        if any(fp == fps[0] for fp in fps[1:]):
            raise SDIError("SeededInfluence: two results come from the same sketch (same seed); error bars need "
                           "independent sketches, e.g. sdi_core.error_bars.sketch_seeds(sketch, R).")
        n = {(r.train.n_examples, r.query.n_examples, r.query.n_slots) for r in self.results}
        if len(n) != 1:
            raise SDIError(f"SeededInfluence: the results cover different examples or slots {sorted(n)}; "
                           "featurise the same train and query examples with every seed.")
        self.n_seeds = len(self.results)
        self._cache: dict[str, Estimate] = {}

    def _estimate(self, name: str) -> Estimate:
        if name not in self._cache:
            self._cache[name] = Estimate.of([getattr(r, name) for r in self.results])
        return self._cache[name]

    @property
    def trajectory(self) -> Estimate:
        return self._estimate("trajectory")

    @property
    def tracin(self) -> Estimate:
        return self._estimate("tracin")

    @property
    def train_trajectory(self) -> Estimate:
        return self._estimate("train_trajectory")

    @property
    def step_matrix(self) -> Estimate:
        return self._estimate("step_matrix")

    @property
    def query_slot_labels(self) -> list[str]:
        return self.results[0].query_slot_labels

    def top_k(self, k: int, step: int | None = None, *, largest: bool = True) -> TopKStability:
        """Top-``k`` of the mean score (TracIn, or query slot ``step``), streamed over train blocks, with stability."""
        first = self.results[0]
        per_seed = [r.top_k(k, step, largest=largest) for r in self.results]  # validates k and step
        k = per_seed[0].indices.shape[1]
        step = None if step is None else int(step) % first.query.n_slots
        mode = "tracin" if step is None else "query"
        mergers: dict[int, Any] = {}
        for tiles in zip(*(r.iter_blocks(mode) for r in self.results)):
            i, j = tiles[0][0], tiles[0][1]
            mean = tiles[0][2]
            for t in tiles[1:]:
                mean = mean + t[2]
            mean = mean / self.n_seeds
            if j.start not in mergers:
                mergers[j.start] = make_merger(first.xp, j.stop - j.start, k, largest, first._dtype,
                                               first._query(j).device)
            mergers[j.start].update(mean if step is None else mean[:, :, step], i.start)
        parts = [m.result() for m in mergers.values()]
        idx = np.concatenate([p[0] for p in parts])
        rows = np.unique(idx)
        col = np.searchsorted(rows, idx)  # [Q, k] positions into `rows`
        q = np.arange(idx.shape[0])[:, None]
        scores = []
        for r in self.results:
            sub = influence(r.train.select(rows), r.query, normalize=r.normalize)
            dense = to_numpy(sub.tracin if step is None else sub.trajectory[:, :, step])  # [len(rows), Q]
            scores.append(np.asarray(dense, dtype=np.float64)[col, q])
        freq, overlap = _stability([t.indices for t in per_seed], idx)
        ids = idx if first.train.example_ids is None else first.train.example_ids[idx]
        return TopKStability(idx, ids, Estimate.of(scores), freq, overlap)


def influence_with_error_bars(trains: Sequence[Features], queries: Sequence[Features], **kwargs: Any) -> SeededInfluence:
    """:func:`sdi_core.influence` of each seed's ``(train, query)`` pair, combined into :class:`SeededInfluence`.

    Args:
        trains, queries: features of the same examples featurised with ``R``
            independent sketches (seed ``r`` in position ``r`` of both).
        kwargs: passed to :func:`sdi_core.influence` (``normalize``, block sizes).
    """
    trains, queries = list(trains), list(queries)
    if len(trains) != len(queries):
        raise SDIError(f"influence_with_error_bars: {len(trains)} train feature sets but {len(queries)} query "
                       "feature sets; pass one of each per sketch seed, in the same seed order.")
    return SeededInfluence([influence(t, q, **kwargs) for t, q in zip(trains, queries)])


def score_stores_with_error_bars(stores: Sequence[Any], queries: Sequence[Features], *, k: int = 10,
                                 **kwargs: Any) -> dict:
    """:func:`sdi_core.scoring.score_store` per seed (one store and one query set per seed), combined.

    Returns:
        dict with ``"per_seed"`` (the :class:`~sdi_core.scoring.StreamedScores`),
        ``"total"`` (:class:`TopKStability` by TracIn), ``"slots"`` (one
        :class:`TopKStability` per query slot) and, for each dense output that
        was asked for (``dense=...``), its :class:`Estimate` under its name.
        The top-k of the mean is taken among the union of the seeds' top-k
        lists, and scored exactly from every seed's rows.
    """
    from .scoring import _source, score_store

    stores, queries = list(stores), list(queries)
    if len(stores) != len(queries) or len(stores) < 2:
        raise SDIError(f"score_stores_with_error_bars: pass one store and one query set per seed (at least 2); "
                       f"got {len(stores)} stores and {len(queries)} query sets.")
    per_seed = [score_store(s, q, k=k, **kwargs) for s, q in zip(stores, queries)]
    out: dict[str, Any] = {"per_seed": per_seed}
    for name in ("trajectory", "tracin", "train_trajectory", "step_matrix"):
        vals = [getattr(p, name) for p in per_seed]
        if all(v is not None for v in vals):
            out[name] = Estimate.of(vals)
    sources = [_source(s, "train") for s in stores]
    largest = per_seed[0].largest

    def combine(tops: list[TopK], step: int | None) -> TopKStability:
        cand = np.unique(np.concatenate([t.indices.reshape(-1) for t in tops]))
        scores = []  # [R, Q, len(cand)] exact per-seed scores of every candidate
        for src, q in zip(sources, queries):
            rows = src.as_features().select(cand) if hasattr(src, "as_features") else src.select(cand)
            res = influence(rows, q, normalize=kwargs.get("normalize"))
            dense = res.tracin if step is None else res.trajectory[:, :, step]
            scores.append(np.asarray(to_numpy(dense), dtype=np.float64).T)
        scores = np.stack(scores)
        mean = scores.mean(0)
        kk = tops[0].indices.shape[-1]
        order = np.argsort(-mean if largest else mean, axis=1, kind="stable")[:, :kk]
        idx = cand[order]
        q = np.arange(idx.shape[0])[:, None]
        picked = scores[:, q, order]
        freq, overlap = _stability([t.indices for t in tops], idx)
        ex = getattr(sources[0], "example_ids", None)
        ids = idx if ex is None else np.asarray(ex)[idx]
        return TopKStability(idx, ids, Estimate.of(list(picked)), freq, overlap)

    if all(p.total_topk is not None for p in per_seed):
        out["total"] = combine([p.total_topk for p in per_seed], None)
    if all(p.slot_topk is not None for p in per_seed):
        n_slots = per_seed[0].slot_topk.indices.shape[1]
        out["slots"] = [combine([TopK(p.slot_topk.indices[:, t], p.slot_topk.scores[:, t], p.slot_topk.ids[:, t])
                                 for p in per_seed], t) for t in range(n_slots)]
    return out
