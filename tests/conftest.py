"""Shared fixtures: the array namespace under test, and framework configuration.

Framework state (jax x64, torch default dtype) is set here, in fixtures, and
restored afterwards: library code never touches it.

``SDI_TEST_XP`` picks the namespaces the core is tested on (comma-separated
from ``array_api_strict,numpy,torch,jax``; default all that import).
"""
from __future__ import annotations

import importlib
import os

import numpy as np
import pytest

ALL_XP = ("array_api_strict", "numpy", "torch", "jax")

# The benchmark scripts' smoke runs (--quick) start at once: a test run is never quiet, and
# waiting for the load average to fall (benchmarks/common.load_snapshot) would only stall it.
os.environ.setdefault("SDI_BENCH_QUIET_WAIT_S", "0")


def _available(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except ImportError:
        return False


def _selected() -> list[str]:
    env = os.environ.get("SDI_TEST_XP")
    names = [n.strip() for n in env.split(",")] if env else list(ALL_XP)
    unknown = [n for n in names if n not in ALL_XP]
    if unknown:
        raise pytest.UsageError(f"SDI_TEST_XP names unknown namespaces {unknown}; choose from {ALL_XP}.")
    return names


def _xp_params():
    out = []
    for n in _selected():
        marks = [] if _available(n) else [pytest.mark.skip(reason=f"{n} is not installed")]
        out.append(pytest.param(n, marks=marks, id=n))
    return out


@pytest.fixture(scope="session")
def jax_x64():
    """Enable float64 in JAX for the duration of the test session, restoring the old value."""
    jax = pytest.importorskip("jax")
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", old)


@pytest.fixture(params=_xp_params())
def xp(request):
    """An array-API namespace (float64 enabled for JAX)."""
    name = request.param
    if name == "jax":
        request.getfixturevalue("jax_x64")
        import jax.numpy as jnp

        return jnp
    if name == "torch":
        import array_api_compat.torch as tx

        return tx
    if name == "numpy":
        import array_api_compat.numpy as npx

        return npx
    return importlib.import_module(name)


def to_xp(xp, arr, dtype=None):
    """NumPy -> namespace ``xp`` (float64 by default for float input)."""
    arr = np.asarray(arr)
    out = xp.asarray(arr)
    if dtype is not None:
        out = xp.astype(out, dtype)
    return out
