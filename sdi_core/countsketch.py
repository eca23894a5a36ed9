"""CountSketch along the last axis, correct when hashes collide.

The array API has no scatter-add, and ``array_api_extra.at(...).add`` keeps a
single write per repeated index on NumPy.  The portable implementation here is
a *bucketed gather*: the NumPy-side plan lists, for every output bucket, the
input positions that hash to it (padded with a pointer to an appended zero),
so the sketch is ``sum(take(values * sign, plan), axis=-1)``: gathers and a
sum, no scatter.  Native scatter-adds (``np.bincount``, ``Tensor.index_add_``,
``jax.Array.at[].add``) are fast paths that the tests check against it.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from ._array import array_namespace, device_or_none as _device_or_none, is_jax_namespace, is_numpy_namespace, is_torch_namespace

METHODS = ("auto", "portable", "native")


class HashTable:
    """A hash ``h: [n] -> [m]`` with signs, plus cached device copies and the gather plan.

    Args:
        index: int array ``[n]`` with values in ``[0, m)``.
        sign: float array ``[n]`` of +1/-1.
        m: number of buckets.
    """

    def __init__(self, index: np.ndarray, sign: np.ndarray, m: int) -> None:
        self.index = np.ascontiguousarray(index, dtype=np.int64)
        self.sign = np.ascontiguousarray(sign, dtype=np.float64)
        self.m = int(m)
        self._gather: np.ndarray | None = None
        self._cache: dict = {}

    @property
    def n(self) -> int:
        return int(self.index.shape[0])

    def gather_plan(self) -> np.ndarray:
        """``[m, c_max]`` positions into ``values`` padded with ``n`` (the zero column)."""
        if self._gather is None:
            order = np.argsort(self.index, kind="stable")
            counts = np.bincount(self.index, minlength=self.m)
            c_max = max(int(counts.max(initial=0)), 1)
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            slot = np.arange(self.n) - np.repeat(starts, counts)
            plan = np.full((self.m, c_max), self.n, dtype=np.int64)
            plan[self.index[order], slot] = order
            self._gather = plan
        return self._gather

    def on(self, xp, like, name: str, dtype=None):
        """Table ``name`` as an ``xp`` array on ``like``'s device (cached per namespace, device and dtype).

        Names: ``"index"``, ``"sign"``, ``"gather"`` (the portable plan) and
        ``"index2"``: the index with negative-sign positions shifted to
        buckets ``m .. 2m - 1``, for scattering unsigned values into two
        halves whose difference is the sketch (see :mod:`sdi_core.engine`).
        """
        dev = _device_or_none(like)
        key = (xp.__name__, str(dev), str(dtype), name)
        if key not in self._cache:
            if name == "index":
                host = self.index
            elif name == "sign":
                host = self.sign
            elif name == "gather":
                host = self.gather_plan().reshape(-1)
            elif name == "index2":
                host = self.index + self.m * (self.sign < 0)
            else:
                raise KeyError(name)
            arr = _asarray(xp, host, dev)
            if dtype is not None:
                arr = xp.astype(arr, dtype)
            if _is_jax_tracer(arr):
                # Inside a jit trace the copy is a tracer: caching it would leak it into the next
                # trace (a retrace for new shapes or shardings fails with UnexpectedTracerError).
                return arr
            self._cache[key] = arr
        return self._cache[key]

    def subset(self, lo: int, hi: int) -> "HashTable":
        """The table restricted to positions ``[lo, hi)`` (cached)."""
        if (lo, hi) == (0, self.n):
            return self
        key = ("subset", lo, hi)
        if key not in self._cache:
            self._cache[key] = HashTable(self.index[lo:hi], self.sign[lo:hi], self.m)
        return self._cache[key]


def _is_jax_tracer(x) -> bool:
    jax = sys.modules.get("jax")  # never import jax here: only a loaded jax can have made a tracer
    return jax is not None and isinstance(x, jax.core.Tracer)


def _asarray(xp, host: np.ndarray, dev):
    if is_numpy_namespace(xp):
        return host
    if dev is None:
        return xp.asarray(host)
    return xp.asarray(host, device=dev)


def countsketch(values: Any, table: HashTable, *, method: str = "auto") -> Any:
    """CountSketch of ``values`` along its last axis.

    Args:
        values: float array ``[..., n]`` (any array-API namespace).
        table: the hash and signs, ``n`` positions into ``table.m`` buckets.
        method: ``"portable"`` (bucketed gather, any namespace), ``"native"``
            (the namespace's scatter-add; NumPy, PyTorch and JAX only) or
            ``"auto"`` (native where available).

    Returns:
        array ``[..., m]``: ``out[..., k] = sum_{j : h[j] = k} s[j] * values[..., j]``,
        same namespace, device and dtype as ``values``.
    """
    xp = array_namespace(values)
    if values.shape[-1] != table.n:
        raise ValueError(f"countsketch: values have {values.shape[-1]} positions, the hash has {table.n}.")
    if method not in METHODS:
        raise ValueError(f"countsketch: method must be one of {METHODS}, got {method!r}.")
    native = is_numpy_namespace(xp) or is_torch_namespace(xp) or is_jax_namespace(xp)
    if method == "native" and not native:
        raise ValueError(f"countsketch: no native scatter-add for namespace {xp.__name__}; use 'portable'.")
    if method == "portable" or not native:
        return _countsketch_portable(xp, values, table)
    if is_numpy_namespace(xp):
        return _countsketch_numpy(values, table)
    if is_torch_namespace(xp):
        return _countsketch_torch(xp, values, table)
    return _countsketch_jax(xp, values, table)


def _countsketch_portable(xp, values, table: HashTable):
    lead = tuple(values.shape[:-1])
    sign = table.on(xp, values, "sign", values.dtype)
    signed = values * sign
    zero = xp.zeros(lead + (1,), dtype=values.dtype, device=_device_or_none(values))
    padded = xp.concat([signed, zero], axis=-1)
    plan = table.on(xp, values, "gather")
    gathered = xp.take(xp.reshape(padded, (-1, table.n + 1)), plan, axis=1)
    c_max = plan.shape[0] // table.m
    out = xp.sum(xp.reshape(gathered, (-1, table.m, c_max)), axis=-1)
    return xp.reshape(out, lead + (table.m,))


def _countsketch_numpy(values: np.ndarray, table: HashTable) -> np.ndarray:
    lead = values.shape[:-1]
    rows = int(np.prod(lead, dtype=np.int64))
    flat = (values.reshape(rows, table.n) * table.sign.astype(values.dtype, copy=False)).reshape(-1)
    idx = (np.arange(rows, dtype=np.int64)[:, None] * table.m + table.index[None, :]).reshape(-1)
    out = np.bincount(idx, weights=flat, minlength=rows * table.m)
    return out.astype(values.dtype, copy=False).reshape(lead + (table.m,))


def _countsketch_torch(xp, values, table: HashTable):
    lead = tuple(values.shape[:-1])
    flat = values.reshape(-1, table.n) * table.on(xp, values, "sign", values.dtype)
    idx = table.on(xp, values, "index")
    out = flat.new_zeros((flat.shape[0], table.m))
    out.index_add_(1, idx, flat)
    return out.reshape(lead + (table.m,))


# Rows per block of the JAX scatter (see _countsketch_jax).
_JAX_ROW_BLOCK = 8


def _countsketch_jax(xp, values, table: HashTable):
    # XLA's CPU scatter-add is 3-15x faster when it moves whole rows of a
    # [n, rows] array into [m, rows] than along the last axis of [rows, n],
    # and faster again when the rows go in blocks of a few at a time (a
    # lax.map keeps each block in cache): 256 rows of n=65536 into m=8192
    # take ~25 ms this way against ~400 ms for one last-axis scatter.
    import jax  # values are jax arrays, so jax is imported already

    lead = tuple(values.shape[:-1])
    flat = xp.reshape(values, (-1, table.n))
    rows = flat.shape[0]
    sign = table.on(xp, values, "sign", values.dtype)
    idx = table.on(xp, values, "index")

    def block_sketch(block):  # [r, n] -> [r, m]; jax accumulates repeated indices
        out = xp.zeros((table.m, block.shape[0]), dtype=values.dtype)
        return xp.matrix_transpose(out.at[idx].add(xp.matrix_transpose(block * sign)))

    if rows <= _JAX_ROW_BLOCK:
        out = block_sketch(flat)
    else:
        pad = (-rows) % _JAX_ROW_BLOCK
        if pad:
            flat = xp.concat([flat, xp.zeros((pad, table.n), dtype=flat.dtype)], axis=0)
        blocks = xp.reshape(flat, (-1, _JAX_ROW_BLOCK, table.n))
        out = xp.reshape(jax.lax.map(block_sketch, blocks), (-1, table.m))[:rows]
    return xp.reshape(out, lead + (table.m,))
