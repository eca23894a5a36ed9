"""pytest plugin: ``pytest --sdi-backend pkg.module:attr`` or ``--sdi-backend torch`` (a registered name;
or ``SDI_CONFORMANCE_BACKEND``) runs the suite.

Registered as a ``pytest11`` entry point, so it is loaded in every pytest run
of an environment where ``sdi`` is installed; it is inert unless a backend is
named: until then it imports nothing beyond pytest and the standard library
(``sdi_conformance`` resolves its names lazily) and adds no test.

With a backend named, the plugin

- loads it (an unknown module or attribute, or an object that does not
  implement the protocol, stops the run with a usage error saying which);
- prints ``sdi-conformance: backend <name> <version>`` and its capabilities
  in the report header;
- appends one test item per generated check, ids
  ``sdi_conformance::<check name>[<model>]``, marked ``sdi_conformance``
  (``-m sdi_conformance`` runs only them, ``-k`` selects among them).

Expected failures: ``--sdi-xfail "check_name=reason"`` (repeatable) or the
decorator :func:`sdi_conformance.parametrize_with_checks` in your own test file.
"""

from __future__ import annotations

import os

import pytest  # already imported: this module is only loaded by pytest

ENV_VAR = "SDI_CONFORMANCE_BACKEND"
_KEY = "_sdi_conformance_backend"


def pytest_addoption(parser) -> None:
    group = parser.getgroup("sdi-conformance", "SDI backend conformance suite")
    group.addoption(
        "--sdi-backend",
        action="store",
        default=None,
        metavar="PKG.MODULE:ATTR|NAME",
        help=f"run the sdi_conformance checks on this backend: pkg.module:attr, or a name registered under the "
        f"sdi.backends entry points (torch, jax, numpy) (default: ${ENV_VAR}; none: plugin inert)",
    )
    group.addoption(
        "--sdi-xfail",
        action="append",
        default=[],
        metavar="CHECK=REASON",
        help="mark a check (name or id) as an expected failure, with a reason (repeatable)",
    )


def _named_backend(config) -> str | None:
    return config.getoption("--sdi-backend") or os.environ.get(ENV_VAR) or None


def pytest_configure(config) -> None:
    name = _named_backend(config)
    if not name:
        return
    from sdi_core import SDIError

    from .runner import load_backend

    try:
        backend = load_backend(name)
    except SDIError as exc:
        raise pytest.UsageError(f"sdi-conformance: {exc}") from None
    xfail = {}
    for item in config.getoption("--sdi-xfail"):
        check, sep, reason = item.partition("=")
        if not sep or not reason.strip():
            raise pytest.UsageError(f"--sdi-xfail {item!r}: write it as CHECK=REASON.")
        xfail[check.strip()] = reason.strip()
    config.addinivalue_line("markers", "sdi_conformance: a check of the sdi_conformance suite")
    setattr(config, _KEY, (name, backend, xfail))


def pytest_report_header(config):
    state = getattr(config, _KEY, None)
    if state is None:
        return None
    name, backend, xfail = state
    lines = [
        f"sdi-conformance: backend {backend.name} {backend.version} ({name})",
        f"sdi-conformance: capabilities {backend.capabilities.describe()}",
    ]
    if xfail:
        lines.append(f"sdi-conformance: expected failures {xfail}")
    return lines


@pytest.hookimpl(tryfirst=True)  # before pytest's own -k / -m deselection, so it applies to the checks too
def pytest_collection_modifyitems(session, config, items) -> None:
    state = getattr(config, _KEY, None)
    if state is None:
        return
    from sdi_core import SDIError

    from .checks import yield_checks
    from .runner import check_xfail_keys

    _, backend, xfail = state
    generated = list(yield_checks(backend))
    try:
        reasons = check_xfail_keys(xfail, [cid for cid, _ in generated])
    except SDIError as exc:
        raise pytest.UsageError(f"sdi-conformance: {exc}") from None
    suite = ConformanceSuite.from_parent(session, name="sdi_conformance", nodeid="sdi_conformance")
    new = []
    for cid, check in generated:
        item = CheckItem.from_parent(suite, name=cid, check=check)
        item.add_marker(pytest.mark.sdi_conformance)
        if cid in reasons:
            item.add_marker(pytest.mark.xfail(reason=reasons[cid], strict=True))
        new.append(item)
    # Report them as collected, so that "collected N items" counts them.
    suite.ihook.pytest_collectreport(report=pytest.CollectReport(suite.nodeid, "passed", None, new))
    items.extend(new)


class ConformanceSuite(pytest.Collector):
    """Parent node of the check items (they are generated from the backend, not collected from a file)."""

    def collect(self):
        return []


class CheckItem(pytest.Item):
    """One generated check: runs it, and shows a CheckFailure's message without a traceback."""

    def __init__(self, *, check, **kw):
        super().__init__(**kw)
        self.check = check

    def runtest(self) -> None:
        self.check()

    def repr_failure(self, excinfo, style=None):
        from .compare import CheckFailure

        if isinstance(excinfo.value, CheckFailure):
            return f"{self.name} failed:\n{excinfo.value}"
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"sdi_conformance::{self.name}"
