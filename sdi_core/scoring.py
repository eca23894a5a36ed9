"""Streamed scoring: influence of a train store (larger than memory) on in-memory queries.

The train side is read block by block from a :class:`~sdi_core.store.FeatureStore`
(memory maps, no copy when a block sits in one shard); the query side is held
in memory, already scaled by ``eta_k``.  For every block the work is one GEMM
per checkpoint and group,

    tile[(j, t), i] = sum_k eta_k <Q_k(j, t), T_k(i)>      [N_query * S_query, block]

(``T_k`` the train features summed over their steps), followed by a running
top-k merge that touches each score once: a comparison against the current
k-th best of every row, and an exact merge of the few candidates that beat it.

Results (:class:`StreamedScores`): top-k train examples for every query and
query slot, and for every query in total (TracIn), plus dense arrays only
when asked and when they fit the memory budget.  Memory stays under
``budget`` bytes: the block size is derived from it.

Exactness: in float64 every number equals :func:`sdi_core.influence` to float
rounding (different blocking changes only the order of additions), and top-k
ties are broken as there: the smaller train index wins.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from ._array import to_numpy
from .algebra import NORMALIZE, TopK
from .factors import SDIError
from .features import Features
from .store import FeatureStore

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_BLOCK_ROWS",
    "DENSE_KINDS",
    "BlockPlan",
    "StreamedScores",
    "SelfInfluence",
    "score_store",
    "self_influence_store",
    "plan_blocks",
    "parse_bytes",
]

DEFAULT_BUDGET = 1 << 30
DENSE_KINDS = ("trajectory", "tracin", "train_trajectory", "step_matrix")
_MERGE_BYTES_MAX = 64 << 20  # scratch memory of the top-k merge
_PRIME_COLUMNS = 1024  # train rows used to set the first top-k thresholds exactly
# Default cap on train rows per block: the GEMM is as fast on 8192 rows as on more, and smaller
# tiles are cheaper to scan for top-k candidates and leave the rest of the budget unused.
DEFAULT_BLOCK_ROWS = 8192


def parse_bytes(value: str | int) -> int:
    """``"2GiB"``, ``"512MB"``, ``"1e9"`` or an int -> bytes."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        n = int(value)
    else:
        s = str(value).strip().lower().replace(" ", "")
        units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
                 "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 1 << 10, "m": 1 << 20,
                 "g": 1 << 30, "t": 1 << 40, "b": 1}
        mult = 1
        for u in sorted(units, key=len, reverse=True):
            if s.endswith(u):
                mult, s = units[u], s[: -len(u)]
                break
        try:
            n = int(float(s) * mult)
        except ValueError:
            raise SDIError(f"Cannot read a memory size from {value!r}; write e.g. '2GiB', '512MiB' or 1000000000.") from None
    if n <= 0:
        raise SDIError(f"Memory budget must be positive, got {value!r}.")
    return n


# --------------------------------------------------------------------------- top-k merge


class _TopKMerger:
    """Running top-k over train rows, for each of ``rows`` score columns (query slots).

    Scores arrive in blocks ``[b, rows]`` (train rows of the block x query
    slots), exactly as the scoring GEMM writes them.  Order: score
    descending (ascending when ``largest`` is False), then train index
    ascending, as :meth:`sdi_core.InfluenceResult.top_k`.  Scores are kept
    in the *key* space ``key = -score`` (largest) or ``score``, so "better"
    always means "smaller key".
    """

    def __init__(self, rows: int, k: int, largest: bool, dtype, merge_bytes: int) -> None:
        self.rows, self.k, self.largest = rows, k, largest
        self.dtype = np.dtype(dtype)
        self.keys = np.full((rows, k), np.inf, dtype=self.dtype)
        self.index = np.full((rows, k), -1, dtype=np.int64)
        self.seen = 0
        self.merge_bytes = merge_bytes
        self._mask = None

    # -- public
    def update(self, scores: np.ndarray, offset: int) -> None:
        """Merge ``scores [b, rows]`` of train rows ``offset .. offset + b``."""
        b = scores.shape[0]
        pos = 0
        while pos < b:
            if self.seen < self.k:
                # Too few train rows seen for a threshold: merge a first chunk exactly.
                n = min(b - pos, max(_PRIME_COLUMNS, self.k))
                self._exact(scores[pos : pos + n], offset + pos)
            else:
                # Chunks at most a few times the rows seen so far keep the number of
                # candidates per query slot small (about k * log(chunk / seen)).
                n = min(b - pos, max(4 * self.seen, 4096))
                self._filtered(scores[pos : pos + n], offset + pos)
            self.seen += n
            pos += n

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(indices [rows, k], scores [rows, k] float64)``, best first."""
        scores = self.keys.astype(np.float64)
        return self.index.copy(), (-scores if self.largest else scores)

    # -- internals
    def _mask_buffer(self, shape) -> np.ndarray:
        size = shape[0] * shape[1]
        if self._mask is None or self._mask.size < size:
            self._mask = np.empty(size, dtype=bool)
        return self._mask[:size].reshape(shape)

    def _filtered(self, scores: np.ndarray, offset: int) -> None:
        # A train row can only enter a slot's top-k if it beats the current k-th
        # best strictly (ties go to the smaller index, which is already in).
        kth = self.keys[:, self.k - 1][None, :]
        mask = self._mask_buffer(scores.shape)
        if self.largest:
            np.less(-kth, scores, out=mask)  # score > k-th best score
        else:
            np.less(scores, kth, out=mask)
        flat = np.flatnonzero(mask)  # one pass; far faster than a 2-D nonzero
        if flat.size == 0:
            return
        train = flat // self.rows
        slots = flat - train * self.rows
        counts = np.bincount(slots, minlength=self.rows)
        live = np.flatnonzero(counts)
        cmax = int(counts.max())
        width = self.k + cmax
        if len(live) * width * 24 > self.merge_bytes:
            # Too many candidates for a padded merge (e.g. sorted input): exact merge in chunks.
            self._exact(scores, offset)
            return
        by_slot = np.argsort(slots, kind="stable")  # slot-major, train rows ascending within a slot
        train, slots = train[by_slot], slots[by_slot]
        where = np.searchsorted(live, slots)
        first = np.cumsum(counts[live]) - counts[live]
        pos = np.arange(slots.size) - first[where]
        keys = np.full((len(live), width), np.inf, dtype=self.dtype)
        index = np.full((len(live), width), np.iinfo(np.int64).max, dtype=np.int64)
        keys[:, : self.k] = self.keys[live]
        index[:, : self.k] = self.index[live]
        vals = scores[train, slots].astype(self.dtype, copy=False)
        keys[where, self.k + pos] = -vals if self.largest else vals
        index[where, self.k + pos] = train + offset
        # Stable: current entries (smaller indices) first, then candidates by index.
        order = np.argsort(keys, axis=1, kind="stable")[:, : self.k]
        self.keys[live] = np.take_along_axis(keys, order, axis=1)
        self.index[live] = np.take_along_axis(index, order, axis=1)

    def _exact(self, scores: np.ndarray, offset: int) -> None:
        """Merge all train rows of ``scores [b, rows]`` exactly, in slot chunks that fit the scratch memory."""
        b = scores.shape[0]
        k = self.k
        width = k + b
        chunk = max(1, self.merge_bytes // (width * 20))
        for r0 in range(0, self.rows, chunk):
            r1 = min(self.rows, r0 + chunk)
            s = scores[:, r0:r1].T.astype(self.dtype, copy=False)
            keys = np.concatenate([self.keys[r0:r1], -s if self.largest else s], axis=1)
            kth = np.partition(keys, k - 1, axis=1)[:, k - 1 : k]
            better = keys < kth
            need = k - np.count_nonzero(better, axis=1)
            tie = keys == kth
            # Among ties with the k-th key keep the leftmost (smallest train index) ones.
            take = better | (tie & (np.cumsum(tie, axis=1, dtype=np.int32) <= need[:, None]))
            pos = (np.flatnonzero(take) % width).reshape(r1 - r0, k)
            sel = np.take_along_axis(keys, pos, axis=1)
            old = np.take_along_axis(self.index[r0:r1], np.minimum(pos, k - 1), axis=1)
            idx = np.where(pos < k, old, pos - k + offset)
            order = np.argsort(sel, axis=1, kind="stable")
            self.keys[r0:r1] = np.take_along_axis(sel, order, axis=1)
            self.index[r0:r1] = np.take_along_axis(idx, order, axis=1)


def _topk_order(scores: np.ndarray, index: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """Positions of the top ``k`` along the last axis of candidate ``scores``/``index``: ties by smaller index."""
    key = -scores if largest else scores
    return np.lexsort((index, key), axis=-1)[..., :k]


# --------------------------------------------------------------------------- results


@dataclass
class StreamedScores:
    """Results of :func:`score_store` over train rows ``rows[0] .. rows[1]``.

    Attributes:
        slot_topk: :class:`~sdi_core.algebra.TopK` with ``[N_query, S_query, k]``
            arrays: for every query and query slot the ``k`` train examples with
            the largest (``largest=False``: smallest) trajectory value
            ``I(i, j, t)``.  ``indices`` are train row positions, ``ids`` the
            train example ids.  None when not asked for.
        total_topk: :class:`TopK` with ``[N_query, k]`` arrays, ranked by TracIn.
        trajectory: ``[rows, N_query, S_query]`` when asked for, else None.
        tracin: ``[rows, N_query]`` when asked for, else None.
        train_trajectory: ``[rows, N_query, S_train]`` when asked for, else None.
        step_matrix: ``[rows, N_query, S_train, S_query]`` when asked for, else None.
        slot_labels: labels of the query slots (``["loop[0]", ...]``).
        train_slot_labels: labels of the train slots.
        rows: ``(start, stop)`` train rows covered (all of them unless split by rank).
        n_train: train rows in the store.
        query_ids: ids of the query examples (positions when they carry none).
        block_rows: train rows per block used.
    """

    slot_topk: TopK | None
    total_topk: TopK | None
    slot_labels: list[str]
    train_slot_labels: list[str]
    rows: tuple[int, int]
    n_train: int
    query_ids: np.ndarray
    k: int
    largest: bool
    block_rows: int
    trajectory: np.ndarray | None = None
    tracin: np.ndarray | None = None
    train_trajectory: np.ndarray | None = None
    step_matrix: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @staticmethod
    def merge(parts: Sequence["StreamedScores"]) -> "StreamedScores":
        """Combine the results of ranks that scored disjoint, adjacent train row ranges."""
        parts = sorted(parts, key=lambda p: p.rows[0])
        if not parts:
            raise SDIError("StreamedScores.merge needs at least one part.")
        first = parts[0]
        for a, b in zip(parts, parts[1:]):
            if a.rows[1] != b.rows[0]:
                raise SDIError(f"StreamedScores.merge: row ranges {a.rows} and {b.rows} are not adjacent.")
            if (a.k, a.largest, a.slot_labels) != (b.k, b.largest, b.slot_labels):
                raise SDIError("StreamedScores.merge: parts were scored with different k, order or query slots.")

        def merge_topk(tops: list[TopK | None]) -> TopK | None:
            if tops[0] is None:
                return None
            idx = np.concatenate([t.indices for t in tops], axis=-1)
            sc = np.concatenate([t.scores for t in tops], axis=-1)
            ids = np.concatenate([t.ids for t in tops], axis=-1)
            order = _topk_order(sc, idx, first.k, first.largest)
            return TopK(*(np.take_along_axis(a, order, axis=-1) for a in (idx, sc, ids)))

        def cat(name: str):
            arrs = [getattr(p, name) for p in parts]
            return None if arrs[0] is None else np.concatenate(arrs, axis=0)

        return StreamedScores(
            slot_topk=merge_topk([p.slot_topk for p in parts]),
            total_topk=merge_topk([p.total_topk for p in parts]),
            slot_labels=first.slot_labels,
            train_slot_labels=first.train_slot_labels,
            rows=(parts[0].rows[0], parts[-1].rows[1]),
            n_train=first.n_train,
            query_ids=first.query_ids,
            k=first.k,
            largest=first.largest,
            block_rows=first.block_rows,
            trajectory=cat("trajectory"),
            tracin=cat("tracin"),
            train_trajectory=cat("train_trajectory"),
            step_matrix=cat("step_matrix"),
            meta=dict(first.meta),
        )

    def to_npz(self, path: str | os.PathLike) -> None:
        """Save every computed array (and the labels) to a ``.npz`` file."""
        arrays: dict[str, Any] = {
            "slot_labels": np.asarray(self.slot_labels),
            "train_slot_labels": np.asarray(self.train_slot_labels),
            "rows": np.asarray(self.rows),
            "query_ids": self.query_ids,
        }
        for name in ("slot_topk", "total_topk"):
            t = getattr(self, name)
            if t is not None:
                arrays[f"{name}_indices"] = t.indices
                arrays[f"{name}_scores"] = t.scores
                arrays[f"{name}_ids"] = t.ids
        for name in DENSE_KINDS:
            a = getattr(self, name)
            if a is not None:
                arrays[name] = a
        np.savez(os.fspath(path), **arrays)

    def table(self, max_queries: int | None = 20) -> str:
        """A plain-text table: for each query, its top train ids in total and per slot."""
        lines = []
        nq = len(self.query_ids)
        shown = nq if max_queries is None else min(nq, max_queries)
        for j in range(shown):
            lines.append(f"query {self.query_ids[j]}:")
            if self.total_topk is not None:
                lines.append("  total   " + _fmt(self.total_topk.ids[j], self.total_topk.scores[j]))
            if self.slot_topk is not None:
                for t, label in enumerate(self.slot_labels):
                    lines.append(f"  {label:<7} " + _fmt(self.slot_topk.ids[j, t], self.slot_topk.scores[j, t]))
        if shown < nq:
            lines.append(f"... {nq - shown} more queries (write them all with --out FILE.npz)")
        return "\n".join(lines)


def _fmt(ids: np.ndarray, scores: np.ndarray) -> str:
    return "  ".join(f"{int(i)}:{s:+.4g}" for i, s in zip(ids, scores))


@dataclass
class SelfInfluence:
    """Self-influence of every stored example.

    Attributes:
        per_slot: ``[N, S]`` with ``I(i, i, t)`` (None for a step-summed store).
        tracin: ``[N]`` self-TracIn ``T(i, i)`` (the sum of ``per_slot`` over slots).
        slot_labels: labels of the slots.
    """

    per_slot: np.ndarray | None
    tracin: np.ndarray
    slot_labels: list[str]


# --------------------------------------------------------------------------- sources


class _Source:
    """Uniform row-block access to a FeatureStore or to in-memory NumPy Features."""

    def __init__(self, obj: FeatureStore | Features | str | os.PathLike, what: str) -> None:
        if isinstance(obj, (str, os.PathLike)):
            obj = FeatureStore(obj)
        if isinstance(obj, FeatureStore):
            self.store, self.features = obj, None
            self.layout, self.checkpoints, self.steps = obj.layout, obj.checkpoints, dict(obj.steps)
            self.summed, self.dtype, self.n = obj.summed, obj.dtype, obj.n_examples
            self.example_ids = obj.example_ids
            self.meta = obj.meta
        elif isinstance(obj, Features):
            f = obj.to_numpy()
            self.store, self.features = None, f
            self.layout, self.checkpoints, self.steps = f.layout, f.checkpoints, dict(f.steps)
            self.summed, self.n = f.summed, f.n_examples
            self.dtype = np.result_type(*[a.dtype for blk in f.data for a in blk.values()])
            self.example_ids = f.example_ids
            self.meta = None
        else:
            raise SDIError(
                f"{what} must be a FeatureStore, a store path or sdi_core.Features; got {type(obj).__name__}."
            )

    def as_features(self) -> Features:
        if self.features is not None:
            return self.features
        return self.store.as_features(in_memory=len(self.store.segments) > 1)

    def slot_labels(self) -> list[str]:
        labels = []
        for g in self.layout.groups:
            s = self.steps[g.name]
            labels += [g.name] if s == 1 and g.name != "loop" else [f"{g.name}[{t}]" for t in range(s)]
        return labels

    def stored_steps(self, group: str) -> int:
        return 1 if self.summed else self.steps[group]

    def iter_blocks(self, block_rows: int, start: int, stop: int):
        if self.store is not None:
            yield from self.store.iter_blocks(block_rows, start, stop)
            return
        for a in range(start, stop, block_rows):
            b = min(stop, a + block_rows)
            yield a, b, [{g: arr[a:b] for g, arr in blk.items()} for blk in self.features.data]

    def check_compatible(self, query: "_Source") -> None:
        if self.store is not None:
            other = query.store if query.store is not None else query.features
            self.store.check_compatible(other, "the train store and the query features")
        elif query.store is not None:
            query.store.check_compatible(self.features, "the train features and the query store")
        else:
            self.features.check_compatible(query.features)


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class BlockPlan:
    """How many train rows one block holds under a memory budget, and what the bytes go to."""

    block_rows: int
    fixed_bytes: int
    bytes_per_row: int
    merge_bytes: int
    budget: int


def plan_blocks(
    budget: int,
    *,
    n_rows: int,
    query_rows: int,
    query_slots: int,
    train_row_bytes: int,
    work_row_bytes: int,
    fixed_bytes: int,
    dense_row_bytes: int,
    tile_itemsize: int,
    n_checkpoints: int,
    block_rows: int | None = None,
) -> BlockPlan:
    """Largest train block that keeps the resident memory under ``budget`` (pure bookkeeping).

    Per train row of a block: the stored row (``train_row_bytes``, memory-mapped
    pages), converted/summed copies (``work_row_bytes``), the score tile
    (``query_rows * query_slots`` scores, twice with several checkpoints), the
    TracIn tile, the candidate mask and the dense outputs' share.
    """
    cols = query_rows * query_slots
    tile = cols * tile_itemsize * (2 if n_checkpoints > 1 else 1) + query_rows * tile_itemsize
    mask = cols + query_rows
    per_row = train_row_bytes + work_row_bytes + tile + mask + dense_row_bytes
    merge = int(min(_MERGE_BYTES_MAX, max(256 << 10, budget // 16)))
    avail = budget - fixed_bytes - merge
    rows = avail // per_row if avail > 0 else 0
    if rows < 1:
        need = fixed_bytes + merge + per_row
        raise SDIError(
            f"Memory budget {budget} bytes is too small: the query side and dense outputs take {fixed_bytes} bytes "
            f"and one train row {per_row} bytes (at least {need} bytes needed). Raise the budget, drop dense "
            "outputs, or score fewer queries at a time."
        )
    rows = min(int(rows), max(1, n_rows), DEFAULT_BLOCK_ROWS if block_rows is None else int(block_rows))
    rows = max(1, rows)
    return BlockPlan(rows, int(fixed_bytes), int(per_row), merge, int(budget))


# --------------------------------------------------------------------------- scoring


def _rank_rows(n: int, rank: int, world_size: int) -> tuple[int, int]:
    return n * rank // world_size, n * (rank + 1) // world_size


def _norms(blocks: list[dict[str, np.ndarray]], groups: Sequence[str], dtype) -> list[np.ndarray]:
    """Per checkpoint: norm of each row's step-summed gradient over all groups (1 where zero)."""
    out = []
    for blk in blocks:
        sq = None
        for g in groups:
            tot = np.sum(blk[g], axis=1, dtype=dtype)
            part = np.einsum("ij,ij->i", tot, tot)
            sq = part if sq is None else sq + part
        n = np.sqrt(sq)
        out.append(np.where(n > 0, n, 1).astype(dtype, copy=False))
    return out


def score_store(
    train: FeatureStore | Features | str | os.PathLike,
    query: FeatureStore | Features | str | os.PathLike,
    *,
    k: int | None = 10,
    budget: int | str = DEFAULT_BUDGET,
    slots: bool = True,
    total: bool = True,
    dense: Sequence[str] = (),
    normalize: str | None = None,
    largest: bool = True,
    rank: int = 0,
    world_size: int = 1,
    block_rows: int | None = None,
    dtype=None,
    progress: bool = False,
) -> StreamedScores:
    """Score every query against a train store, block by block, under a memory budget.

    Args:
        train: a :class:`~sdi_core.store.FeatureStore` (or its path), per step
            or summed over steps; in-memory NumPy ``Features`` work too.
        query: per-step query features (``Features``, or a store, loaded into
            memory): same sketch, model and checkpoints as ``train``.
        k: how many train examples to keep per query (clipped to the rows
            scored); None or 0 for no top-k.
        budget: bytes (or ``"2GiB"``) that the query side, the working blocks
            and the dense outputs may occupy together.
        slots: keep the top-k per query *slot* (``I(i, j, t)`` for each ``t``).
        total: keep the top-k per query by TracIn (``sum_t I(i, j, t)``).
        dense: any of ``"trajectory"`` ``[N, Nq, Sq]``, ``"tracin"`` ``[N, Nq]``,
            ``"train_trajectory"`` ``[N, Nq, S_train]`` and ``"step_matrix"``
            ``[N, Nq, S_train, Sq]`` (the last two need a per-step store).
            Refused when they do not fit the budget.
        normalize: None, or ``"cosine"`` (as :func:`sdi_core.influence`).
        largest: rank by largest (proponents) or smallest (opponents) value.
        rank, world_size: score only train rows
            ``[N * rank // world_size, N * (rank + 1) // world_size)``;
            combine the parts with :meth:`StreamedScores.merge`.
        block_rows: cap on train rows per block (default: what the budget
            allows, at most :data:`DEFAULT_BLOCK_ROWS`).
        dtype: computation dtype; default the train store's (float32 stores
            are scored in float32, float64 ones in float64).
        progress: show a progress bar over train rows (tqdm).

    Returns:
        :class:`StreamedScores`.
    """
    tr = _Source(train, "train")
    qs = _Source(query, "query")
    tr.check_compatible(qs)
    if qs.summed:
        raise SDIError("The query features were summed over steps; the query side must keep its steps.")
    if normalize not in NORMALIZE:
        raise SDIError(f"score_store(normalize={normalize!r}): expected one of {NORMALIZE}.")
    dense = tuple(dense or ())
    bad = [d for d in dense if d not in DENSE_KINDS]
    if bad:
        raise SDIError(f"score_store(dense={dense!r}): unknown kinds {bad}; choose from {DENSE_KINDS}.")
    if tr.summed and any(d in ("train_trajectory", "step_matrix") for d in dense):
        raise SDIError(
            "Train-step trajectories and step matrices need per-step train features, but the store was "
            "summed over steps. Featurise the train side with summed=False."
        )
    for name, v in (("rank", rank), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise SDIError(f"score_store({name}={v!r}): must be an int.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise SDIError(f"score_store(rank={rank}, world_size={world_size}): need 0 <= rank < world_size.")
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0):
        raise SDIError(f"score_store(k={k!r}): must be a non-negative int or None.")
    if block_rows is not None and (not isinstance(block_rows, (int, np.integer)) or block_rows < 1):
        raise SDIError(f"score_store(block_rows={block_rows!r}): must be a positive int.")
    budget = parse_bytes(budget)

    start, stop = _rank_rows(tr.n, int(rank), int(world_size))
    n_rows = stop - start
    k = min(int(k or 0), n_rows)
    want_slots, want_total = bool(slots) and k > 0, bool(total) and k > 0
    cdt = np.dtype(dtype) if dtype is not None else np.dtype(tr.dtype)
    if cdt.name not in ("float32", "float64"):
        raise SDIError(f"score_store(dtype={dtype!r}): expected float32 or float64.")
    isz = cdt.itemsize

    groups = [g.name for g in tr.layout.groups]
    widths = {g.name: g.width for g in tr.layout.groups}
    qf = qs.as_features()
    nq = qf.n_examples
    q_steps = {g: qs.steps[g] for g in groups}
    n_qslots = sum(q_steps.values())
    t_slots = sum(tr.steps[g] for g in groups)
    etas = [c.eta for c in tr.checkpoints]
    K = len(etas)
    need_tile = want_slots or want_total or "trajectory" in dense or "tracin" in dense
    need_qsum = "train_trajectory" in dense

    # Query side, eta- (and cosine-) scaled once, in the computation dtype: [(j, t), D] per (k, g).
    q_norms = _norms([{g: np.asarray(qf.data[kk][g]) for g in groups} for kk in range(K)], groups, np.float64) \
        if normalize == "cosine" else None
    Q: list[dict[str, np.ndarray]] = []
    Qsum: list[dict[str, np.ndarray]] = []
    for kk in range(K):
        Q.append({})
        Qsum.append({})
        for g in groups:
            a = np.asarray(qf.data[kk][g], dtype=np.float64) * etas[kk]
            if q_norms is not None:
                a = a / q_norms[kk][:, None, None]
            Q[kk][g] = np.ascontiguousarray(a.reshape(nq * q_steps[g], widths[g]), dtype=cdt)
            if need_qsum:
                Qsum[kk][g] = np.ascontiguousarray(a.sum(axis=1), dtype=cdt)
    q_bytes = sum(a.nbytes for d in Q + Qsum for a in d.values())

    # Dense outputs are resident for all rows; their GEMM scratch only per block row.
    dense_row = 0
    if "trajectory" in dense:
        dense_row += nq * n_qslots * isz
    if "tracin" in dense:
        dense_row += nq * isz
    if "train_trajectory" in dense:
        dense_row += nq * t_slots * isz
    if "step_matrix" in dense:
        dense_row += nq * t_slots * n_qslots * isz
    per_step_dense = "train_trajectory" in dense or "step_matrix" in dense
    dense_work = dense_row - (nq * n_qslots * isz if "trajectory" in dense else 0) - (nq * isz if "tracin" in dense else 0)
    if per_step_dense:
        dense_work += sum(tr.steps[g] * widths[g] for g in groups) * isz
    train_row = K * sum(tr.stored_steps(g) * widths[g] for g in groups) * np.dtype(tr.dtype).itemsize
    convert = (not tr.summed) or cdt != np.dtype(tr.dtype) or normalize == "cosine"
    work_row = sum(widths.values()) * isz if convert else 0
    merger_bytes = 16 * k * (nq * n_qslots + nq)
    plan = plan_blocks(
        budget,
        n_rows=n_rows,
        query_rows=nq if need_tile else 0,
        query_slots=n_qslots,
        train_row_bytes=train_row,
        work_row_bytes=work_row,
        fixed_bytes=q_bytes + n_rows * dense_row + merger_bytes,
        dense_row_bytes=dense_work,
        tile_itemsize=isz,
        n_checkpoints=K,
        block_rows=block_rows,
    )
    bi_max = plan.block_rows

    # Buffers reused across blocks (flat, reshaped per block so every view is contiguous).
    cols_of = {g: nq * q_steps[g] for g in groups}
    tile_buf = {g: np.empty(cols_of[g] * bi_max, dtype=cdt) for g in groups} if need_tile else {}
    tmp_buf = np.empty(max(cols_of.values()) * bi_max, dtype=cdt) if need_tile and K > 1 else None
    tot_buf = np.empty(nq * bi_max, dtype=cdt) if (want_total or "tracin" in dense) else None
    work_buf = np.empty(max(widths.values()) * bi_max, dtype=cdt) if convert else None
    step_ones = {s: np.ones(s, dtype=cdt) for s in set(q_steps.values())}

    slot_mergers = {g: _TopKMerger(cols_of[g], k, largest, cdt, plan.merge_bytes) for g in groups} if want_slots else {}
    total_merger = _TopKMerger(nq, k, largest, cdt, plan.merge_bytes) if want_total else None
    out: dict[str, np.ndarray] = {}
    if "trajectory" in dense:
        out["trajectory"] = np.empty((n_rows, nq, n_qslots), dtype=cdt)
    if "tracin" in dense:
        out["tracin"] = np.empty((n_rows, nq), dtype=cdt)
    if "train_trajectory" in dense:
        out["train_trajectory"] = np.zeros((n_rows, nq, t_slots), dtype=cdt)
    if "step_matrix" in dense:
        out["step_matrix"] = np.zeros((n_rows, nq, t_slots, n_qslots), dtype=cdt)

    q_slot0, t_slot0 = {}, {}
    a = b = 0
    for g in groups:
        q_slot0[g], t_slot0[g] = a, b
        a += q_steps[g]
        b += tr.steps[g]

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_rows, desc="scoring", unit="row", unit_scale=True)
    try:
        for i0, i1, blocks in tr.iter_blocks(bi_max, start, stop):
            bi = i1 - i0
            r0, r1 = i0 - start, i1 - start
            t_norms = _norms(blocks, groups, cdt) if normalize == "cosine" else None
            # tiles[g][i, (j, t)]: train row i against query j at step t of group g.
            tiles = {g: tile_buf[g][: bi * cols_of[g]].reshape(bi, cols_of[g]) for g in tile_buf}
            for kk in range(K):
                for g in groups:
                    arr = np.asarray(blocks[kk][g])
                    if need_tile:
                        T = _summed_rows(arr, cdt, work_buf, bi, t_norms[kk] if t_norms is not None else None)
                        if kk == 0:
                            np.matmul(T, Q[kk][g].T, out=tiles[g])
                        else:
                            tmp = tmp_buf[: bi * cols_of[g]].reshape(bi, cols_of[g])
                            np.matmul(T, Q[kk][g].T, out=tmp)
                            tiles[g] += tmp
                    if per_step_dense:
                        _per_step_dense(arr, kk, g, Q, Qsum, out, r0, r1, nq, q_steps[g], tr.steps[g],
                                        q_slot0[g], t_slot0[g], cdt, t_norms[kk] if t_norms is not None else None)
            if need_tile:
                for g in groups:
                    if want_slots:
                        slot_mergers[g].update(tiles[g], i0)
                    if "trajectory" in dense:
                        sl = slice(q_slot0[g], q_slot0[g] + q_steps[g])
                        out["trajectory"][r0:r1, :, sl] = tiles[g].reshape(bi, nq, q_steps[g])
                if tot_buf is not None:
                    # Sum over steps as a matrix-vector product: far faster than a short last-axis reduction.
                    tot = tot_buf[: bi * nq].reshape(bi, nq)
                    for n, g in enumerate(groups):
                        view = tiles[g].reshape(bi, nq, q_steps[g])
                        ones = step_ones[q_steps[g]]
                        if n == 0:
                            np.matmul(view, ones, out=tot)
                        else:
                            tot += np.matmul(view, ones)
                    if total_merger is not None:
                        total_merger.update(tot, i0)
                    if "tracin" in dense:
                        out["tracin"][r0:r1] = tot
            if bar is not None:
                bar.update(bi)
    finally:
        if bar is not None:
            bar.close()

    ids = tr.example_ids
    slot_topk = total_topk = None
    if want_slots:
        idx = np.empty((nq, n_qslots, k), dtype=np.int64)
        sc = np.empty((nq, n_qslots, k), dtype=np.float64)
        for g in groups:
            gi, gs = slot_mergers[g].result()
            sl = slice(q_slot0[g], q_slot0[g] + q_steps[g])
            idx[:, sl] = gi.reshape(nq, q_steps[g], k)
            sc[:, sl] = gs.reshape(nq, q_steps[g], k)
        slot_topk = TopK(idx, sc, idx if ids is None else ids[idx])
    if want_total:
        gi, gs = total_merger.result()
        total_topk = TopK(gi, gs, gi if ids is None else ids[gi])
    q_ids = qs.example_ids if qs.example_ids is not None else np.arange(nq)
    return StreamedScores(
        slot_topk=slot_topk,
        total_topk=total_topk,
        slot_labels=qs.slot_labels(),
        train_slot_labels=tr.slot_labels(),
        rows=(start, stop),
        n_train=tr.n,
        query_ids=np.asarray(q_ids),
        k=k,
        largest=bool(largest),
        block_rows=bi_max,
        meta={"budget": plan.budget, "bytes_per_row": plan.bytes_per_row, "fixed_bytes": plan.fixed_bytes,
              "merge_bytes": plan.merge_bytes,
              "dtype": cdt.name, "normalize": normalize},
        **out,
    )


def _summed_rows(arr: np.ndarray, cdt, work_buf, bi: int, norms) -> np.ndarray:
    """``[bi, S, D]`` stored rows -> ``[bi, D]`` summed over steps in ``cdt`` (a view when nothing to do)."""
    d = arr.shape[2]
    if arr.shape[1] == 1 and arr.dtype == cdt and norms is None:
        return arr.reshape(bi, d)
    T = work_buf[: bi * d].reshape(bi, d)
    if arr.shape[1] == 1:
        T[...] = arr.reshape(bi, d)
    else:
        np.sum(arr, axis=1, dtype=cdt, out=T)
    if norms is not None:
        T /= norms[:, None]
    return T


def _per_step_dense(arr, kk, g, Q, Qsum, out, r0, r1, nq, sq, st, q0, t0, cdt, norms) -> None:
    """Train-step trajectory and step-matrix contributions of one checkpoint and group for a block."""
    bi, _, d = arr.shape
    T = np.asarray(arr, dtype=cdt).reshape(bi * st, d)
    if norms is not None:
        T = T / np.repeat(norms, st)[:, None]
    if "train_trajectory" in out:
        prod = np.matmul(T, Qsum[kk][g].T).reshape(bi, st, nq)
        out["train_trajectory"][r0:r1, :, t0 : t0 + st] += prod.transpose(0, 2, 1)
    if "step_matrix" in out:
        prod = np.matmul(T, Q[kk][g].T).reshape(bi, st, nq, sq).transpose(0, 2, 1, 3)
        out["step_matrix"][r0:r1, :, t0 : t0 + st, q0 : q0 + sq] += prod


def self_influence_store(
    store: FeatureStore | Features | str | os.PathLike,
    *,
    budget: int | str = DEFAULT_BUDGET,
    normalize: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> SelfInfluence:
    """Self-influence ``I(i, i, t)`` (per-step store) and self-TracIn ``T(i, i)`` of every stored example.

    Streams the store in blocks under ``budget`` bytes; computed in float64.
    With ``rank``/``world_size`` only that rank's rows are returned.
    """
    src = _Source(store, "store")
    if normalize not in NORMALIZE:
        raise SDIError(f"self_influence_store(normalize={normalize!r}): expected one of {NORMALIZE}.")
    budget = parse_bytes(budget)
    start, stop = _rank_rows(src.n, int(rank), int(world_size))
    groups = [g.name for g in src.layout.groups]
    etas = [c.eta for c in src.checkpoints]
    row_bytes = sum(src.stored_steps(g) * g_w for g, g_w in ((g.name, g.width) for g in src.layout.groups))
    row_bytes = row_bytes * len(etas) * (np.dtype(src.dtype).itemsize + 8 * 2)
    rows = max(1, budget // max(1, row_bytes))
    n_slots = sum(src.steps[g] for g in groups)
    per_slot = None if src.summed else np.zeros((stop - start, n_slots))
    tracin = np.zeros(stop - start)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=stop - start, desc="self-influence", unit="row", unit_scale=True)
    for i0, i1, blocks in src.iter_blocks(int(rows), start, stop):
        r0, r1 = i0 - start, i1 - start
        norms = _norms(blocks, groups, np.float64) if normalize == "cosine" else None
        for kk, eta in enumerate(etas):
            s0 = 0
            for g in groups:
                a = np.asarray(blocks[kk][g], dtype=np.float64)
                if norms is not None:
                    a = a / norms[kk][:, None, None]
                tot = a.sum(axis=1)
                if per_slot is not None:
                    s = a.shape[1]
                    per_slot[r0:r1, s0 : s0 + s] += eta * np.einsum("isd,id->is", a, tot)
                    s0 += s
                tracin[r0:r1] += eta * np.einsum("id,id->i", tot, tot)
        if bar is not None:
            bar.update(i1 - i0)
    if bar is not None:
        bar.close()
    return SelfInfluence(per_slot, tracin, src.slot_labels())
