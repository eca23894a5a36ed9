"""Featurisation sharded over devices with ``jax.sharding``, into an ``sdi_core`` feature store.

Each batch is split along its example axis over a one-axis device mesh
(``NamedSharding(mesh, P("batch"))``) and the parameters are replicated; the
attributor's jitted featurisation then runs SPMD, every device computing the
features of its own examples (rows are independent, so nothing else is
communicated).  Batches whose size is not a multiple of the device count are
padded with copies of their last example, whose features are dropped.

With several JAX processes (``jax.distributed.initialize``), each process
writes its own shards of the store over its local devices, with
``jax.process_index()`` / ``jax.process_count()`` as rank and world size.

Test on CPU with ``XLA_FLAGS=--xla_force_host_platform_device_count=2``
(set before JAX starts).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sdi_core import Checkpoint, Features, SDIError
from sdi_core import store as _store

__all__ = ["batch_mesh", "shard_batch", "sharded_featurizer", "ShardedFeaturizer", "featurize_to_store"]

AXIS = "batch"


def batch_mesh(devices: Sequence[Any] | None = None, axis_name: str = AXIS) -> Mesh:
    """A one-axis mesh over ``devices`` (default: this process's local devices)."""
    devices = list(jax.local_devices() if devices is None else devices)
    if not devices:
        raise SDIError("batch_mesh: no devices given.")
    return Mesh(np.array(devices), (axis_name,))


def shard_batch(batch, mesh: Mesh, axis_name: str = AXIS) -> tuple[Any, int]:
    """Pad the example axis (0) of every leaf to a multiple of the mesh size and shard it over the mesh.

    Returns:
        ``(sharded batch, number of real examples)``.
    """
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise SDIError("shard_batch: the batch has no array leaves.")
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        raise SDIError(
            f"shard_batch: every batch leaf needs the example axis first and the same number of examples; got "
            f"leading sizes {sorted(s for s in sizes if s is not None)}{' and scalars' if None in sizes else ''}."
        )
    n = sizes.pop()
    n_dev = mesh.devices.size
    pad = (-n) % n_dev

    def put(x):
        x = np.asarray(x)
        if pad:
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0)
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(axis_name)))

    return jax.tree_util.tree_map(put, batch), n


class ShardedFeaturizer:
    """``featurize_fn`` for :func:`sdi_core.store.featurize_to_store`: an attributor run over a device mesh.

    Calling it with a list of batches returns host (NumPy) :class:`Features`;
    :meth:`features` returns the device arrays, still sharded over the mesh.

    Args:
        attributor: an :class:`sdi_jax.Attributor` (example axis 0 of every batch leaf).
        checkpoints: :class:`sdi_core.Checkpoint` objects with params pytrees.
        devices: the devices to shard over (default: all local devices).
        ids_key: a batch mapping's entry holding the example ids ``[B]``;
            it is taken out of the batch before the loss sees it.  Without
            it the features carry no ids.
    """

    def __init__(self, attributor, checkpoints: Sequence[Checkpoint], *, devices=None, ids_key: str | None = "ids"):
        if attributor.batch_axes != 0:
            raise SDIError(
                f"Sharded featurisation splits axis 0 of every batch leaf, but the attributor has "
                f"batch_axes={attributor.batch_axes!r}. Put the example axis first."
            )
        self.attributor = attributor
        self.mesh = batch_mesh(devices)
        self.ids_key = ids_key
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.checkpoints = []
        for c in checkpoints:
            c = c if isinstance(c, Checkpoint) else Checkpoint(c)
            if c.name is None:
                from sdi_core.weights import checkpoint_id

                from .attributor import named_leaves

                c = replace(c, name=checkpoint_id(named_leaves(c.source)))  # the id of the unsharded params
            self.checkpoints.append(replace(c, source=jax.device_put(c.source, replicated)))

    def features(self, batch_list: list) -> Features:
        """Features of the batches, as device arrays sharded over the mesh's example axis."""
        parts = []
        for batch in batch_list:
            ids = None
            if self.ids_key is not None and isinstance(batch, Mapping) and self.ids_key in batch:
                ids = np.asarray(batch[self.ids_key])
                batch = {k: v for k, v in batch.items() if k != self.ids_key}
            sharded, n = shard_batch(batch, self.mesh)
            n_padded = jax.tree_util.tree_leaves(sharded)[0].shape[0]
            padded_ids = None
            if ids is not None:
                if ids.shape != (n,):
                    raise SDIError(f"batch[{self.ids_key!r}] has shape {ids.shape}; the batch has {n} examples.")
                padded_ids = np.concatenate([ids, np.full(n_padded - n, -1, dtype=ids.dtype)])
            f = self.attributor.featurize([sharded], self.checkpoints, example_ids=padded_ids, progress=False)
            f = f.select(slice(0, n)) if n_padded != n else f
            if ids is None:
                f = replace(f, example_ids=None)
            parts.append(f)
        if not parts:
            raise SDIError("ShardedFeaturizer: no batches given.")
        if len({p.example_ids is None for p in parts}) != 1:
            raise SDIError(f"Some batches carry {self.ids_key!r} and some do not; give ids for all batches or none.")
        return Features.concat(parts)

    def __call__(self, batch_list: list) -> Features:
        return self.features(batch_list).to_numpy()


def sharded_featurizer(attributor, checkpoints, *, devices=None, ids_key: str | None = "ids") -> ShardedFeaturizer:
    """Shorthand for :class:`ShardedFeaturizer`."""
    return ShardedFeaturizer(attributor, checkpoints, devices=devices, ids_key=ids_key)


def featurize_to_store(
    path: str | os.PathLike,
    attributor,
    batches: Iterable,
    checkpoints: Sequence[Checkpoint],
    *,
    devices=None,
    ids_key: str | None = "ids",
    shard_size: int = 1,
    summed: bool = False,
    dtype: str = "float32",
    split: str | None = None,
    consolidate: bool = True,
    progress: bool = False,
    config=None,
    fingerprint=_store.batch_fingerprint,
    verify: bool = True,
) -> _store.FeatureStore:
    """Featurise ``batches`` into a store, each batch sharded over this process's devices.

    Resumable like :func:`sdi_core.store.featurize_to_store`.  With several
    JAX processes every process must call it with the same ``batches``; each
    writes the shards of its ``jax.process_index()``, then process 0
    finalises the store once all have finished.
    """
    fn = ShardedFeaturizer(attributor, checkpoints, devices=devices, ids_key=ids_key)
    rank, world = jax.process_index(), jax.process_count()
    _store.featurize_to_store(path, fn, batches, shard_size=shard_size, summed=summed, dtype=dtype, split=split,
                              rank=rank, world_size=world, consolidate=consolidate and world == 1, progress=progress,
                              config=config, fingerprint=fingerprint, verify=verify)
    if world > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("sdi featurize_to_store: shards written")
        if rank == 0:
            _store.finalize_store(path, consolidate=consolidate, verify=verify)
        multihost_utils.sync_global_devices("sdi featurize_to_store: store finalised")
    return _store.FeatureStore(path)
