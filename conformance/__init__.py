"""sdi_conformance: a reusable suite that proves an SDI backend right against the exact NumPy references.

A backend (for any framework) implements the small protocol
:class:`Backend`; the suite builds the canonical models
(:mod:`sdi_conformance.models`) through it, and each check compares what the
backend returns with float64 NumPy ground truth.  Three ways to run it:

- ``python -m sdi_conformance pkg.module:attr`` or :func:`run_checks` (no pytest);
- ``pytest --sdi-backend pkg.module:attr`` (or ``SDI_CONFORMANCE_BACKEND``), the pytest plugin;
- :func:`parametrize_with_checks` on a test of your own.

This package imports NumPy and :mod:`sdi_core` only, never a framework.  Its
names are resolved lazily, so that the pytest plugin
(:mod:`sdi_conformance.pytest_plugin`) costs nothing in pytest runs that do
not name a backend.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ALL_CHECKS": "checks",
    "CHECK_NAMES": "checks",
    "yield_checks": "checks",
    "CheckFailure": "compare",
    "parametrize_with_checks": "decorators",
    "CANONICAL_MODELS": "models",
    "ModelSpec": "models",
    "get_model": "models",
    "Backend": "protocol",
    "Capabilities": "protocol",
    "validate_backend": "protocol",
    "CheckResult": "runner",
    "format_results": "runner",
    "load_backend": "runner",
    "run_checks": "runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sdi_conformance' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
