"""Meta-tests of the conformance suite: the reference passes, every broken backend fails its check."""

from __future__ import annotations

import numpy as np
import pytest

from sdi_conformance import CHECK_NAMES, CheckFailure, parametrize_with_checks, run_checks, yield_checks
from sdi_conformance.fakes import FAKES, StepsReversed
from sdi_conformance.numpy_backend import backend as numpy_backend
from sdi_core import SDIError


@pytest.fixture(autouse=True)
def restore_numpy_global_state():
    """GlobalStateChanged changes np.seterr on purpose: put it back for the other tests."""
    err = np.geterr()
    rng = np.random.get_state()
    yield
    np.seterr(**err)
    np.random.set_state(rng)


def _report(results) -> str:
    return "\n\n".join(f"{r.name}:\n{r.message}" for r in results if not r.passed)


def test_numpy_reference_backend_passes_every_check():
    results = run_checks(numpy_backend)
    assert results, "no checks generated for the NumPy reference backend"
    failed = [r for r in results if not r.passed]
    assert not failed, f"the reference backend fails {len(failed)} checks:\n{_report(failed)}"
    generated = {r.name.split("[")[0] for r in results}
    # jit and multi-device checks are generated only when declared; NumPy declares neither.
    assert generated == set(CHECK_NAMES) - {"check_jit_matches_eager", "check_devices_agree"}, generated


@pytest.mark.parametrize("fake", sorted(FAKES))
def test_broken_backend_fails_its_check_and_passes_when_fixed(fake):
    cls = FAKES[fake]
    assert cls.meant_for, f"{fake} names no check it is meant to fail"
    broken = run_checks(cls(broken=True), checks=cls.meant_for)
    assert {r.name.split("[")[0] for r in broken} == set(cls.meant_for), (
        f"{fake}: not every meant check was generated: {[r.name for r in broken]}"
    )
    passed = [r.name for r in broken if r.passed]
    assert not passed, f"{fake} (broken) passes the checks meant to catch it: {passed}"
    for r in broken:
        assert r.message.startswith("called:"), f"{fake}/{r.name}: the check crashed instead of failing:\n{r.message}"
        for part in ("called:", "expected:", "got:"):
            assert part in r.message, f"{fake}/{r.name}: failure message lacks {part!r}:\n{r.message}"
    fixed = run_checks(cls(broken=False), checks=cls.meant_for)
    assert all(r.passed for r in fixed), f"{fake} (fixed) still fails:\n{_report(fixed)}"


def test_every_check_fails_on_some_broken_backend():
    covered = {name for cls in FAKES.values() for name in cls.meant_for}
    assert covered == set(CHECK_NAMES), f"checks no broken backend proves can fail: {set(CHECK_NAMES) - covered}"


def test_failure_message_names_call_expectation_and_result():
    results = run_checks(StepsReversed(), checks=["check_factor_stream"])
    msg = results[0].message
    assert "backend.factor_stream(handle" in msg and "looped_transformer" in msg, msg
    assert "forward order" in msg and "step" in msg, msg


def test_xfail_mapping_marks_expected_failures_and_reports_stale_ones():
    reason = "steps come from backward hooks (issue #1)"
    results = run_checks(StepsReversed(), checks=["check_factor_stream"], xfail={"check_factor_stream": reason})
    assert {r.status for r in results} == {"xfailed"}, [(r.name, r.status) for r in results]
    assert all(r.ok and r.xfail_reason == reason for r in results)
    one = run_checks(StepsReversed(broken=False), checks=["check_factor_stream"],
                     xfail={"check_factor_stream[early_exit]": reason})
    status = {r.name: r.status for r in one}
    assert status["check_factor_stream[early_exit]"] == "xpassed", status
    assert not next(r for r in one if r.name == "check_factor_stream[early_exit]").ok
    assert status["check_factor_stream[looped_mlp]"] == "passed", status


@pytest.mark.parametrize(
    "xfail, pattern",
    [
        ({"check_nothing": "x"}, "unknown check"),
        ({"check_jit_matches_eager": "x"}, "not generated"),
        ({"check_factor_stream": ""}, "reason"),
    ],
)
def test_bad_xfail_mapping_raises(xfail, pattern):
    with pytest.raises(SDIError, match=pattern):
        run_checks(numpy_backend, checks=["check_factor_stream"], xfail=xfail)


def test_unknown_check_name_raises():
    with pytest.raises(SDIError, match="Unknown check"):
        list(yield_checks(numpy_backend, ["check_factor_streams"]))


def test_check_crash_is_reported_as_failure_with_traceback():
    class Crashes(StepsReversed):
        def factor_stream(self, model, batch):
            return None  # not a list: the check reports it, it does not crash

    r = run_checks(Crashes(broken=False), checks=["check_factor_stream"])[0]
    assert not r.passed and "a list of sdi_core.FactorUse" in r.message, r.message


@pytest.mark.parametrize(
    "spec, pattern",
    [
        ("no_colon_here", "package.module:attribute"),
        ("sdi_conformance.does_not_exist:backend", "cannot import module"),
        ("sdi_conformance.numpy_backend:nope", "has no attribute 'nope'"),
        ("sdi_conformance.models:get_model", "does not implement"),
    ],
)
def test_load_backend_fails_loudly(spec, pattern):
    with pytest.raises(SDIError, match=pattern):
        run_checks(spec)


@parametrize_with_checks(numpy_backend, checks=["check_factor_stream", "check_float64"])
def test_decorator_runs_checks(check):
    check()


@parametrize_with_checks(StepsReversed(), checks=["check_factor_stream"],
                         xfail={"check_factor_stream": "broken on purpose: steps reversed"})
def test_decorator_marks_expected_failures(check):
    check()


def test_decorator_ids_are_check_ids():
    mark = parametrize_with_checks(numpy_backend, checks=["check_factor_stream"])
    ids = [p.id for p in mark.args[1]]
    assert ids == [f"check_factor_stream[{m}]" for m in
                   ("looped_transformer", "looped_mlp", "prelude_coda_tied", "early_exit", "weight_used_twice",
                    "seq_first_mlp")], ids


def test_check_failure_is_an_assertion_error():
    with pytest.raises(AssertionError):
        dict(yield_checks(StepsReversed(), ["check_factor_stream"]))["check_factor_stream[looped_mlp]"]()
    assert issubclass(CheckFailure, AssertionError)


# --------------------------------------------------------------------------- comparators

from hypothesis import given, settings, strategies as st  # noqa: E402

from sdi_conformance.compare import assert_close, assert_equal_arrays  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=st.integers(0, 2**16),
       rel=st.floats(1e-9, 1e3))
def test_assert_close_catches_any_entry_off_by_more_than_the_tolerance(shape, seed, rel):
    rng = np.random.default_rng(seed)
    want = rng.standard_normal(shape)
    assert_close(want.copy(), want, rtol=1e-10, call="f(x)", what="y")
    idx = tuple(int(rng.integers(0, s)) for s in shape)
    got = want.copy()
    got[idx] += 2e-10 * np.abs(want).max() * (1 + rel)
    with pytest.raises(CheckFailure) as info:
        assert_close(got, want, rtol=1e-10, call="f(x)", what="y")
    msg = str(info.value)
    assert f"at index {idx}" in msg and "called:   f(x)" in msg and "expected: y" in msg, msg


@pytest.mark.parametrize("got, pattern", [
    (np.zeros((2, 3)), "of shape"),
    (np.array([[0.0, np.nan, 0.0]]), "non-finite"),
    (np.zeros((1, 3), dtype=np.complex128), "real floating-point"),
])
def test_assert_close_rejects_shape_nonfinite_and_complex(got, pattern):
    with pytest.raises(CheckFailure, match=pattern):
        assert_close(got, np.zeros((1, 3)), rtol=1e-10, call="f", what="y")


def test_assert_equal_arrays_is_bitwise_and_dtype_strict():
    a = np.arange(6.0).reshape(2, 3)
    assert_equal_arrays(a.copy(), a, call="f", what="w")
    with pytest.raises(CheckFailure, match="float32"):
        assert_equal_arrays(a.astype(np.float32), a, call="f", what="w")
    b = a.copy()
    b[1, 2] = np.nextafter(b[1, 2], np.inf)
    with pytest.raises(CheckFailure, match=r"first at index \(1, 2\)"):
        assert_equal_arrays(b, a, call="f", what="w")
