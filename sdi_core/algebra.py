"""The step-decomposition algebra: one contraction kernel for every mode, and the in-memory result.

With per-step features ``phi_s`` (``[N, S_g, D_g]`` per group ``g`` and
checkpoint ``k``) and learning-rate weights ``eta_k``:

- query-step trajectory ``I(i, j, t) = sum_k eta_k <sum_s phi_s(i), phi_t(j)>``
- train-step trajectory ``I(i, j, s) = sum_k eta_k <phi_s(i), sum_t phi_t(j)>``
- step matrix ``M(i, j, s, t) = sum_k eta_k <phi_s(i), phi_t(j)>``
- TracIn ``T(i, j) = sum_t I(i, j, t)`` (lossless: exactly the sum)

Slots are the steps of all groups in group order (``prelude``, ``loop[0..]``,
``coda``).  Parameters of different groups never share a slot, so the step
matrix is block-diagonal over groups.  Only the train side is summed over its
own steps for the query-step trajectory, so the query may run a different
loop count than training.

The kernel, shared by :func:`influence` and :func:`sdi_core.scoring.score_store`:

- a *row source* is anything with ``layout``, ``checkpoints``, ``steps``,
  ``summed``, ``n_examples``, ``example_ids`` and ``iter_blocks(block_rows,
  start, stop)`` yielding ``(row_start, row_stop, [{group: [n, S, D]} per
  checkpoint])``: :class:`~sdi_core.features.Features` (any namespace and
  device) and :class:`~sdi_core.store.FeatureStore` (NumPy memory maps);
- :func:`prepare_query` builds the query side once: per group, every
  checkpoint's features scaled by ``eta_k`` (and cosine norms) side by side
  along the feature axis, columns in the train side's parameter order, so
  that one matrix product per group sums over the checkpoints;
- :func:`train_rows` lays a train block out the same way and :func:`contract`
  gives one tile of a mode, in the arrays' own namespace and on their device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import numpy as np

from ._array import array_namespace, device_or_none, float_dtype_for
from .factors import SDIError
from .features import Features, check_compatible
from .topk import _row_describer, make_merger, refuse_non_finite

NORMALIZE = (None, "cosine")
MODES = ("query", "tracin", "train", "matrix")


class TopK(NamedTuple):
    """Top-k training examples per query.

    Attributes:
        indices: ``[N_query, k]`` int64 positions into the train features
            (most influential first).
        scores: ``[N_query, k]`` the corresponding influence values.
        ids: ``[N_query, k]`` the train ``example_ids`` at those positions
            (equal to ``indices`` when the features carry no ids).
    """

    indices: np.ndarray
    scores: np.ndarray
    ids: np.ndarray


# --------------------------------------------------------------------------- the kernel


@dataclass(frozen=True)
class Query:
    """A query block prepared for contraction (see :func:`prepare_query`).

    ``per_step[g]`` is ``[n * S_g, K * D_g]`` (row ``j * S_g + t``) and
    ``summed[g]`` ``[n, K * D_g]``; either is None when not asked for.
    """

    xp: Any
    device: Any
    dtype: Any
    groups: tuple[str, ...]
    steps: dict[str, int]
    n: int
    per_step: dict[str, Any] | None
    summed: dict[str, Any] | None

    @property
    def itemsize(self) -> int:
        return 8 if self.dtype == self.xp.float64 else 4

    @property
    def nbytes(self) -> int:
        arrays = [a for d in (self.per_step or {}, self.summed or {}) for a in d.values()]
        return sum(int(np.prod(a.shape)) for a in arrays) * self.itemsize


def _cat(xp, parts: list, axis: int = -1):
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=axis)


def _add(parts: list):
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def _norms(xp, sums: dict):
    """Norm of each row's full gradient (all groups, summed over steps) at one checkpoint; 1 where zero."""
    n = xp.sqrt(_add([xp.vecdot(a, a) for a in sums.values()]))
    return xp.where(n > 0, n, xp.ones_like(n))


def prepare_query(query: Features, etas, *, normalize=None, order=None, need=("per_step", "summed"), dtype=None):
    """The query side of every contraction, built once per query block.

    Args:
        query: per-step query features (their namespace and device are kept).
        etas: ``eta_k`` per checkpoint (the train side's).
        normalize: None or ``"cosine"`` (divide by each example's gradient norm).
        order: per group, the query's columns in the train side's parameter
            order (from :func:`~sdi_core.features.check_compatible`).
        need: ``"per_step"`` (query and matrix modes), ``"summed"`` (TracIn
            and train-step modes).
        dtype: computation dtype (default float64 if any input is, else float32).

    Returns:
        :class:`Query`.
    """
    xp = query.xp
    arrays = [a for blk in query.data for a in blk.values()]
    dtype = dtype if dtype is not None else float_dtype_for(xp, *arrays)
    device, n, groups = device_or_none(arrays[0]), query.n_examples, tuple(g.name for g in query.layout.groups)
    scaled = []
    for blk, eta in zip(query.data, etas):
        w = float(eta) if normalize is None else float(eta) / _norms(xp, {g: xp.sum(a, axis=1) for g, a in blk.items()})
        out = {}
        for g in groups:
            a = blk[g] * (w if normalize is None else w[:, None, None])
            if order is not None and order.get(g) is not None:
                a = xp.take(a, xp.asarray(order[g], device=device), axis=2)
            out[g] = xp.astype(a, dtype, copy=False)
        scaled.append(out)
    per_step = summed = None
    if "per_step" in need:
        per_step = {g: _cat(xp, [xp.reshape(s[g], (n * query.steps[g], s[g].shape[2])) for s in scaled])
                    for g in groups}
    if "summed" in need:
        summed = {g: _cat(xp, [xp.sum(s[g], axis=1) for s in scaled]) for g in groups}
    return Query(xp, device, dtype, groups, dict(query.steps), n, per_step, summed)


def train_rows(block: list[dict], *, per_step: bool, normalize=None, xp=None, dtype=None) -> dict:
    """One block of train rows in the kernel's layout.

    Args:
        block: ``[{group: [n, S, D]} per checkpoint]`` as a row source yields it.
        per_step: keep the steps (``[n, S, K * D]`` per group) or sum them out
            (``[n, K * D]``; a view of the block when there is nothing to do).
        normalize: None or ``"cosine"``.
    """
    xp = xp or array_namespace(*[a for blk in block for a in blk.values()])
    block = [{g: xp.astype(a, dtype, copy=False) if dtype is not None else a for g, a in blk.items()} for blk in block]
    sums = None
    if normalize == "cosine" or not per_step:
        sums = [{g: a[:, 0, :] if a.shape[1] == 1 else xp.sum(a, axis=1) for g, a in blk.items()} for blk in block]
    if normalize == "cosine":
        norms = [_norms(xp, s) for s in sums]
        if per_step:
            block = [{g: a / nrm[:, None, None] for g, a in blk.items()} for blk, nrm in zip(block, norms)]
        else:
            sums = [{g: a / nrm[:, None] for g, a in s.items()} for s, nrm in zip(sums, norms)]
    src = block if per_step else sums
    return {g: _cat(xp, [s[g] for s in src]) for g in src[0]}


def query_parts(rows: dict, q: Query) -> list:
    """Per query group ``g``: ``[bi, bj * S_g]``, step-summed train rows against every query step (column ``j*S_g+t``)."""
    return [q.xp.matmul(rows[g], q.xp.matrix_transpose(q.per_step[g])) for g in q.groups]


def contract(rows: dict, q: Query, mode: str):
    """One tile: train rows (:func:`train_rows`, per step for ``train`` and ``matrix``) against a query block.

    Returns ``query`` -> ``[bi, bj, S_query]``; ``tracin`` -> ``[bi, bj]``;
    ``train`` -> ``[bi, bj, S_train]``; ``matrix`` -> ``[bi, bj, S_train, S_query]``
    (zero off the diagonal blocks of groups), eta-weighted and summed over checkpoints.
    """
    xp, bj = q.xp, q.n
    if mode == "query":
        parts = query_parts(rows, q)
        return _cat(xp, [xp.reshape(p, (p.shape[0], bj, q.steps[g])) for g, p in zip(q.groups, parts)], 2)
    if mode == "tracin":
        return _add([xp.matmul(rows[g], xp.matrix_transpose(q.summed[g])) for g in q.groups])
    out = []
    for g, t in rows.items():
        bi, st, kd = t.shape
        flat = xp.reshape(t, (bi * st, kd))
        if mode == "train":
            prod = xp.reshape(xp.matmul(flat, xp.matrix_transpose(q.summed[g])), (bi, st, bj))
            out.append(xp.permute_dims(prod, (0, 2, 1)))
            continue
        blocks = [xp.zeros((bi, bj, st, q.steps[h]), dtype=t.dtype, device=q.device) for h in q.groups]
        prod = xp.reshape(xp.matmul(flat, xp.matrix_transpose(q.per_step[g])), (bi, st, bj, q.steps[g]))
        blocks[q.groups.index(g)] = xp.permute_dims(prod, (0, 2, 1, 3))
        out.append(_cat(xp, blocks, 3))
    return _cat(xp, out, 2)


def self_influence_rows(block: list[dict], etas, *, per_slot: bool, normalize=None, xp=None, dtype=None):
    """Self-influence of the rows of one block: ``([n, S] with I(i, i, t), or None; [n] with T(i, i))``."""
    rows = train_rows(block, per_step=True, normalize=normalize, xp=xp, dtype=dtype)
    xp = xp or array_namespace(*rows.values())
    slots, tracin = [], []
    for g, t in rows.items():
        d = t.shape[2] // len(etas)
        w = xp.asarray(np.repeat(np.asarray(etas, dtype=np.float64), d), dtype=t.dtype, device=device_or_none(t))
        tot = xp.sum(t, axis=1)
        tracin.append(xp.vecdot(tot, tot * w))
        slots.append(xp.vecdot(t, (tot * w)[:, None, :]))
    return (_cat(xp, slots, 1) if per_slot else None), _add(tracin)


# --------------------------------------------------------------------------- the in-memory result


@dataclass
class InfluenceResult:
    """Influence between in-memory train and query features: a dense cache on top of the kernel.

    Dense attributes (``trajectory``, ``tracin``, ``train_trajectory``,
    ``step_matrix``) are assembled from ``train_block x query_block`` tiles
    when first read and cached; :meth:`top_k` and :meth:`iter_blocks` never
    hold more than one tile.  Everything stays in the features' namespace and
    on their device; only top-k winners are copied to NumPy.

    Shapes: ``trajectory [N_train, N_query, S_query]``, ``tracin
    [N_train, N_query]``, ``train_trajectory [N_train, N_query, S_train]``,
    ``step_matrix [N_train, N_query, S_train, S_query]``, where ``S`` counts
    slots of all groups (see :attr:`query_slot_labels`).
    """

    train: Features
    query: Features
    normalize: str | None = None
    train_block: int = 4096
    query_block: int = 1024
    progress: bool = False

    def __post_init__(self) -> None:
        self._cache: dict[str, Any] = {}
        self._queries: dict[int, Query] = {}
        self.xp = self.train.xp
        if self.query.xp is not self.xp:
            raise SDIError(
                f"Train features are {self.xp.__name__} arrays but query features are "
                f"{self.query.xp.__name__} arrays; convert one side (e.g. Features.to_numpy())."
            )
        if self.query.summed:
            raise SDIError("Query features were summed over steps; the query side must keep its steps.")
        self.etas = [c.eta for c in self.train.checkpoints]
        self._order = check_compatible(self.train, self.query)
        arrays = [a for f in (self.train, self.query) for blk in f.data for a in blk.values()]
        self._dtype = float_dtype_for(self.xp, *arrays)

    @property
    def query_slot_labels(self) -> list[str]:
        return self.query.slot_labels()

    @property
    def train_slot_labels(self) -> list[str]:
        return self.train.slot_labels()

    def _query(self, j: slice) -> Query:
        if j.start not in self._queries:
            self._queries[j.start] = prepare_query(self.query.select(j), self.etas, normalize=self.normalize,
                                                   order=self._order, dtype=self._dtype)
        return self._queries[j.start]

    def iter_blocks(self, mode: str = "query") -> Iterator[tuple[slice, slice, Any]]:
        """Yield ``(train_rows, query_rows, tile)`` over all tiles, query blocks outermost (modes: :func:`contract`)."""
        if mode not in MODES:
            raise SDIError(f"iter_blocks(mode={mode!r}): expected one of {MODES}.")
        per_step = mode in ("train", "matrix")
        if per_step and self.train.summed:
            raise SDIError(
                "Train-step trajectories and step matrices need per-step train features, but these were "
                "summed over steps. Featurise (or store) the train side with steps kept."
            )
        n_tr, n_q = self.train.n_examples, self.query.n_examples
        tiles = [(slice(b, min(b + self.query_block, n_q)), a) for b in range(0, n_q, self.query_block)
                 for a in range(0, n_tr, self.train_block)]
        if self.progress and len(tiles) > 1:
            from tqdm.auto import tqdm

            tiles = tqdm(tiles, desc=f"scoring ({mode})", unit="tile")
        for j, a in tiles:
            _, b, block = next(self.train.iter_blocks(self.train_block, a))
            rows = train_rows(block, per_step=per_step, normalize=self.normalize, xp=self.xp, dtype=self._dtype)
            yield slice(a, b), j, contract(rows, self._query(j), mode)

    def _dense(self, mode: str):
        if mode not in self._cache:
            cols: dict[int, list] = {}
            for _, j, tile in self.iter_blocks(mode):
                cols.setdefault(j.start, []).append(tile)
            self._cache[mode] = _cat(self.xp, [_cat(self.xp, c, 0) for c in cols.values()], 1)
        return self._cache[mode]

    @property
    def trajectory(self):
        """Query-step trajectory ``[N_train, N_query, S_query]``; sums over its last axis to :attr:`tracin`."""
        return self._dense("query")

    @property
    def tracin(self):
        """TracIn ``[N_train, N_query]`` (computed from the trajectory when it is already dense)."""
        if "query" in self._cache:
            return self.xp.sum(self._cache["query"], axis=2)
        return self._dense("tracin")

    @property
    def train_trajectory(self):
        """Train-step trajectory ``[N_train, N_query, S_train]`` (needs per-step train features)."""
        return self._dense("train")

    @property
    def step_matrix(self):
        """Step-by-step matrix ``[N_train, N_query, S_train, S_query]`` (block-diagonal over groups)."""
        return self._dense("matrix")

    def top_k(self, k: int, step: int | None = None, *, largest: bool = True) -> TopK:
        """The ``k`` most influential training examples for every query, streamed over train blocks.

        Args:
            k: how many (clipped to ``N_train``).
            step: a query slot index (negative counts from the end) to rank
                by ``trajectory[..., step]``; None ranks by TracIn.
            largest: rank by largest (proponents) or smallest (opponents) value.
        """
        # The merger and the refusal live with the streamed scorer, which builds on this module.

        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise SDIError(f"top_k(k={k!r}): k must be a positive int.")
        k, n_slots = min(int(k), self.train.n_examples), self.query.n_slots
        if step is not None:
            if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not -n_slots <= step < n_slots:
                raise SDIError(
                    f"top_k(step={step!r}): the query has {n_slots} slots {self.query_slot_labels}; "
                    f"pass an index in [-{n_slots}, {n_slots})."
                )
            step = int(step) % n_slots
        mergers: dict[int, Any] = {}
        describe = _row_describer(self.train, "train")
        for i, j, tile in self.iter_blocks("tracin" if step is None else "query"):
            refuse_non_finite(self.xp, tile, i.start, describe, "train")
            if j.start not in mergers:
                mergers[j.start] = make_merger(self.xp, j.stop - j.start, k, largest, self._dtype, self._query(j).device)
            mergers[j.start].update(tile if step is None else tile[:, :, step], i.start)
        parts = [m.result() for m in mergers.values()]
        idx, scores = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return TopK(idx, scores, idx if self.train.example_ids is None else self.train.example_ids[idx])


def influence(
    train: Features,
    query: Features,
    *,
    normalize: str | None = None,
    train_block: int = 4096,
    query_block: int = 1024,
    progress: bool = False,
) -> InfluenceResult:
    """Step-decomposed influence of every train example on every query example.

    Args:
        train: features of the training examples (per step, or summed over
            steps when only the query-step trajectory and TracIn are needed).
        query: per-step features of the query examples.  Same sketch,
            parameter selection (in any order) and checkpoints as ``train``;
            the loop count may differ.
        normalize: None, or ``"cosine"`` to divide, per checkpoint, each
            example's features by the norm of its full gradient (so
            ``trajectory.sum(-1)`` is the cosine TracIn).
        train_block, query_block: tile sizes; memory is bounded by
            ``train_block * query_block * S_query`` numbers per tile.
        progress: show a progress bar over tiles.

    Returns:
        :class:`InfluenceResult` with ``.trajectory``, ``.tracin``,
        ``.train_trajectory``, ``.step_matrix`` and ``.top_k(k, step=None)``.

    Raises:
        SDIError: when the two feature sets come from different sketches,
            parameter selections or checkpoints, or different array libraries.
    """
    if not isinstance(train, Features) or not isinstance(query, Features):
        raise SDIError(
            "influence(train, query) takes sdi_core.Features (the output of a backend's featurize); "
            f"got {type(train).__name__} and {type(query).__name__}."
        )
    if normalize not in NORMALIZE:
        raise SDIError(f"influence(normalize={normalize!r}): expected one of {NORMALIZE}.")
    for name, v in (("train_block", train_block), ("query_block", query_block)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise SDIError(f"influence({name}={v!r}): must be a positive int.")
    return InfluenceResult(train, query, normalize, int(train_block), int(query_block), progress)


def self_influence(features: Features, *, normalize: str | None = None):
    """Self-influence per query slot, ``[N, S]``: ``I(i, i, t)``; sums over slots to TracIn ``T(i, i)``.

    Needs per-step features; computed in the features' namespace and on their device.
    """
    if features.summed:
        raise SDIError("self_influence needs per-step features; these were summed over steps.")
    if normalize not in NORMALIZE:
        raise SDIError(f"self_influence(normalize={normalize!r}): expected one of {NORMALIZE}.")
    xp = features.xp
    dtype = float_dtype_for(xp, *[a for blk in features.data for a in blk.values()])
    return self_influence_rows(features.data, [c.eta for c in features.checkpoints], per_slot=True,
                               normalize=normalize, xp=xp, dtype=dtype)[0]
