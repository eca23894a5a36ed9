"""Checkpoints and the feature container that backends return and the algebra consumes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np

from ._array import array_namespace, to_numpy
from .factors import SDIError
from .specs import FeatureLayout


@dataclass(frozen=True)
class Checkpoint:
    """One training checkpoint and its learning-rate weight ``eta_k``.

    Args:
        source: whatever the backend can load weights from: a file path, a
            PyTorch ``state_dict``, a JAX params pytree.  The core never
            interprets it.
        eta: learning-rate weight of this checkpoint in the TracIn sum
            ``sum_k eta_k <grad_i, grad_j>`` (a positive float).  When None,
            a backend reads it from the checkpoint file when it records one
            and otherwise uses 1.0.
        name: identity used to match train and query features; defaults to
            the path for file sources and to a hash of the weights otherwise.
        step: training step the checkpoint was taken at (informational).
    """

    source: Any
    eta: float | None = None
    name: str | None = None
    step: int | None = None

    def __post_init__(self) -> None:
        if self.eta is not None:
            eta = float(self.eta)
            if not math.isfinite(eta) or eta <= 0:
                raise SDIError(f"Checkpoint eta must be a positive finite float, got {self.eta!r}.")
            object.__setattr__(self, "eta", eta)


@dataclass(frozen=True)
class CheckpointInfo:
    """Identity and weight of a checkpoint as recorded in features."""

    id: str
    eta: float
    step: int | None = None


@dataclass
class Features:
    """Per-step features of N examples at K checkpoints.

    Attributes:
        data: one dict per checkpoint, mapping group name to an array of shape
            ``[N, S_g, D_g]`` (``S_g`` steps of the group, ``D_g`` features per
            step; see :class:`~sdi_core.specs.FeatureLayout`).  When
            ``summed`` is true, ``S_g == 1`` and holds the sum over steps
            (enough for the train side of the query-step trajectory).
        layout: sketch fingerprint, groups and parameter offsets.
        checkpoints: one :class:`CheckpointInfo` per entry of ``data``.
        steps: number of steps of each group (before any summing).
        example_ids: optional integer ids of the N examples (NumPy, ``[N]``).
        summed: whether the step axis has been summed out.
    """

    data: list[dict[str, Any]]
    layout: FeatureLayout
    checkpoints: tuple[CheckpointInfo, ...]
    steps: dict[str, int]
    example_ids: np.ndarray | None = None
    summed: bool = False
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.data) != len(self.checkpoints):
            raise SDIError(
                f"Features: {len(self.data)} checkpoint blocks but {len(self.checkpoints)} checkpoint infos."
            )
        self.checkpoints = tuple(self.checkpoints)
        n = None
        for k, block in enumerate(self.data):
            for g in self.layout.groups:
                if g.name not in block:
                    raise SDIError(f"Features: checkpoint {k} has no array for group {g.name!r}.")
                arr = block[g.name]
                if arr.ndim != 3:
                    raise SDIError(f"Features[{k}][{g.name!r}] must be [N, steps, D], got shape {tuple(arr.shape)}.")
                want_s = 1 if self.summed else self.steps[g.name]
                if tuple(arr.shape[1:]) != (want_s, g.width):
                    raise SDIError(
                        f"Features[{k}][{g.name!r}] has shape {tuple(arr.shape)}, expected "
                        f"[N, {want_s}, {g.width}] from the layout."
                    )
                if n is None:
                    n = arr.shape[0]
                elif arr.shape[0] != n:
                    raise SDIError(f"Features: groups/checkpoints disagree on N ({arr.shape[0]} vs {n}).")
        if self.example_ids is not None:
            self.example_ids = np.asarray(self.example_ids)
            if n is not None and self.example_ids.shape != (n,):
                raise SDIError(f"Features.example_ids has shape {self.example_ids.shape}, expected ({n},).")

    # ------------------------------------------------------------------ views
    @property
    def n_examples(self) -> int:
        first = self.data[0][self.layout.groups[0].name]
        return int(first.shape[0])

    def __len__(self) -> int:
        return self.n_examples

    @property
    def n_slots(self) -> int:
        """Length of the slot axis: the steps of all groups, in group order."""
        return sum(self.steps[g.name] for g in self.layout.groups)

    def slot_labels(self) -> list[str]:
        """Human-readable label of each slot, e.g. ``["prelude", "loop[0]", ..., "coda"]``."""
        return slot_labels(self.layout, self.steps)

    @property
    def xp(self):
        return array_namespace(*[a for block in self.data for a in block.values()])

    def sum_steps(self) -> "Features":
        """Features with the step axis summed out (``[N, 1, D_g]`` per group)."""
        if self.summed:
            return self
        xp = self.xp
        data = [{g: xp.sum(a, axis=1, keepdims=True) for g, a in block.items()} for block in self.data]
        return replace(self, data=data, summed=True)

    def to_numpy(self) -> "Features":
        """A copy whose arrays are NumPy arrays (on the host)."""
        data = [{g: to_numpy(a) for g, a in block.items()} for block in self.data]
        return replace(self, data=data)

    def select(self, index) -> "Features":
        """Rows ``index`` (a slice or an integer array) of every array."""
        xp = self.xp
        if isinstance(index, slice):
            data = [{g: a[index, ...] for g, a in block.items()} for block in self.data]
            ids = None if self.example_ids is None else self.example_ids[index]
        else:
            idx_np = np.asarray(index, dtype=np.int64)
            first = next(iter(self.data[0].values()))
            idx = xp.asarray(idx_np, device=getattr(first, "device", None)) if not isinstance(first, np.ndarray) else idx_np
            data = [{g: xp.take(a, idx, axis=0) for g, a in block.items()} for block in self.data]
            ids = None if self.example_ids is None else self.example_ids[idx_np]
        return replace(self, data=data, example_ids=ids)

    def check_compatible(self, other, what: str = "train and query features") -> dict[str, np.ndarray | None]:
        """:func:`check_compatible` of ``self`` and ``other`` (a ``Features`` or a ``FeatureStore``)."""
        return check_compatible(self, other, what)

    def iter_blocks(self, block_rows: int, start: int = 0, stop: int | None = None):
        """Yield ``(row_start, row_stop, [{group: [n, S, D]} per checkpoint])`` over rows ``[start, stop)``.

        Blocks of ``block_rows`` rows from ``start`` (the last may be shorter), as views on the
        features' own namespace and device: the row-source protocol that scoring reads
        (:meth:`sdi_core.store.FeatureStore.iter_blocks` yields the same).
        """
        stop = self.n_examples if stop is None else min(stop, self.n_examples)
        for a in range(start, stop, block_rows):
            b = min(stop, a + block_rows)
            yield a, b, [{g.name: blk[g.name][a:b, ...] for g in self.layout.groups} for blk in self.data]

    @staticmethod
    def concat(parts: Sequence["Features"]) -> "Features":
        """Concatenate feature sets of the same layout and checkpoints along N."""
        parts = list(parts)
        if not parts:
            raise SDIError("Features.concat needs at least one part.")
        first = parts[0]
        for p in parts[1:]:
            check_compatible(first, p, "feature batches", ordered=True)
            if p.summed != first.summed:
                raise SDIError("Features.concat: cannot mix step-summed and per-step features.")
            if p.steps != first.steps:
                raise SDIError(
                    f"Features.concat: step counts differ between batches ({first.steps} vs {p.steps}); "
                    "featurise all batches with the same loop count."
                )
        if len(parts) == 1:
            return first
        xp = first.xp
        data = [
            {g: xp.concat([p.data[k][g] for p in parts], axis=0) for g in first.data[k]}
            for k in range(len(first.data))
        ]
        ids = None
        if all(p.example_ids is not None for p in parts):
            ids = np.concatenate([p.example_ids for p in parts])
        return replace(first, data=data, example_ids=ids)

    def __repr__(self) -> str:
        groups = ", ".join(f"{g.name}: {self.steps[g.name]} steps x {g.width}" for g in self.layout.groups)
        return (
            f"Features(N={self.n_examples}, checkpoints={len(self.checkpoints)}, {groups}, "
            f"sketch={dict(self.layout.sketch)}{', summed' if self.summed else ''})"
        )


def slot_labels(layout: FeatureLayout, steps: Mapping[str, int]) -> list[str]:
    """Label of each slot of a feature set, e.g. ``["prelude", "loop[0]", ..., "coda"]``."""
    labels = []
    for g in layout.groups:
        s = steps[g.name]
        labels += [g.name] if s == 1 and g.name != "loop" else [f"{g.name}[{t}]" for t in range(s)]
    return labels


def check_compatible(a, b, what: str = "train and query features", *, ordered: bool = False):
    """The one check that two feature sets can be combined; returns how to line up their columns.

    ``a`` and ``b`` are :class:`Features`, :class:`~sdi_core.store.FeatureStore`
    or anything with a ``layout`` and ``checkpoints``.  They must share the
    sketch, the parameters (matched by name and canonical shape, in any order
    within a group unless ``ordered``) and the checkpoints (ids, etas, and
    training steps where both record them).  Loop counts and dtypes may differ.

    Returns:
        per group, the columns of ``b`` in ``a``'s parameter order, or None
        where the orders agree (:meth:`~sdi_core.specs.FeatureLayout.column_order`).

    Raises:
        SDIError: naming the first field that differs, and the fix.
    """
    d = a.layout.diff(b.layout, ordered=ordered)
    if d is None:
        ids_a, ids_b = [c.id for c in a.checkpoints], [c.id for c in b.checkpoints]
        etas_a, etas_b = [c.eta for c in a.checkpoints], [c.eta for c in b.checkpoints]
        steps = [(c.step, e.step) for c, e in zip(a.checkpoints, b.checkpoints)]
        if ids_a != ids_b:
            d = f"checkpoints differ: they were featurised at different checkpoints ({ids_a} vs {ids_b})"
        elif not np.allclose(etas_a, etas_b, rtol=1e-12, atol=0):
            d = f"checkpoint etas differ ({etas_a} vs {etas_b})"
        elif any(s is not None and t is not None and s != t for s, t in steps):
            d = f"checkpoints differ: training steps {[s for s, _ in steps]} vs {[t for _, t in steps]}"
    if d is not None:
        raise SDIError(
            f"Cannot combine {what}: {d}. Featurise both with the same sketch (kind, dim and seed), the same "
            "parameter selection of the same model, and the same checkpoints list."
        )
    return a.layout.column_order(b.layout)
