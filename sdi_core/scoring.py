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
import ctypes
import os
import sys
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
from .topk import _MERGE_BYTES_MAX, _ids_of, _row_describer, make_merger, refuse_non_finite

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_BLOCK_ROWS",
    "RSS_CONSTANT",
    "DENSE_KINDS",
    "BlockPlan",
    "StreamedScores",
    "SelfInfluence",
    "make_merger",
    "refuse_non_finite",
    "score_store",
    "self_influence_store",
    "plan_blocks",
    "parse_bytes",
]

DEFAULT_BUDGET = 1 << 30
# What a scoring run may add to the peak resident set beyond its budget: BLAS's work buffers, the store's
# 1 MiB verification buffer, interpreter objects (measured on Linux: 1-5 MiB; tests/test_store_budget.py).
RSS_CONSTANT = 8 << 20
DENSE_KINDS = ("trajectory", "tracin", "train_trajectory", "step_matrix")
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


def _plan(budget: int, src, qf: Features, modes: Sequence[str], k: int, dense, n_dense: int, block_rows, *,
          isz: int, staged: bool, need: Sequence[str], loaded: bool, normalize) -> BlockPlan:
    """Bytes of one score_store run (see :func:`plan_blocks`), from the shapes alone, before anything is allocated.

    Counted: the query as read from a store (``loaded``), every temporary of
    :func:`~sdi_core.algebra.prepare_query` and its result; per train row the
    block as read, its cast and step sums (:func:`~sdi_core.algebra.train_rows`),
    the tiles of every mode and the assembly's sums, and the merger's masks;
    the dense outputs and the top-k state.  Refused, naming the parts, when
    the query side alone does not fit.
    """
    kq, nq, t_steps = len(qf.checkpoints), qf.n_examples, dict(src.steps)
    q_steps = {g.name: int(qf.steps[g.name]) for g in qf.layout.groups}
    st, sq = sum(t_steps.values()), sum(q_steps.values())
    q_width = {g.name: g.width for g in qf.layout.groups}
    in_isz = _source_dtype(qf).itemsize
    per_step_elems = nq * kq * sum(q_steps[g] * q_width[g] for g in q_steps)
    summed_elems = nq * kq * sum(q_width.values())
    largest = max(nq * q_steps[g] * q_width[g] for g in q_steps)
    q_in = per_step_elems * in_isz if loaded or staged else 0  # read from a store, or copied to the device
    q_kept = (per_step_elems if "per_step" in need else 0) * isz + (summed_elems if "summed" in need else 0) * isz
    if "per_step" not in need and kq == 1:
        q_kept += per_step_elems * isz  # nothing to concatenate: the scaled arrays stay alive as the summed base
    prepare = (q_in + per_step_elems * isz  # the query as read, its scaled copy
               + (per_step_elems * isz if "per_step" in need and kq > 1 else 0)  # checkpoints side by side
               + (2 * summed_elems * isz if "summed" in need else 0)  # step sums, then side by side
               + 2 * largest * max(in_isz, isz))  # eta product, column order, cast of one group in flight

    widths = {g.name: g.width * len(src.checkpoints) for g in src.layout.groups}
    src_isz = _source_dtype(src).itemsize
    stored_elems = sum((1 if src.summed else t_steps[g]) * w for g, w in widths.items())
    kd = sum(widths.values())
    cast = stored_elems * isz if src_isz != isz else 0
    cosine, several = normalize is not None, len(src.checkpoints) > 1
    # train_rows: step sums, cosine-scaled copies, checkpoints side by side; a norm's vecdot copies one group
    sums = 0 if src.summed else kd * isz
    norm_tmp = max(g.width for g in src.layout.groups) * isz if cosine else 0
    rows_summed = sums + kd * isz * (int(cosine) + int(several)) + norm_tmp
    rows_per_step = ((sums if cosine else 0) + norm_tmp
                     + sum(t_steps[g] * w for g, w in widths.items()) * isz * (int(cosine) + int(several)))
    scan = 1 if not staged else isz + 24  # per score: the NumPy merger's mask, or the device merger's sort
    dense_row = nq * isz * sum({"trajectory": sq, "tracin": 1, "train_trajectory": st, "step_matrix": st * sq}[d]
                               for d in dense)
    per_mode = {"query": nq * (sq + 2) * isz + nq * (sq + 1) * scan, "tracin": 3 * nq * isz + nq * scan,
                "train": 2 * nq * st * isz, "matrix": 3 * nq * st * sq * isz}
    row = stored_elems * src_isz * (2 if staged else 1) + cast + sum(per_mode[m] for m in modes)
    row += rows_summed if {"query", "tracin"} & set(modes) else 0
    row += rows_per_step if {"train", "matrix"} & set(modes) else 0
    row += dense_row if staged else 0
    fixed = q_kept + n_dense * dense_row + 16 * k * nq * (sq + 1)
    plan = plan_blocks(budget, n_rows=src.n_examples, fixed_bytes=fixed, row_bytes=row, block_rows=block_rows)
    if prepare > budget:  # before the loop: the merge scratch is not in use yet
        raise SDIError(
            f"Memory budget {budget} bytes is too small: preparing the query side ({nq} queries x {sq} steps x "
            f"{kq} checkpoints) takes {prepare} bytes. Raise the budget, or score fewer queries at a time."
        )
    return plan


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
        return src.as_features(in_memory=True)  # read (and verified) into memory: counted in the budget
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


def _moved_blocks(src, q: Query, block_rows: int, lo: int, hi: int):
    """The source's blocks on the computation device, holding no reference to a block once it is yielded.

    (A generator expression would keep the previous block alive while the
    next one is read: two blocks where the budget counts one.)
    """
    box = []
    for a, b, blk in src.iter_blocks(block_rows, lo, hi):
        box.append(blk)
        del blk
        yield a, b, _on(q.xp, q.device, box.pop())


def _tiles(src, q: Query, modes: Sequence[str], normalize, block_rows: int, start: int, stop: int):
    """Yield ``(row_start, row_stop, {mode: tile})`` over train rows ``[start, stop)``.

    Blocks lie on a grid of ``block_rows`` from row 0 of the source, so every
    row is computed in the block, with the arithmetic, of a one-process run
    whatever the rank split (rows outside ``[start, stop)`` are cut from the
    tiles).  The next block is read and sent to the device while the device
    contracts this one.  Mode ``"query"`` gives :func:`query_parts`.
    """
    lo, hi = start // block_rows * block_rows, min(src.n_examples, -(-stop // block_rows) * block_rows)
    blocks = _moved_blocks(src, q, block_rows, lo, hi)
    nxt = next(blocks, None)
    while nxt is not None:
        a, b, block = nxt
        rows, tiles = {}, {}
        for m in modes:
            per_step = m in ("train", "matrix")
            if per_step not in rows:
                rows[per_step] = train_rows(block, per_step=per_step, normalize=normalize, xp=q.xp, dtype=q.dtype)
            tiles[m] = query_parts(rows[per_step], q) if m == "query" else contract(rows[per_step], q, m)
        del rows, block, nxt  # this block is dropped before the next one is read (the device may still use it)
        nxt = next(blocks, None)
        cut = slice(max(a, start) - a, min(b, stop) - a)
        yield max(a, start), min(b, stop), {m: [p[cut, ...] for p in t] if m == "query" else t[cut, ...] for m, t in tiles.items()}


# --------------------------------------------------------------------------- scoring


def _rank_rows(n: int, rank: int, world_size: int) -> tuple[int, int]:
    return n * rank // world_size, n * (rank + 1) // world_size


class _Assembly:
    """score_store's outputs as the tiles arrive: top-k mergers on the device, dense arrays on the host."""

    def __init__(self, q: Query, t_slots: int, k: int, largest: bool, slots: bool, total: bool, dense, n_rows: int,
                 start: int, merge_bytes: int, describe) -> None:
        xp, self.q, self.start, self.k, self.describe = q.xp, q, start, k, describe
        self.slot = {g: make_merger(xp, q.n * q.steps[g], k, largest, q.dtype, q.device, merge_bytes)
                     for g in q.groups} if slots else {}
        self.total = make_merger(xp, q.n, k, largest, q.dtype, q.device, merge_bytes) if total else None
        sq, npdt = sum(q.steps.values()), np.dtype("float64" if q.dtype == xp.float64 else "float32")
        shapes = {"trajectory": (sq,), "tracin": (), "train_trajectory": (t_slots,), "step_matrix": (t_slots, sq)}
        self.out = {d: np.empty((n_rows, q.n) + shapes[d], dtype=npdt) for d in dense}
        self.ones = {s: xp.ones((s,), dtype=q.dtype, device=q.device) for s in set(q.steps.values())}

    def add(self, lo: int, hi: int, tiles: dict) -> None:
        xp, q, rows = self.q.xp, self.q, slice(lo - self.start, hi - self.start)
        for tile in [*tiles.get("query", ()), *(tiles[m] for m in ("tracin", "train", "matrix") if m in tiles)]:
            refuse_non_finite(xp, tile, lo, self.describe, "train")
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

    def topk(self, ids_of) -> tuple[TopK | None, TopK | None]:
        """``(slot_topk [N_query, S_query, k], total_topk [N_query, k])``, None where not kept.

        ``ids_of(indices)`` gives the example ids of train rows.
        """
        def top(idx, sc):
            return TopK(idx, sc, ids_of(idx))

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
        budget: bytes (or ``"2GiB"``) that everything scoring allocates may
            occupy together: the query as read from a store, its preparation
            and its temporaries, the working block as read, its casts and
            sums, the tiles, the top-k state and scratch (on the computation
            device) and the dense outputs (on the host).  On the CPU the peak
            resident set grows by at most ``budget + RSS_CONSTANT`` (8 MiB);
            a budget that cannot hold the query side and one train row is
            refused.
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
    _pin_malloc_threshold()
    tr, qf = _source(train, "train"), _query_features(query)
    dense, cdt = _check_score_args(tr, qf, k, dense, normalize, rank, world_size, block_rows, dtype)
    order = check_compatible(tr, qf, "the train store and the query features")
    budget, (start, stop) = parse_bytes(budget), _rank_rows(tr.n_examples, int(rank), int(world_size))
    k = min(int(k or 0), stop - start)
    want_slots, want_total = bool(slots) and k > 0, bool(total) and k > 0
    tile = want_slots or "trajectory" in dense  # the query-step tile, else TracIn alone when that is all
    modes = ["query" if tile else "tracin"] if tile or want_total or "tracin" in dense else []
    modes += [m for m, d in (("train", "train_trajectory"), ("matrix", "step_matrix")) if d in dense]
    # plan: block rows under the budget (the same in every rank), from the shapes, before anything is allocated
    xp, device = _space(tr, qf)
    need = [n for n, ms in (("per_step", {"query", "matrix"}), ("summed", {"tracin", "train"})) if ms & set(modes)]
    loaded = not isinstance(query, Features) or any(isinstance(a, np.memmap) for b in qf.data for a in b.values())
    plan = _plan(budget, tr, qf, modes, k, dense, -(-tr.n_examples // int(world_size)), block_rows,
                 isz=cdt.itemsize, staged=not is_numpy_namespace(xp), need=need, loaded=loaded, normalize=normalize)
    # prepare: the query on the computation device, scaled once; the query as read is dropped
    q = prepare_query(replace(qf, data=_on(xp, device, qf.data)), [c.eta for c in tr.checkpoints],
                      normalize=normalize, order=order, need=need, dtype=getattr(xp, cdt.name))
    labels, n_query = qf.slot_labels(), qf.n_examples
    query_ids = np.asarray(qf.example_ids if qf.example_ids is not None else np.arange(n_query))
    describe_query = _row_describer(query if isinstance(query, FeatureStore) else qf, "query")
    del qf
    _check_query(q, describe_query)
    acc = _Assembly(q, sum(tr.steps.values()), k, largest, want_slots, want_total, dense, stop - start, start,
                    plan.merge_bytes, _row_describer(tr, "train"))
    # loop and assemble (a block's tiles are dropped before the next block is read)
    with _progress(progress, stop - start, "scoring") as bar:
        for lo, hi, tiles in _tiles(tr, q, modes, normalize, plan.block_rows, start, stop) if modes else ():
            acc.add(lo, hi, tiles)
            del tiles
            bar.update(hi - lo)
    slot_topk, total_topk = acc.topk(_ids_of(tr))
    return StreamedScores(
        slot_topk=slot_topk, total_topk=total_topk, slot_labels=labels,
        train_slot_labels=slot_labels(tr.layout, tr.steps), rows=(start, stop), n_train=tr.n_examples,
        query_ids=query_ids, k=k, largest=bool(largest), block_rows=plan.block_rows,
        meta={"budget": plan.budget, "bytes_per_row": plan.bytes_per_row, "fixed_bytes": plan.fixed_bytes,
              "merge_bytes": plan.merge_bytes, "dtype": cdt.name, "normalize": normalize,
              "namespace": xp.__name__, "device": str(device)},
        **acc.out,
    )


# --------------------------------------------------------------------------- resident memory


_malloc_pinned = False


def _pin_malloc_threshold() -> None:
    """On glibc, pin malloc's mmap threshold at 1 MiB, once per process, so that the budget bounds the RSS.

    glibc raises its mmap threshold to the size of the largest block freed
    so far (up to 32 MiB); after that, block-sized arrays come from the heap,
    and the heap fragments as blocks of different lifetimes interleave: the
    resident set then exceeds what is alive by up to two blocks.  With the
    threshold pinned, every array above 1 MiB is mapped on its own and given
    back when freed.  Left alone when ``SDI_KEEP_MALLOC`` is set, or when the
    threshold was already chosen (``MALLOC_MMAP_THRESHOLD_``, ``GLIBC_TUNABLES``).
    """
    global _malloc_pinned
    if _malloc_pinned:
        return
    _malloc_pinned = True
    if (not sys.platform.startswith("linux") or os.environ.get("SDI_KEEP_MALLOC")
            or "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", "")):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


# --------------------------------------------------------------------------- non-finite query rows


def _check_query(q: Query, describe) -> None:
    """Refuse non-finite prepared query features, naming the query row (before any train row is read)."""
    for g in q.groups:
        if q.per_step is not None:
            refuse_non_finite(q.xp, q.per_step[g], 0, describe, "query", q.steps[g])
        if q.summed is not None:
            refuse_non_finite(q.xp, q.summed[g], 0, describe, "query")


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
    _pin_malloc_threshold()
    src = _source(store, "store")
    if normalize not in NORMALIZE:
        raise SDIError(f"self_influence_store(normalize={normalize!r}): expected one of {NORMALIZE}.")
    budget, (start, stop) = parse_bytes(budget), _rank_rows(src.n_examples, int(rank), int(world_size))
    etas = [c.eta for c in src.checkpoints]
    stored = sum((1 if src.summed else src.steps[g.name]) * g.width for g in src.layout.groups) * len(etas)
    rows = max(1, budget // max(1, stored * (_source_dtype(src).itemsize + 8 * 2)))
    per_slot, tracin, describe = [], [], _row_describer(src, "store")
    with _progress(progress, stop - start, "self-influence") as bar:
        for lo, hi, block in src.iter_blocks(int(rows), start, stop):
            xp = array_namespace(*[a for blk in block for a in blk.values()])
            p, t = self_influence_rows(block, etas, per_slot=not src.summed, normalize=normalize, xp=xp, dtype=xp.float64)
            refuse_non_finite(xp, t, lo, describe, "store")
            per_slot.append(None if p is None else to_numpy(p))
            tracin.append(to_numpy(t))
            bar.update(hi - lo)
    n_slots = sum(src.steps.values())
    return SelfInfluence(None if src.summed else np.concatenate(per_slot or [np.zeros((0, n_slots))]),
                         np.concatenate(tracin or [np.zeros(0)]), slot_labels(src.layout, src.steps))
