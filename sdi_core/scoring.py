"""Streamed scoring: influence of a train row source (a store larger than memory) on in-memory queries.

``score_store`` is plan, prepare, loop, assemble over the kernel of
:mod:`sdi_core.algebra`:

- *plan*: the largest train block that keeps the prepared query, the working
  block and its tiles, and the dense outputs under ``budget`` bytes;
- *prepare*: the query side once (:func:`~sdi_core.algebra.prepare_query`:
  eta- and cosine-scaled, checkpoints side by side, columns in the train
  side's parameter order);
- *loop*: train blocks on a fixed grid of the whole store, moved to the
  query's namespace and device (for torch on an accelerator through pinned
  memory, the next block read and sent while the device contracts this one),
  one matrix product per group and block, and exact running top-k mergers on
  the same device;
- *assemble*: only the winners (and any dense outputs asked for) come back to
  NumPy.

Exactness: in float64 every number equals :func:`sdi_core.influence` to float
rounding (blocking changes only the order of additions), and top-k ties are
broken as there: the smaller train index wins.  Block boundaries do not
depend on ``rank``/``world_size``, so every rank computes its rows with the
arithmetic of a one-process run: merged parts are bit-identical to it.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
from array_api_compat import to_device

from ._array import array_namespace, device_or_none, float_dtype_for, is_numpy_namespace, is_torch_namespace, to_numpy
from .algebra import NORMALIZE, Query, TopK, contract, prepare_query, query_parts, self_influence_rows, train_rows
from .factors import SDIError
from .features import Features, check_compatible, slot_labels
from .store import FeatureStore

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_BLOCK_ROWS",
    "DENSE_KINDS",
    "BlockPlan",
    "StreamedScores",
    "SelfInfluence",
    "make_merger",
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


class _ArrayTopK:
    """Exact running top-k on the scores' own namespace and device; only :meth:`result` copies to NumPy.

    Same interface and order as :class:`_TopKMerger` (score descending, or
    ascending when not ``largest``, then train index ascending), written in
    the array API: keys ``[k, rows]`` (``-score`` or ``score``: smaller is
    better) merge with a block by one stable sort of the current ``k`` and
    the block's candidates.  A block none of whose scores beats any column's
    current k-th best is skipped after one comparison.  On torch the block is
    first cut to its own best ``k`` per column (``topk``) unless a value ties
    across that cut, so the sort sees ``2k`` candidates instead of ``k + b``.
    """

    def __init__(self, xp, rows: int, k: int, largest: bool, dtype, device) -> None:
        self.xp, self.k, self.largest, self.device = xp, k, largest, device
        self.keys = xp.full((k, rows), math.inf, dtype=dtype, device=device)
        self.index = xp.full((k, rows), -1, dtype=xp.int64, device=device)
        self.seen = 0

    def update(self, scores, offset: int) -> None:
        """Merge ``scores [b, rows]`` of train rows ``offset .. offset + b``."""
        xp, k = self.xp, self.k
        keys = xp.astype(-scores if self.largest else scores, self.keys.dtype, copy=False)
        b = keys.shape[0]
        index = xp.broadcast_to(xp.arange(offset, offset + b, dtype=xp.int64, device=self.device)[:, None], keys.shape)
        if self.seen >= k:
            if not bool(xp.any(keys < self.keys[k - 1 : k, :])):
                self.seen += b
                return
            if b > k and is_torch_namespace(xp):
                keys, index = self._narrow(keys, index)
        self.seen += b
        cand_k, cand_i = xp.concat([self.keys, keys], axis=0), xp.concat([self.index, index], axis=0)
        order = xp.argsort(cand_k, axis=0, stable=True)[:k, :]  # stable: current entries (smaller indices) first
        self.keys = xp.take_along_axis(cand_k, order, axis=0)
        self.index = xp.take_along_axis(cand_i, order, axis=0)

    def _narrow(self, keys, index):
        """The block's best ``k`` per column in index order, or the whole block where a value ties across the cut."""
        xp = self.xp
        vals, pos = xp.topk(keys, self.k, dim=0, largest=False, sorted=False)
        cut = xp.max(vals, axis=0)
        if bool(xp.any(xp.sum(xp.astype(keys <= cut, xp.int64), axis=0) > self.k)):
            return keys, index
        pos = xp.sort(pos, axis=0)
        return xp.take_along_axis(keys, pos, axis=0), xp.take_along_axis(index, pos, axis=0)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(indices [rows, k], scores [rows, k] float64)``, best first."""
        keys = to_numpy(self.keys).astype(np.float64).T
        return np.ascontiguousarray(to_numpy(self.index).T), (-keys if self.largest else keys)


def make_merger(xp, rows: int, k: int, largest: bool, dtype, device=None, merge_bytes: int | None = None):
    """The running top-k merger for scores in namespace ``xp``: NumPy's thresholded one, else :class:`_ArrayTopK`.

    Both take blocks ``[b, rows]`` through ``update(scores, offset)`` and give
    ``(indices [rows, k], scores [rows, k])`` NumPy arrays from ``result()``.
    """
    if is_numpy_namespace(xp):
        return _TopKMerger(rows, k, largest, np.dtype(dtype), merge_bytes or _MERGE_BYTES_MAX)
    return _ArrayTopK(xp, rows, k, largest, dtype, device)


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
            idx, sc, ids = (np.concatenate([t[i] for t in tops], axis=-1) for i in range(3))
            order = np.lexsort((idx, -sc if first.largest else sc), axis=-1)[..., : first.k]  # ties: smaller index
            return TopK(*(np.take_along_axis(a, order, axis=-1) for a in (idx, sc, ids)))

        dense = {d: None if getattr(first, d) is None else np.concatenate([getattr(p, d) for p in parts]) for d in DENSE_KINDS}
        return replace(first, slot_topk=merge_topk([p.slot_topk for p in parts]), rows=(first.rows[0], parts[-1].rows[1]),
                       total_topk=merge_topk([p.total_topk for p in parts]), meta=dict(first.meta), **dense)

    def to_npz(self, path: str | os.PathLike) -> None:
        """Save every computed array (and the labels) to a ``.npz`` file."""
        arrays: dict[str, Any] = {"slot_labels": np.asarray(self.slot_labels), "rows": np.asarray(self.rows),
                                  "train_slot_labels": np.asarray(self.train_slot_labels), "query_ids": self.query_ids}
        for name in ("slot_topk", "total_topk"):
            if getattr(self, name) is not None:
                arrays.update({f"{name}_{f}": getattr(getattr(self, name), f) for f in TopK._fields})
        arrays.update({d: getattr(self, d) for d in DENSE_KINDS if getattr(self, d) is not None})
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


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class BlockPlan:
    """How many train rows one block holds under a memory budget, and what the bytes go to."""

    block_rows: int
    fixed_bytes: int
    bytes_per_row: int
    merge_bytes: int
    budget: int


def plan_blocks(budget: int, *, n_rows: int, fixed_bytes: int, row_bytes: int, block_rows: int | None = None) -> BlockPlan:
    """Largest train block that keeps the resident memory under ``budget`` (pure bookkeeping).

    ``fixed_bytes`` are held for the whole run (the prepared query, the
    mergers' state, the dense outputs), ``row_bytes`` per train row of a block
    (the block and its converted copy, its tiles, the mergers' scratch); the
    top-k merge gets a scratch allowance of its own.  At most ``n_rows`` rows
    and ``block_rows`` (default :data:`DEFAULT_BLOCK_ROWS`).
    """
    merge = int(min(_MERGE_BYTES_MAX, max(256 << 10, budget // 16)))
    avail = budget - fixed_bytes - merge
    rows = avail // row_bytes if avail > 0 else 0
    if rows < 1:
        need = fixed_bytes + merge + row_bytes
        raise SDIError(
            f"Memory budget {budget} bytes is too small: the query side and dense outputs take {fixed_bytes} bytes "
            f"and one train row {row_bytes} bytes (at least {need} bytes needed). Raise the budget, drop dense "
            "outputs, or score fewer queries at a time."
        )
    rows = max(1, min(int(rows), max(1, n_rows), DEFAULT_BLOCK_ROWS if block_rows is None else int(block_rows)))
    return BlockPlan(rows, int(fixed_bytes), int(row_bytes), merge, int(budget))


def _plan(budget: int, src, q: Query, modes: Sequence[str], k: int, dense, n_dense: int, block_rows) -> BlockPlan:
    """Bytes of one score_store run (see :func:`plan_blocks`), from the shapes alone."""
    isz, nq, t_steps, sq = q.itemsize, q.n, dict(src.steps), sum(q.steps.values())
    st = sum(t_steps.values())
    widths = {g.name: g.width * len(src.checkpoints) for g in src.layout.groups}
    stored = sum((1 if src.summed else t_steps[g]) * w for g, w in widths.items()) * _source_dtype(src).itemsize
    per_step = sum(t_steps[g] * w for g, w in widths.items()) * isz
    staged = not is_numpy_namespace(q.xp)  # two blocks in flight on the device; tiles copied to the host
    scan = 1 if not staged else isz + 24  # per score: the NumPy merger's mask, or the device merger's sort
    dense_row = nq * isz * sum({"trajectory": sq, "tracin": 1, "train_trajectory": st, "step_matrix": st * sq}[d]
                               for d in dense)
    per_mode = {"query": nq * (sq + 2) * isz + nq * (sq + 1) * scan, "tracin": 2 * nq * isz + nq * scan,
                "train": 2 * nq * st * isz + per_step, "matrix": 3 * nq * st * sq * isz + per_step}
    row = stored * (2 if staged else 1) + sum(widths.values()) * isz + sum(per_mode[m] for m in modes)
    row += dense_row if staged else 0
    fixed = q.nbytes + n_dense * dense_row + 16 * k * nq * (sq + 1)
    return plan_blocks(budget, n_rows=src.n_examples, fixed_bytes=fixed, row_bytes=row, block_rows=block_rows)


def _progress(on: bool, total: int, desc: str):
    """A tqdm bar over ``total`` train rows when ``on``, else a stand-in that does nothing."""
    if not on:
        return contextlib.nullcontext(SimpleNamespace(update=lambda n: None))
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row", unit_scale=True)


# --------------------------------------------------------------------------- sources and devices


def _source(obj, what: str):
    """A row source: a FeatureStore (or its path), Features, or anything with ``iter_blocks`` and a layout."""
    if isinstance(obj, (str, os.PathLike)):
        return FeatureStore(obj)
    if isinstance(obj, (FeatureStore, Features)) or (hasattr(obj, "iter_blocks") and hasattr(obj, "layout")):
        return obj
    raise SDIError(f"{what} must be a FeatureStore, a store path or sdi_core.Features; got {type(obj).__name__}.")


def _query_features(obj) -> Features:
    src = _source(obj, "query")
    if isinstance(src, FeatureStore):
        return src.as_features(in_memory=len(src.segments) > 1)
    if not isinstance(src, Features):
        raise SDIError(f"query must be sdi_core.Features or a feature store; got {type(obj).__name__}.")
    return src


def _source_dtype(src) -> np.dtype:
    if getattr(src, "dtype", None) is not None:  # a store (or any row source that says)
        return np.dtype(src.dtype)
    block = src.data if isinstance(src, Features) else next(src.iter_blocks(1, 0, 1))[2]
    arrays = [a for blk in block for a in blk.values()]
    xp = array_namespace(*arrays)
    return np.dtype("float64" if float_dtype_for(xp, *arrays) == xp.float64 else "float32")


def _space(train, query: Features):
    """The namespace and device scoring runs on: in-memory non-NumPy train features' own, else the query's."""
    on = train if isinstance(train, Features) and not is_numpy_namespace(train.xp) else query
    first = next(iter(on.data[0].values()))
    return on.xp, device_or_none(first)


def _move(xp, device, a):
    """``a`` on namespace ``xp`` and ``device``.

    NumPy arrays (store blocks) are staged: for torch on an accelerator into
    page-locked memory and sent asynchronously (torch's pinned pool keeps
    each buffer until its copy is done), elsewhere with one transfer.
    """
    if isinstance(a, np.ndarray):
        if is_numpy_namespace(xp):
            return a
        if is_torch_namespace(xp) and getattr(device, "type", "cpu") != "cpu":
            buf = xp.empty(a.shape, dtype=getattr(xp, a.dtype.name), device="cpu", pin_memory=True)
            np.copyto(buf.numpy(), a)
            return buf.to(device, non_blocking=True)
        return xp.asarray(np.array(a) if is_torch_namespace(xp) else a, device=device)  # torch: a writable copy
    if array_namespace(a) is not xp:
        raise SDIError(
            f"Train and query features are arrays of different libraries ({type(a).__module__} and {xp.__name__}); "
            "convert one side (e.g. Features.to_numpy())."
        )
    return a if device is None or device_or_none(a) == device else to_device(a, device)


def _on(xp, device, block: list[dict]) -> list[dict]:
    return [{g: _move(xp, device, a) for g, a in blk.items()} for blk in block]


def _tiles(src, q: Query, modes: Sequence[str], normalize, block_rows: int, start: int, stop: int):
    """Yield ``(row_start, row_stop, {mode: tile})`` over train rows ``[start, stop)``.

    Blocks lie on a grid of ``block_rows`` from row 0 of the source, so every
    row is computed in the block, with the arithmetic, of a one-process run
    whatever the rank split (rows outside ``[start, stop)`` are cut from the
    tiles).  The next block is read and sent to the device while the device
    contracts this one.  Mode ``"query"`` gives :func:`query_parts`.
    """
    lo, hi = start // block_rows * block_rows, min(src.n_examples, -(-stop // block_rows) * block_rows)
    blocks = ((a, b, _on(q.xp, q.device, blk)) for a, b, blk in src.iter_blocks(block_rows, lo, hi))
    nxt = next(blocks, None)
    while nxt is not None:
        a, b, block = nxt
        rows, tiles = {}, {}
        for m in modes:
            per_step = m in ("train", "matrix")
            if per_step not in rows:
                rows[per_step] = train_rows(block, per_step=per_step, normalize=normalize, xp=q.xp, dtype=q.dtype)
            tiles[m] = query_parts(rows[per_step], q) if m == "query" else contract(rows[per_step], q, m)
        del rows, block
        nxt = next(blocks, None)
        cut = slice(max(a, start) - a, min(b, stop) - a)
        yield max(a, start), min(b, stop), {m: [p[cut, ...] for p in t] if m == "query" else t[cut, ...] for m, t in tiles.items()}


# --------------------------------------------------------------------------- scoring


def _rank_rows(n: int, rank: int, world_size: int) -> tuple[int, int]:
    return n * rank // world_size, n * (rank + 1) // world_size


class _Assembly:
    """score_store's outputs as the tiles arrive: top-k mergers on the device, dense arrays on the host."""

    def __init__(self, q: Query, t_slots: int, k: int, largest: bool, slots: bool, total: bool, dense, n_rows: int,
                 start: int, merge_bytes: int) -> None:
        xp, self.q, self.start, self.k = q.xp, q, start, k
        self.slot = {g: make_merger(xp, q.n * q.steps[g], k, largest, q.dtype, q.device, merge_bytes)
                     for g in q.groups} if slots else {}
        self.total = make_merger(xp, q.n, k, largest, q.dtype, q.device, merge_bytes) if total else None
        sq, npdt = sum(q.steps.values()), np.dtype("float64" if q.dtype == xp.float64 else "float32")
        shapes = {"trajectory": (sq,), "tracin": (), "train_trajectory": (t_slots,), "step_matrix": (t_slots, sq)}
        self.out = {d: np.empty((n_rows, q.n) + shapes[d], dtype=npdt) for d in dense}
        self.ones = {s: xp.ones((s,), dtype=q.dtype, device=q.device) for s in set(q.steps.values())}

    def add(self, lo: int, hi: int, tiles: dict) -> None:
        xp, q, rows = self.q.xp, self.q, slice(lo - self.start, hi - self.start)
        tot, s0 = tiles.get("tracin"), 0
        for g, part in zip(q.groups, tiles.get("query", ())):
            if g in self.slot:
                self.slot[g].update(part, lo)
            view = xp.reshape(part, (hi - lo, q.n, q.steps[g]))
            if "trajectory" in self.out:
                self.out["trajectory"][rows, :, s0 : s0 + q.steps[g]] = to_numpy(view)
            if self.total is not None or "tracin" in self.out:
                # Sum over steps as a matrix-vector product: far faster than a short last-axis reduction.
                part_tot = xp.matmul(view, self.ones[q.steps[g]])
                tot = part_tot if tot is None else tot + part_tot
            s0 += q.steps[g]
        if self.total is not None:
            self.total.update(tot, lo)
        for name, tile in (("tracin", tot), ("train_trajectory", tiles.get("train")), ("step_matrix", tiles.get("matrix"))):
            if name in self.out:
                self.out[name][rows] = to_numpy(tile)

    def topk(self, ids) -> tuple[TopK | None, TopK | None]:
        """``(slot_topk [N_query, S_query, k], total_topk [N_query, k])``, None where not kept."""
        def top(idx, sc):
            return TopK(idx, sc, idx if ids is None else ids[idx])

        slot = total = None
        if self.slot:
            parts = [(m.result(), self.q.steps[g]) for g, m in self.slot.items()]
            slot = top(*(np.concatenate([r[i].reshape(self.q.n, s, self.k) for r, s in parts], axis=1) for i in (0, 1)))
        if self.total is not None:
            total = top(*self.total.result())
        return slot, total


def _check_score_args(tr, qf: Features, k, dense, normalize, rank, world_size, block_rows, dtype) -> tuple:
    """Validate score_store's arguments; returns ``(dense kinds, computation dtype)``."""
    if qf.summed:
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
    for name, v, low in (("rank", rank, 0), ("world_size", world_size, 1), ("k", k, 0), ("block_rows", block_rows, 1)):
        if (v is not None or name in ("rank", "world_size")) and (
                isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low):
            raise SDIError(f"score_store({name}={v!r}): must be an int >= {low}{'' if name[0] in 'rw' else ' or None'}.")
    if rank >= world_size:
        raise SDIError(f"score_store(rank={rank}, world_size={world_size}): need 0 <= rank < world_size.")
    cdt = np.dtype(dtype) if dtype is not None else _source_dtype(tr)
    if cdt.name not in ("float32", "float64"):
        raise SDIError(f"score_store(dtype={dtype!r}): expected float32 or float64.")
    return dense, cdt


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
    """Score every query against a train row source, block by block, under a memory budget.

    Args:
        train: a :class:`~sdi_core.store.FeatureStore` (or its path), per step
            or summed over steps; in-memory ``Features`` (any namespace) or any
            row source (:mod:`sdi_core.algebra`) work too.
        query: per-step query features (``Features``, or a store, loaded into
            memory): same sketch, parameters (in any order) and checkpoints as
            ``train``.  Scoring runs in the query's namespace and on its
            device (in the train features' own when they are in memory and
            not NumPy).
        k: how many train examples to keep per query (clipped to the rows
            scored); None or 0 for no top-k.
        budget: bytes (or ``"2GiB"``) that the prepared query, the working
            blocks and their tiles (on the computation device) and the dense
            outputs (on the host) may occupy together.
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
            combine the parts with :meth:`StreamedScores.merge` (bit-identical
            to one process: a rank also computes, and drops, the other rows of
            the at most two blocks it shares with its neighbours).
        block_rows: cap on train rows per block (default: what the budget
            allows, at most :data:`DEFAULT_BLOCK_ROWS`).
        dtype: computation dtype; default the train store's (float32 stores
            are scored in float32, float64 ones in float64).
        progress: show a progress bar over train rows (tqdm).

    Returns:
        :class:`StreamedScores` (NumPy arrays).
    """
    tr, qf = _source(train, "train"), _query_features(query)
    dense, cdt = _check_score_args(tr, qf, k, dense, normalize, rank, world_size, block_rows, dtype)
    order = check_compatible(tr, qf, "the train store and the query features")
    budget, (start, stop) = parse_bytes(budget), _rank_rows(tr.n_examples, int(rank), int(world_size))
    k = min(int(k or 0), stop - start)
    want_slots, want_total = bool(slots) and k > 0, bool(total) and k > 0
    tile = want_slots or "trajectory" in dense  # the query-step tile, else TracIn alone when that is all
    modes = ["query" if tile else "tracin"] if tile or want_total or "tracin" in dense else []
    modes += [m for m, d in (("train", "train_trajectory"), ("matrix", "step_matrix")) if d in dense]
    # prepare: the query on the computation device, scaled once
    xp, device = _space(tr, qf)
    need = [n for n, ms in (("per_step", {"query", "matrix"}), ("summed", {"tracin", "train"})) if ms & set(modes)]
    q = prepare_query(replace(qf, data=_on(xp, device, qf.data)), [c.eta for c in tr.checkpoints],
                      normalize=normalize, order=order, need=need, dtype=getattr(xp, cdt.name))
    # plan: block rows under the budget (the same in every rank), then loop and assemble
    plan = _plan(budget, tr, q, modes, k, dense, -(-tr.n_examples // int(world_size)), block_rows)
    acc = _Assembly(q, sum(tr.steps.values()), k, largest, want_slots, want_total, dense, stop - start, start,
                    plan.merge_bytes)
    with _progress(progress, stop - start, "scoring") as bar:
        for lo, hi, tiles in _tiles(tr, q, modes, normalize, plan.block_rows, start, stop) if modes else ():
            acc.add(lo, hi, tiles)
            bar.update(hi - lo)
    slot_topk, total_topk = acc.topk(tr.example_ids)
    return StreamedScores(
        slot_topk=slot_topk, total_topk=total_topk, slot_labels=qf.slot_labels(),
        train_slot_labels=slot_labels(tr.layout, tr.steps), rows=(start, stop), n_train=tr.n_examples,
        query_ids=np.asarray(qf.example_ids if qf.example_ids is not None else np.arange(q.n)), k=k,
        largest=bool(largest), block_rows=plan.block_rows,
        meta={"budget": plan.budget, "bytes_per_row": plan.bytes_per_row, "fixed_bytes": plan.fixed_bytes,
              "merge_bytes": plan.merge_bytes, "dtype": cdt.name, "normalize": normalize,
              "namespace": xp.__name__, "device": str(device)},
        **acc.out,
    )


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

    Streams the row source in blocks under ``budget`` bytes, with the kernel
    of :func:`sdi_core.self_influence`, in float64 on the source's own
    namespace and device.  With ``rank``/``world_size`` only that rank's rows
    are returned.
    """
    src = _source(store, "store")
    if normalize not in NORMALIZE:
        raise SDIError(f"self_influence_store(normalize={normalize!r}): expected one of {NORMALIZE}.")
    budget, (start, stop) = parse_bytes(budget), _rank_rows(src.n_examples, int(rank), int(world_size))
    etas = [c.eta for c in src.checkpoints]
    stored = sum((1 if src.summed else src.steps[g.name]) * g.width for g in src.layout.groups) * len(etas)
    rows = max(1, budget // max(1, stored * (_source_dtype(src).itemsize + 8 * 2)))
    per_slot, tracin = [], []
    with _progress(progress, stop - start, "self-influence") as bar:
        for lo, hi, block in src.iter_blocks(int(rows), start, stop):
            xp = array_namespace(*[a for blk in block for a in blk.values()])
            p, t = self_influence_rows(block, etas, per_slot=not src.summed, normalize=normalize, xp=xp, dtype=xp.float64)
            per_slot.append(None if p is None else to_numpy(p))
            tracin.append(to_numpy(t))
            bar.update(hi - lo)
    n_slots = sum(src.steps.values())
    return SelfInfluence(None if src.summed else np.concatenate(per_slot or [np.zeros((0, n_slots))]),
                         np.concatenate(tracin or [np.zeros(0)]), slot_labels(src.layout, src.steps))
