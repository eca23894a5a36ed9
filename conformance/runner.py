"""A pytest-free runner: load a backend by name, run its checks, return a list of results."""

from __future__ import annotations

import importlib
import inspect
import time
import traceback
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from sdi_core import SDIError

from .checks import CHECK_NAMES, yield_checks
from .compare import CheckFailure
from .protocol import validate_backend

__all__ = ["CheckResult", "load_backend", "run_checks", "format_results", "check_xfail_keys"]


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check.

    Attributes:
        name: check id, ``"check_<property>[<model>]"``.
        passed: True when the property held.
        message: the failure message (empty when passed).
        seconds: wall time of the check.
        xfail_reason: the reason given in ``xfail`` for this check, if any.
    """

    name: str
    passed: bool
    message: str
    seconds: float
    xfail_reason: str | None = None

    @property
    def status(self) -> str:
        """``"passed"``, ``"failed"``, ``"xfailed"`` (failed as expected) or ``"xpassed"`` (expected to fail but passed)."""
        if self.xfail_reason is None:
            return "passed" if self.passed else "failed"
        return "xpassed" if self.passed else "xfailed"

    @property
    def ok(self) -> bool:
        """Whether the outcome is as expected (passed, or failed with an xfail reason)."""
        return self.status in ("passed", "xfailed")


def load_backend(spec: Any) -> Any:
    """The backend named by ``"pkg.module:attr"``, by a name registered under the ``sdi.backends``
    entry points (``"torch"``, ``"jax"``, ``"numpy"``: their conformance backend), or a backend object
    (returned as is).

    A class is instantiated with no arguments.  Unknown modules or attributes,
    and objects that do not implement the protocol, raise :class:`SDIError`
    saying which.
    """
    if not isinstance(spec, str):
        backend = spec
        where = type(spec).__name__
    else:
        if ":" not in spec and spec.isidentifier():
            spec = _registered(spec)
        module_name, sep, attr = spec.partition(":")
        if not sep or not module_name or not attr:
            raise SDIError(
                f"Backend {spec!r} is not of the form 'package.module:attribute' "
                "(e.g. 'sdi_conformance.numpy_backend:backend')."
            )
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise SDIError(f"Backend {spec!r}: cannot import module {module_name!r} ({exc}).") from None
        try:
            backend = getattr(module, attr)
        except AttributeError:
            public = sorted(n for n in vars(module) if not n.startswith("_"))
            raise SDIError(
                f"Backend {spec!r}: module {module_name!r} has no attribute {attr!r}; it has {public[:12]}."
            ) from None
        where = spec
    if inspect.isclass(backend):
        backend = backend()
    validate_backend(backend, where)
    return backend


def _registered(name: str) -> str:
    """``pkg.module:attr`` of the conformance backend of the ``sdi.backends`` entry ``name``."""
    from sdi_core.app.backends import backend_names, get_backend

    try:
        app_backend = get_backend(name)
    except SDIError as exc:
        raise SDIError(f"Backend {name!r} is neither 'package.module:attribute' nor a registered backend: {exc}") from None
    if not app_backend.conformance:
        raise SDIError(f"Registered backend {name!r} names no conformance backend (Backend.conformance); pass "
                       f"'package.module:attribute' instead. Registered: {', '.join(backend_names())}.")
    return app_backend.conformance


def check_xfail_keys(xfail: Mapping[str, str] | None, ids: Sequence[str]) -> dict[str, str]:
    """Validate an ``xfail={check: reason}`` mapping against the check ids it could refer to.

    Keys are check names (``"check_float64"``, every model) or check ids
    (``"check_factor_stream[early_exit]"``, one model).  Returns ``{check id: reason}``.
    """
    xfail = dict(xfail or {})
    out: dict[str, str] = {}
    for key, reason in xfail.items():
        if not isinstance(reason, str) or not reason.strip():
            raise SDIError(f"xfail[{key!r}]: give a reason (a non-empty string) for every expected failure.")
        base = key.split("[", 1)[0]
        if base not in CHECK_NAMES:
            raise SDIError(f"xfail names an unknown check {key!r}; the checks are {list(CHECK_NAMES)}.")
        matched = [i for i in ids if i == key or i.split("[", 1)[0] == key]
        if not matched:
            raise SDIError(
                f"xfail names {key!r}, which is not generated for this backend (check its capabilities); "
                f"generated: {list(ids)}."
            )
        for i in matched:
            out[i] = reason
    return out


def run_checks(
    backend: Any,
    *,
    xfail: Mapping[str, str] | None = None,
    checks: Sequence[str] | None = None,
) -> list[CheckResult]:
    """Run every check the backend's capabilities call for and return one result per check.

    Args:
        backend: a backend object or ``"pkg.module:attr"``.
        xfail: expected failures, ``{check name or id: reason}``.
        checks: restrict to these check names.

    Returns:
        ``[CheckResult(name, passed, message, seconds, xfail_reason), ...]`` in
        generation order.  A check that raises anything but
        :class:`CheckFailure` fails with the traceback as its message.
    """
    backend = load_backend(backend)
    generated = list(yield_checks(backend, checks))
    reasons = check_xfail_keys(xfail, [cid for cid, _ in generated])
    results = []
    for cid, check in generated:
        start = time.perf_counter()
        try:
            check()
            passed, message = True, ""
        except CheckFailure as exc:
            passed, message = False, str(exc)
        except Exception:  # noqa: BLE001 - a crash inside a check is a failed check, with its traceback
            passed, message = False, "unexpected error inside the check:\n" + traceback.format_exc()
        results.append(CheckResult(cid, passed, message, time.perf_counter() - start, reasons.get(cid)))
    return results


def format_results(backend: Any, results: Sequence[CheckResult], verbose: bool = False) -> str:
    """A plain-text report: header, one line per check, then the failure messages."""
    caps = backend.capabilities
    lines = [f"sdi-conformance: backend {backend.name} {backend.version}", f"capabilities: {caps.describe()}", ""]
    for r in results:
        extra = f"  ({r.xfail_reason})" if r.xfail_reason else ""
        lines.append(f"{r.status.upper():8s} {r.name:55s} {r.seconds:7.2f}s{extra}")
    bad = [r for r in results if not r.passed and (verbose or r.xfail_reason is None)]
    for r in bad:
        lines += ["", f"--- {r.name} ({r.status})", r.message]
    counts = {s: sum(r.status == s for r in results) for s in ("passed", "failed", "xfailed", "xpassed")}
    lines += ["", ", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" in {sum(r.seconds for r in results):.1f}s"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sdi_conformance pkg.module:attr [--check NAME ...]``: exit 0 when every check passes."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sdi_conformance", description=main.__doc__)
    parser.add_argument("backend", help="the backend, as 'package.module:attribute'")
    parser.add_argument("--check", action="append", dest="checks", help="run only this check (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print messages of expected failures too")
    args = parser.parse_args(argv)
    try:
        backend = load_backend(args.backend)
        results = run_checks(backend, checks=args.checks)
    except SDIError as exc:
        print(f"error: {exc}")
        return 2
    print(format_results(backend, results, args.verbose))
    return 0 if all(r.ok for r in results) else 1
