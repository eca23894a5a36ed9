"""Array-API helpers shared by the core: namespace resolution, dtypes, conversions.

Nothing here imports a framework; frameworks are recognised through
``array_api_compat``'s ``is_*_namespace`` helpers, which do not import them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from array_api_compat import (
    array_namespace as _compat_namespace,
    device as _device,
    is_array_api_obj,
    is_jax_namespace,
    is_numpy_namespace,
    is_torch_namespace,
    to_device,
)

from .factors import SDIError

__all__ = [
    "array_namespace",
    "device_of",
    "device_or_none",
    "to_numpy",
    "float_dtype_for",
    "is_jax_namespace",
    "is_numpy_namespace",
    "is_torch_namespace",
    "is_array_api_obj",
]


def array_namespace(*arrays: Any):
    """The array-API namespace of ``arrays``; a clear error when they mix libraries."""
    arrays = [a for a in arrays if a is not None and not isinstance(a, (int, float, bool))]
    try:
        return _compat_namespace(*arrays)
    except TypeError as exc:
        kinds = sorted({type(a).__module__.split(".")[0] + "." + type(a).__name__ for a in arrays})
        raise SDIError(
            f"Arrays from different libraries were mixed in one call ({', '.join(kinds)}). "
            "Convert all inputs to one array library (and one device) first."
        ) from exc


def device_of(x: Any):
    return _device(x)


def device_or_none(x: Any):
    """The array's device, or None where it has none to report (JAX tracers under ``jit``)."""
    try:
        return _device(x)
    except Exception:
        return None


def to_numpy(x: Any) -> np.ndarray:
    """Copy an array of any supported library to a NumPy array on the host."""
    if isinstance(x, np.ndarray):
        return x
    xp = array_namespace(x)
    if is_torch_namespace(xp):
        t = x.detach()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.cpu().numpy()
    if is_jax_namespace(xp):
        return np.asarray(x)
    try:
        return np.asarray(x)
    except Exception:  # an array on a device NumPy cannot read: via the namespace's default (host) device
        return np.asarray(to_device(x, xp.__array_namespace_info__().default_device()))


def float_dtype_for(xp, *arrays: Any):
    """Accumulation dtype for ``arrays``: float64 when any is float64, else float32.

    Raises :class:`SDIError` for integer, boolean or complex inputs.
    """
    want64 = False
    for a in arrays:
        if a is None:
            continue
        dt = a.dtype
        if dt == xp.float64:
            want64 = True
        elif dt == xp.float32:
            pass
        elif _is_low_precision_float(xp, dt):
            pass
        else:
            raise SDIError(
                f"Expected a floating-point array, got dtype {dt}. Cast factors to float32 or float64 "
                "(integers, booleans and complex numbers are not gradients)."
            )
    return xp.float64 if want64 else xp.float32


def _is_low_precision_float(xp, dt) -> bool:
    for name in ("float16", "bfloat16"):
        cand = getattr(xp, name, None)
        if cand is not None and dt == cand:
            return True
    return str(dt).endswith(("float16", "bfloat16"))
