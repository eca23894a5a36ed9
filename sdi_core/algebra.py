"""The step-decomposition algebra: trajectories, TracIn, step matrices, self-influence, top-k.

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

Everything is computed in blocks of train and query examples; dense results
are assembled only when a dense attribute is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from ._array import device_or_none as _dev, to_numpy
from .factors import SDIError
from .features import Features

NORMALIZE = (None, "cosine")


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


def _group_slots(f: Features) -> list[tuple[str, int, int]]:
    """(group, first slot, number of steps) for each group of ``f``."""
    out, start = [], 0
    for g in f.layout.groups:
        s = f.steps[g.name]
        out.append((g.name, start, s))
        start += s
    return out


def _total_norms(xp, f: Features, k: int, rows: slice):
    """Norm of each example's full (all-groups, step-summed) gradient at checkpoint ``k``: ``[n]``."""
    sq = None
    for g in f.layout.groups:
        tot = xp.sum(f.data[k][g.name][rows, ...], axis=1)
        part = xp.sum(tot * tot, axis=1)
        sq = part if sq is None else sq + part
    norms = xp.sqrt(sq)
    return xp.where(norms > 0, norms, xp.ones_like(norms))


@dataclass
class InfluenceResult:
    """Lazy, blocked influence between train and query features.

    Dense attributes (``trajectory``, ``tracin``, ``train_trajectory``,
    ``step_matrix``) are computed block by block when first read and cached;
    :meth:`top_k` and :meth:`iter_blocks` never hold more than one
    ``train_block x query_block`` tile.

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
        self.xp = self.train.xp
        if self.query.xp is not self.xp:
            raise SDIError(
                f"Train features are {self.xp.__name__} arrays but query features are "
                f"{self.query.xp.__name__} arrays; convert one side (e.g. Features.to_numpy())."
            )
        if self.query.summed:
            raise SDIError("Query features were summed over steps; the query side must keep its steps.")
        self.etas = [c.eta for c in self.train.checkpoints]

    # ----------------------------------------------------------------- labels
    @property
    def query_slot_labels(self) -> list[str]:
        return self.query.slot_labels()

    @property
    def train_slot_labels(self) -> list[str]:
        return self.train.slot_labels()

    # ------------------------------------------------------------- primitives
    def _scaled(self, f: Features, k: int, rows: slice, summed_side: bool):
        """Per-group arrays for rows, cosine-scaled when asked; summed over steps on the train side."""
        xp = self.xp
        norms = _total_norms(xp, f, k, rows) if self.normalize == "cosine" else None
        out = {}
        for g in f.layout.groups:
            a = f.data[k][g.name][rows, ...]
            if summed_side:
                a = xp.sum(a, axis=1)
                if norms is not None:
                    a = a / norms[:, None]
            elif norms is not None:
                a = a / norms[:, None, None]
            out[g.name] = a
        return out

    def _tile(self, i: slice, j: slice, mode: str):
        """One tile of the result for train rows ``i`` and query rows ``j``.

        mode ``"query"`` -> ``[bi, bj, S_query]``; ``"train"`` -> ``[bi, bj, S_train]``;
        ``"matrix"`` -> ``[bi, bj, S_train, S_query]``; ``"tracin"`` -> ``[bi, bj]``.
        """
        xp = self.xp
        total = None
        q_groups = _group_slots(self.query)
        t_groups = _group_slots(self.train)
        for k, eta in enumerate(self.etas):
            if mode in ("query", "tracin"):
                tr = self._scaled(self.train, k, i, summed_side=True)
                qr = self._scaled(self.query, k, j, summed_side=mode == "tracin")
                parts = []
                for name, _, s in q_groups:
                    if mode == "tracin":
                        parts.append(xp.matmul(tr[name], xp.matrix_transpose(qr[name])))
                        continue
                    q = qr[name]
                    bj, _, d = q.shape
                    prod = xp.matmul(tr[name], xp.matrix_transpose(xp.reshape(q, (bj * s, d))))
                    parts.append(xp.reshape(prod, (prod.shape[0], bj, s)))
                tile = sum(parts[1:], parts[0]) if mode == "tracin" else (
                    xp.concat(parts, axis=2) if len(parts) > 1 else parts[0])
            elif mode == "train":
                self._need_steps()
                tr = self._scaled(self.train, k, i, summed_side=False)
                qr = self._scaled(self.query, k, j, summed_side=True)
                parts = []
                for name, _, s in t_groups:
                    t = tr[name]
                    bi, _, d = t.shape
                    prod = xp.matmul(xp.reshape(t, (bi * s, d)), xp.matrix_transpose(qr[name]))
                    parts.append(xp.permute_dims(xp.reshape(prod, (bi, s, prod.shape[1])), (0, 2, 1)))
                tile = xp.concat(parts, axis=2) if len(parts) > 1 else parts[0]
            elif mode == "matrix":
                self._need_steps()
                tr = self._scaled(self.train, k, i, summed_side=False)
                qr = self._scaled(self.query, k, j, summed_side=False)
                rows_out = []
                for name, _, s in t_groups:
                    t = tr[name]
                    bi, _, d = t.shape
                    blocks = []
                    for qname, _, sq in q_groups:
                        q = qr[qname]
                        bj = q.shape[0]
                        if qname != name:
                            blocks.append(xp.zeros((bi, bj, s, sq), dtype=t.dtype, device=_dev(t)))
                            continue
                        prod = xp.matmul(xp.reshape(t, (bi * s, d)), xp.matrix_transpose(xp.reshape(q, (bj * sq, d))))
                        prod = xp.reshape(prod, (bi, s, bj, sq))
                        blocks.append(xp.permute_dims(prod, (0, 2, 1, 3)))
                    rows_out.append(xp.concat(blocks, axis=3) if len(blocks) > 1 else blocks[0])
                tile = xp.concat(rows_out, axis=2) if len(rows_out) > 1 else rows_out[0]
            else:
                raise ValueError(mode)
            tile = tile * eta
            total = tile if total is None else total + tile
        return total

    def _need_steps(self) -> None:
        if self.train.summed:
            raise SDIError(
                "Train-step trajectories and step matrices need per-step train features, but these were "
                "summed over steps. Featurise (or store) the train side with steps kept."
            )

    def _slices(self, n: int, block: int) -> list[slice]:
        return [slice(a, min(a + block, n)) for a in range(0, n, block)]

    def iter_blocks(self, mode: str = "query") -> Iterator[tuple[slice, slice, Any]]:
        """Yield ``(train_rows, query_rows, tile)`` over all tiles (see :meth:`_tile` for modes)."""
        n_tr, n_q = self.train.n_examples, self.query.n_examples
        tiles = [(i, j) for j in self._slices(n_q, self.query_block) for i in self._slices(n_tr, self.train_block)]
        it = tiles
        if self.progress and len(tiles) > 1:
            from tqdm.auto import tqdm

            it = tqdm(tiles, desc=f"scoring ({mode})", unit="tile")
        for i, j in it:
            yield i, j, self._tile(i, j, mode)

    def _dense(self, mode: str):
        if mode not in self._cache:
            xp = self.xp
            cols = []
            for j in self._slices(self.query.n_examples, self.query_block):
                rows = [self._tile(i, j, mode) for i in self._slices(self.train.n_examples, self.train_block)]
                cols.append(xp.concat(rows, axis=0) if len(rows) > 1 else rows[0])
            self._cache[mode] = xp.concat(cols, axis=1) if len(cols) > 1 else cols[0]
        return self._cache[mode]

    # ------------------------------------------------------------------ dense
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

    # ------------------------------------------------------------------ top-k
    def top_k(self, k: int, step: int | None = None, *, largest: bool = True) -> TopK:
        """The ``k`` most influential training examples for every query, streamed over train blocks.

        Args:
            k: how many (clipped to ``N_train``).
            step: a query slot index (negative counts from the end) to rank
                by ``trajectory[..., step]``; None ranks by TracIn.
            largest: rank by largest (proponents) or smallest (opponents) value.
        """
        if not isinstance(k, (int, np.integer)) or k <= 0:
            raise SDIError(f"top_k(k={k!r}): k must be a positive int.")
        n_tr = self.train.n_examples
        k = min(int(k), n_tr)
        n_slots = self.query.n_slots
        if step is not None:
            if not isinstance(step, (int, np.integer)) or not -n_slots <= step < n_slots:
                raise SDIError(
                    f"top_k(step={step!r}): the query has {n_slots} slots {self.query_slot_labels}; "
                    f"pass an index in [-{n_slots}, {n_slots})."
                )
            step = int(step) % n_slots
        mode = "tracin" if step is None else "query"
        n_q = self.query.n_examples
        best_s = np.full((n_q, k), -np.inf if largest else np.inf)
        best_i = np.zeros((n_q, k), dtype=np.int64)
        for i, j, tile in self.iter_blocks(mode):
            scores = to_numpy(tile if step is None else tile[:, :, step]).astype(np.float64).T  # [bj, bi]
            cand_s = np.concatenate([best_s[j], scores], axis=1)
            cand_i = np.concatenate([best_i[j], np.broadcast_to(np.arange(i.start, i.stop), scores.shape)], axis=1)
            key = -cand_s if largest else cand_s
            order = np.argsort(key, axis=1, kind="stable")[:, :k]
            best_s[j] = np.take_along_axis(cand_s, order, axis=1)
            best_i[j] = np.take_along_axis(cand_i, order, axis=1)
        ids = best_i if self.train.example_ids is None else self.train.example_ids[best_i]
        return TopK(best_i, best_s, ids)


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
            parameter selection and checkpoints as ``train``; the loop count
            may differ.
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
        if not isinstance(v, (int, np.integer)) or v <= 0:
            raise SDIError(f"influence({name}={v!r}): must be a positive int.")
    train.check_compatible(query)
    return InfluenceResult(train, query, normalize, int(train_block), int(query_block), progress)


def self_influence(features: Features, *, normalize: str | None = None):
    """Self-influence per query slot, ``[N, S]``: ``I(i, i, t)``; sums over slots to TracIn ``T(i, i)``.

    Needs per-step features.
    """
    if features.summed:
        raise SDIError("self_influence needs per-step features; these were summed over steps.")
    xp = features.xp
    res = InfluenceResult(features, features, normalize)
    n = features.n_examples
    total = None
    for k, eta in enumerate(res.etas):
        tr = res._scaled(features, k, slice(0, n), summed_side=True)
        qr = res._scaled(features, k, slice(0, n), summed_side=False)
        parts = [xp.sum(qr[g.name] * tr[g.name][:, None, :], axis=2) for g in features.layout.groups]
        tile = (xp.concat(parts, axis=1) if len(parts) > 1 else parts[0]) * eta
        total = tile if total is None else total + tile
    return total
