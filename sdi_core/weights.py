"""Checkpoint identity: the same weights get the same id in every backend.

Train and query features can be combined only when they were taken at the
same checkpoints.  When a checkpoint is not named, its id is a hash of its
weights, computed here once for every backend, so that weights featurised by
PyTorch and by JAX (or by the NumPy reference) get the same id.

What enters the hash, and what does not:

- **names**: every weight's name, as the backend gives it (a ``state_dict``
  key, a dotted pytree path).  The backends name the same weight alike
  (``block.attn.q.weight``); a different name is a different checkpoint.
- **values**, not storage: floating-point arrays are hashed as float64, so a
  float32 array and its exact float64 (or bfloat16 and float32) copy have
  the same id, and any change of a value (also a rounding to a lower
  precision) changes it.  Integer and boolean arrays are hashed as int64.
- **orientation**: a matrix is hashed orientation-free, because frameworks
  store linear kernels differently (PyTorch ``(d_out, d_in)``, JAX/flax
  ``(d_in, d_out)``): with its longer axis first, and a square matrix both
  ways with the two digests sorted.  A checkpoint that equals another except
  that one square matrix is transposed therefore shares its id; that is the
  price of not knowing which axis is which, and no real pair of checkpoints
  looks like that.  Arrays of rank 3 and more are hashed as stored.
- anything that is not an array (a number, a string in a state dict) by ``repr``.

Devices do not enter: arrays are copied to the host to be hashed.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

import numpy as np

from ._array import is_array_api_obj, to_numpy

__all__ = ["checkpoint_id"]

PREFIX = "weights:"


def _digest(arr: np.ndarray) -> bytes:
    h = hashlib.sha256()
    h.update(repr(arr.shape).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.digest()


def _canonical_digest(value: Any) -> bytes:
    if not (isinstance(value, np.ndarray) or is_array_api_obj(value) or isinstance(value, (int, float, bool))):
        return hashlib.sha256(b"repr|" + repr(value).encode()).digest()
    arr = np.asarray(to_numpy(value) if not isinstance(value, (int, float, bool)) else value)
    if arr.dtype.kind in "fc":
        arr = arr.astype(np.complex128 if arr.dtype.kind == "c" else np.float64)
    elif arr.dtype.kind in "biu":
        arr = arr.astype(np.int64)
    else:
        return hashlib.sha256(b"repr|" + repr(arr.tolist()).encode()).digest()
    if arr.ndim != 2:
        return _digest(arr)
    if arr.shape[0] != arr.shape[1]:
        return _digest(arr if arr.shape[0] > arr.shape[1] else arr.T)
    return b"".join(sorted((_digest(arr), _digest(arr.T))))


def checkpoint_id(weights: Mapping[str, Any]) -> str:
    """The id of a checkpoint's weights, equal for equal weights in every backend (see the module docstring).

    Args:
        weights: name -> array (NumPy, PyTorch, JAX, any array-API array; or
            a plain number), e.g. a ``state_dict`` or the flattened leaves of
            a params pytree keyed by their dotted paths.

    Returns:
        ``"weights:"`` followed by 16 hex digits of a SHA-256.
    """
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(str(name).encode() + b"\0")
        h.update(_canonical_digest(weights[name]))
    return PREFIX + h.hexdigest()[:16]
