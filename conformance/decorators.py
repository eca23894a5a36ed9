"""A pytest decorator that parametrises a third party's own test over the checks."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from .checks import yield_checks
from .runner import check_xfail_keys, load_backend

__all__ = ["parametrize_with_checks"]


def parametrize_with_checks(
    backend: Any,
    *,
    xfail: Mapping[str, str] | None = None,
    checks: Sequence[str] | None = None,
) -> Callable:
    """``pytest.mark.parametrize("check", ...)`` over every check the backend's capabilities call for.

    Use it on a test that takes one argument, ``check``, and calls it::

        from sdi_conformance import parametrize_with_checks

        @parametrize_with_checks("mypkg.sdi_backend:backend",
                                 xfail={"check_jit_matches_eager": "XLA reorders a reduction (issue #12)"})
        def test_sdi_conformance(check):
            check()

    Args:
        backend: a backend object or ``"pkg.module:attr"`` (loaded at import of the test module).
        xfail: expected failures, ``{check name or check id: reason}``; they are
            marked ``xfail(strict=True)``, so a check that starts passing is
            reported until its entry is removed.  Unknown names raise.
        checks: restrict to these check names.

    Test ids are the check ids, e.g. ``test_sdi_conformance[check_factor_stream[early_exit]]``.
    """
    import pytest  # only when used: importing sdi_conformance must not need pytest

    backend = load_backend(backend)
    generated = list(yield_checks(backend, checks))
    reasons = check_xfail_keys(xfail, [cid for cid, _ in generated])
    params = []
    for cid, check in generated:
        marks = [pytest.mark.xfail(reason=reasons[cid], strict=True)] if cid in reasons else []
        params.append(pytest.param(check, id=cid, marks=marks))
    return pytest.mark.parametrize("check", params)
