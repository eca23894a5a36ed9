"""Exact running top-k over streamed score tiles, and the guard that keeps non-finite scores out of it.

One merger serves :meth:`sdi_core.InfluenceResult.top_k`, :func:`sdi_core.scoring.score_store` and
:mod:`sdi_core.error_bars`: a NumPy fast path (:class:`_TopKMerger`) and an array-API one
(:class:`_ArrayTopK`, with torch's ``topk`` where it applies), chosen by :func:`make_merger`.
Ties are broken as everywhere in the library: the smaller train index wins.  A NaN score would
silently drop a row out of every ranking, so tiles are checked first (:func:`refuse_non_finite`).
"""

from __future__ import annotations

import math

import numpy as np

from ._array import is_numpy_namespace, is_torch_namespace, to_numpy
from .factors import SDIError

__all__ = ["make_merger", "refuse_non_finite"]

_MERGE_BYTES_MAX = 64 << 20  # scratch memory of the top-k merge
_PRIME_COLUMNS = 1024  # train rows used to set the first top-k thresholds exactly


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
        if len(live) * width * 48 > self.merge_bytes:  # keys, indices, their sort and gathers
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
        chunk = max(1, self.merge_bytes // (width * 40))  # ~40 bytes live per entry (keys, copies, masks)
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


def _row_describer(src, side: str):
    """``row -> text`` naming where a row of ``src`` lives (its shard and example id for a store)."""
    if hasattr(src, "describe_row"):
        return src.describe_row
    ids = getattr(src, "example_ids", None)

    def describe(row: int) -> str:
        return f"{side} row {row}" + (f" (example id {int(ids[row])})" if ids is not None else "")

    return describe


def _ids_of(src):
    """``indices -> example ids`` of a row source, without materialising all its ids when it can look them up."""
    if hasattr(src, "ids_at"):
        return src.ids_at
    ids = src.example_ids
    return (lambda idx: idx) if ids is None else (lambda idx: np.asarray(ids)[idx])


def refuse_non_finite(xp, tile, offset: int, describe, side: str, rows_per_item: int = 1) -> None:
    """Raise an :class:`SDIError` naming the rows of ``tile [b, ...]`` whose scores are not all finite.

    A NaN anywhere in a row makes the sum of the tile NaN, so the common case
    costs one reduction; the row-wise search runs only when that sum is not
    finite (and finds nothing when the sum merely overflowed).  Row ``r`` of
    the tile is item ``(offset + r) // rows_per_item`` of the source.
    """
    if bool(xp.isfinite(xp.sum(tile))):
        return
    flat = xp.reshape(tile, (tile.shape[0], -1))
    bad = np.flatnonzero(~to_numpy(xp.all(xp.isfinite(flat), axis=1)))
    if bad.size == 0:
        return
    items = sorted({(offset + int(r)) // rows_per_item for r in bad})
    more = f" ({len(items) - 1} more {side} rows too)" if len(items) > 1 else ""
    raise SDIError(
        f"Scores of {describe(items[0])} are not finite{more}: its features hold NaN or inf (or values so large "
        f"that their products overflow). Refusing to rank with them: such a row would drop out of every top-k "
        f"unnoticed. Featurise that example again, or drop it from the {side} set."
    )


