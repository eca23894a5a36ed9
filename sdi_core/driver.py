"""The featurize loop, once for every backend: checkpoints x batches -> :class:`~sdi_core.Features`.

A backend supplies a *session* (:class:`FeaturizeSession`): a context
manager held for the whole call (it installs a capture, saves the weights it
will overwrite, switches modes, and restores all of it on exit, even on
error), a way to load a checkpoint, and a way to featurise one batch.  The
driver owns the rest:

- the loop over checkpoints and batches (an iterator of batches is kept as a
  list when there are several checkpoints; a single mapping is one batch);
- padding every group's step axis to the most steps any batch ran (or to
  the count asked for);
- example ids (given, or ``0 .. N-1``), checked against the number of examples;
- one progress bar over checkpoints x batches (tqdm);
- the :class:`~sdi_core.Features` assembly, including ``meta``;
- error context: an :class:`~sdi_core.SDIError` raised for a batch is raised
  again, chained (``from``), with the batch index and checkpoint id in
  front; any other exception gets the same context as a note.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np

from ._array import array_namespace, device_or_none as _dev
from .factors import SDIError
from .features import Checkpoint, CheckpointInfo, Features
from .specs import FeatureLayout

__all__ = ["BatchFeatures", "FeaturizeSession", "featurize"]


@dataclass
class BatchFeatures:
    """What a session returns for one batch.

    Attributes:
        data: ``{group: [B, S_g, D_g]}`` arrays of one namespace
            (``S_g = 1`` when featurised summed).
        steps: ``{group: S_g}``, the steps each group ran in this batch.
        layout: the feature layout of ``data`` (equal for every batch).
    """

    data: dict[str, Any]
    steps: dict[str, int]
    layout: FeatureLayout


class FeaturizeSession(Protocol):
    """The backend's side of :func:`featurize`.

    ``with session:`` is held around the whole loop.  Inside it the driver
    calls ``load(checkpoint)`` once per checkpoint (``None``: the current
    weights) and then ``run(batch, summed=...)`` for every batch;
    ``meta()`` at the end adds entries to ``Features.meta``.
    """

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc) -> Any: ...

    def load(self, checkpoint: Checkpoint | None) -> CheckpointInfo: ...

    def run(self, batch: Any, *, summed: bool) -> BatchFeatures: ...

    def meta(self) -> dict: ...


def _with_context(exc: BaseException, context: str) -> BaseException:
    if isinstance(exc, SDIError):
        return SDIError(f"{context}: {exc}")
    if hasattr(exc, "add_note"):
        exc.add_note(f"sdi: raised while featurising {context}")
    return exc


def _pad_steps(x, n: int):
    if x.shape[1] == n:
        return x
    xp = array_namespace(x)
    pad = xp.zeros((x.shape[0], n - x.shape[1], x.shape[2]), dtype=x.dtype, device=_dev(x))
    return xp.concat([x, pad], axis=1)


def _target_steps(seen: dict[str, int], steps) -> dict[str, int]:
    if steps is None:
        return dict(seen)
    want = {"loop": int(steps)} if isinstance(steps, (int, np.integer)) else {k: int(v) for k, v in steps.items()}
    out = dict(seen)
    for g, n in want.items():
        if g not in seen:
            raise SDIError(f"featurize(steps={steps}): there is no group {g!r}; the groups are {sorted(seen)}.")
        if seen[g] > n:
            raise SDIError(f"featurize(steps={steps}): a batch ran {seen[g]} steps of group {g!r}; pass at least that.")
        out[g] = n
    return out


def featurize(
    session: FeaturizeSession,
    batches: Iterable | Mapping,
    checkpoints: Sequence[Checkpoint] | None = None,
    *,
    steps: int | Mapping[str, int] | None = None,
    example_ids: Sequence[int] | None = None,
    summed: bool = False,
    progress: bool = True,
    desc: str = "featurize batches",
    meta: Mapping[str, Any] | None = None,
    default_ids: bool = True,
) -> Features:
    """Features of every example of ``batches`` at every checkpoint.

    Args:
        session: the backend's :class:`FeaturizeSession`.
        batches: an iterable of batches (whatever the session runs), or one
            batch given as a mapping.
        checkpoints: :class:`~sdi_core.Checkpoint` objects, passed to
            ``session.load`` in turn; None: the session's current weights.
        steps: pad the step axis to this many steps: an int for the
            ``"loop"`` group or ``{group: S}``; default the most steps any
            batch ran, per group.
        example_ids: integer ids, one per example (default ``0 .. N-1``, or
            none with ``default_ids=False``).
        summed: featurise summed over steps (``S_g = 1``, ``Features.summed``).
        progress: show a progress bar over checkpoints x batches.
        desc: the progress bar's label.
        meta: entries for ``Features.meta`` (the session's ``meta()`` is added).
        default_ids: number the examples ``0 .. N-1`` when ``example_ids``
            is None (False: the features carry no ids, so that shards of a
            store written call by call do not repeat ids).

    Returns:
        :class:`~sdi_core.Features`, one ``{group: [N, S_g, D_g]}`` block per
        checkpoint, in the namespace the session returned.
    """
    if isinstance(batches, Mapping):
        batches = [batches]
    ckpts: list = [None] if checkpoints is None else list(checkpoints)
    if not ckpts:
        raise SDIError("checkpoints is empty; pass None for the current weights or a list of sdi_core.Checkpoint.")
    if len(ckpts) > 1 and iter(batches) is batches:
        batches = list(batches)  # re-iterated once per checkpoint
    total = len(ckpts) * len(batches) if hasattr(batches, "__len__") else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit="batch", leave=False)
    infos: list[CheckpointInfo] = []
    per_ckpt: list[list[BatchFeatures]] = []
    layout = None
    try:
        with session:
            for ck in ckpts:
                info = session.load(ck)
                rows = []
                for index, batch in enumerate(batches):
                    try:
                        bf = session.run(batch, summed=bool(summed))
                    except Exception as exc:
                        wrapped = _with_context(exc, f"Batch {index} (checkpoint {info.id!r})")
                        if wrapped is exc:
                            raise
                        raise wrapped from exc
                    if layout is None:
                        layout = bf.layout
                    elif bf.layout != layout:
                        raise SDIError(
                            f"Batch {index} (checkpoint {info.id!r}) has a different feature layout than batch 0 "
                            f"({bf.layout.diff(layout) or 'parameter order differs'}); keep the model and the "
                            "selection the same across batches."
                        )
                    rows.append(bf)
                    if bar is not None:
                        bar.update(1)
                if not rows:
                    raise SDIError("featurize got no batches; pass a non-empty iterable of batches.")
                infos.append(info)
                per_ckpt.append(rows)
            extra = dict(session.meta() or {})
    finally:
        if bar is not None:
            bar.close()
    return _assemble(per_ckpt, infos, layout, steps, example_ids, bool(summed), {**extra, **dict(meta or {})},
                     default_ids)


def _assemble(per_ckpt, infos, layout, steps, example_ids, summed, meta, default_ids) -> Features:
    seen = {g.name: 1 for g in layout.groups}
    for rows in per_ckpt:
        for bf in rows:
            for g in seen:
                seen[g] = max(seen[g], int(bf.steps.get(g, 1)))
    target = _target_steps(seen, steps)
    data = []
    for rows in per_ckpt:
        block = {}
        for g in seen:
            parts = [bf.data[g] if summed else _pad_steps(bf.data[g], target[g]) for bf in rows]
            block[g] = parts[0] if len(parts) == 1 else array_namespace(*parts).concat(parts, axis=0)
        data.append(block)
    n = int(next(iter(data[0].values())).shape[0])
    if example_ids is None:
        ids = np.arange(n, dtype=np.int64) if default_ids else None
    else:
        ids = np.asarray(example_ids)
        if ids.shape != (n,):
            raise SDIError(f"example_ids has shape {ids.shape}; the batches hold {n} examples, expected ({n},).")
    return Features(data=data, layout=layout, checkpoints=tuple(infos), steps=target, example_ids=ids,
                    summed=summed, meta=meta)
