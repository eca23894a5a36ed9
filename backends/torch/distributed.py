"""Feature stores and scoring across ``torchrun`` processes (gloo on CPU, NCCL on GPU).

Each rank featurises its own shards of the training set into the same store
(:func:`sdi_core.store.featurize_to_store` with this rank and world size),
the ranks meet at a collective, and rank 0 finalises the store.  Scoring can
be split the same way: each rank scores its share of the train rows and the
partial top-k lists are gathered and merged.  The only communication is
``torch.distributed``'s own collectives; the store itself is the shared
medium (a filesystem every rank can reach).

Usage, launched with ``torchrun --nproc-per-node N script.py``::

    import sdi_torch.distributed as sd
    sd.init_from_env()                          # gloo on CPU, NCCL when CUDA is available
    fn = sd.attributor_featurizer(attr, checkpoints, steps=tau)
    store = sd.featurize_to_store("train.store", fn, batches, shard_size=8, summed=True)
    scores = sd.score_store(store, query_features, k=10, budget="2GiB")   # same result on every rank

Without an initialised process group every function runs as a single process.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from sdi_core import Features, SDIError
from sdi_core import scoring as _scoring
from sdi_core import store as _store

from .attributor import _checkpoint_list

__all__ = ["init_from_env", "process_group", "rank_and_world", "featurize_to_store", "score_store", "attributor_featurizer"]


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from ``torchrun``'s environment when there is one.

    Args:
        backend: ``"gloo"``, ``"nccl"``, ...; default NCCL when CUDA is
            available, else gloo.  On NCCL the current CUDA device is set to
            ``LOCAL_RANK``.

    Returns:
        True when a process group is (now) initialised, False for a plain
        single-process run (no ``WORLD_SIZE`` in the environment).
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and "MASTER_ADDR" not in os.environ:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


@contextlib.contextmanager
def process_group(backend: str | None = None):
    """``with process_group(): ...``: :func:`init_from_env` on entry; on exit, a barrier and the group's
    destruction when this call created it (a rank that exits with its group alive can abort in teardown)."""
    created = dist.is_available() and not dist.is_initialized() and init_from_env(backend)
    try:
        yield rank_and_world()
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def rank_and_world(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process in ``group`` (``(0, 1)`` without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _gather(obj, group) -> list:
    world = rank_and_world(group)[1]
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def _raise_if_any_failed(local: BaseException | None, what: str, group) -> None:
    """All ranks learn whether any rank failed (so none waits forever), and all raise."""
    reports = _gather(None if local is None else f"{type(local).__name__}: {local}", group)
    if local is not None:
        raise local
    failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
    if failed:
        r, msg = failed[0]
        raise SDIError(f"{what} failed on rank {r}: {msg}. Fix it and rerun every rank: finished shards are kept.")


def featurize_to_store(
    path: str | os.PathLike,
    featurize_fn: Callable[[list], Features],
    batches: Iterable,
    *,
    shard_size: int = 1,
    summed: bool = False,
    dtype: str = "float32",
    split: str | None = None,
    consolidate: bool = True,
    progress: bool = False,
    config=None,
    fingerprint=_store.batch_fingerprint,
    verify: bool = True,
    group=None,
) -> _store.FeatureStore:
    """Every rank writes its shards of one store; rank 0 finalises it; every rank returns it.

    Same arguments as :func:`sdi_core.store.featurize_to_store`, with rank and
    world size taken from the process group.  Resumable: after a crash rerun
    the same ``torchrun`` command.  Every rank must pass the same ``batches``
    (each featurises only shards ``i`` with ``i % world_size == rank``).
    """
    rank, world = rank_and_world(group)
    err = None
    try:
        _store.featurize_to_store(path, featurize_fn, batches, shard_size=shard_size, summed=summed, dtype=dtype,
                                  split=split, rank=rank, world_size=world, consolidate=consolidate and world == 1,
                                  progress=progress, config=config, fingerprint=fingerprint, verify=verify)
    except BaseException as exc:  # reported to every rank before anyone waits on a collective
        err = exc
    _raise_if_any_failed(err, "featurize_to_store", group)
    if world > 1:
        err = None
        if rank == 0:
            try:
                _store.finalize_store(path, consolidate=consolidate, verify=verify)
            except BaseException as exc:
                err = exc
        _raise_if_any_failed(err, "finalize_store", group)
    return _store.FeatureStore(path)


def score_store(train, query, *, group=None, **kwargs) -> _scoring.StreamedScores:
    """:func:`sdi_core.scoring.score_store` split over the ranks by train rows; the merged result on every rank.

    Each rank scores rows ``[N * rank // world, N * (rank + 1) // world)``;
    top-k lists (and any dense outputs) are gathered with
    ``all_gather_object`` and merged exactly.  ``kwargs`` are those of
    :func:`sdi_core.scoring.score_store` (``k``, ``budget``, ``dense``, ...).
    """
    if "rank" in kwargs or "world_size" in kwargs:
        raise SDIError("sdi_torch.distributed.score_store takes rank and world size from the process group.")
    rank, world = rank_and_world(group)
    part, err = None, None
    try:
        part = _scoring.score_store(train, query, rank=rank, world_size=world, **kwargs)
    except BaseException as exc:
        err = exc
    _raise_if_any_failed(err, "score_store", group)
    return _scoring.StreamedScores.merge(_gather(part, group))


def attributor_featurizer(
    attributor,
    checkpoints: Sequence[Any],
    *,
    steps: int | None = None,
    ids_key: str | None = "ids",
    to_numpy: bool = True,
) -> Callable[[list], Features]:
    """``featurize_fn`` for a store from an :class:`sdi_torch.Attributor`.

    Batches are whatever the attributor's ``loss_fn`` takes.  When a batch is
    a mapping with an ``ids_key`` entry (int ``[B]``), it is removed from the
    batch and used as the example ids; otherwise the store has no ids (rows
    are identified by position).  ``steps`` pads every batch to the same loop
    count (needed when batches may exit early); None: the Attributor's own ``steps``.
    """

    def featurize(batch_list: list) -> Features:
        ids, clean = [], []
        for b in batch_list:
            if ids_key is not None and isinstance(b, dict) and ids_key in b:
                ids.append(np.asarray(b[ids_key].cpu() if isinstance(b[ids_key], torch.Tensor) else b[ids_key]))
                b = {k: v for k, v in b.items() if k != ids_key}
            clean.append(b)
        if ids and len(ids) != len(clean):
            raise SDIError(f"Some batches carry {ids_key!r} and some do not; give ids for all batches or none.")
        f = attributor._featurize(clean, _checkpoint_list(checkpoints), steps=steps,
                                  example_ids=np.concatenate(ids) if ids else None, summed=False, progress=False)
        if not ids:
            f.example_ids = None
        return f.to_numpy() if to_numpy else f

    return featurize
