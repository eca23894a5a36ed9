"""Comparators that raise :class:`CheckFailure` with a message saying what was called,
with what, what was expected and what came back."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["CheckFailure", "fail", "assert_close", "assert_equal_arrays", "describe_array"]

# Tolerances are relative to the largest reference magnitude (with this floor),
# so that all-zero references (rows of examples that exited early) do not
# demand exact zeros from float arithmetic.
_SCALE_FLOOR = 1e-8


class CheckFailure(AssertionError):
    """A conformance check failed; the message names the call, the inputs, the expectation and the result."""


def fail(call: str, expected: str, got: str, hint: str | None = None) -> None:
    """Raise :class:`CheckFailure` with the four parts of a useful message."""
    lines = [f"called:   {call}", f"expected: {expected}", f"got:      {got}"]
    if hint:
        lines.append(f"hint:     {hint}")
    raise CheckFailure("\n".join(lines))


def describe_array(x: Any) -> str:
    """``float64[4, 3, 8]`` for arrays, the type name for anything else."""
    if isinstance(x, np.ndarray):
        return f"{x.dtype}[{', '.join(map(str, x.shape))}]"
    return type(x).__name__


def _fmt(v) -> str:
    return f"{v:.6g}" if np.isscalar(v) and np.isreal(v) else repr(v)


def assert_close(got, want, *, rtol: float, call: str, what: str, hint: str | None = None,
                 against: str = "the float64 NumPy reference", floor: float = _SCALE_FLOOR) -> None:
    """``|got - want| <= rtol * max|want|`` elementwise (NumPy arrays), shapes equal, all finite.

    Args:
        got: what the backend returned (NumPy).
        want: the float64 reference (NumPy).
        rtol: tolerance relative to the largest reference magnitude.
        call: what was called, with what (for the message).
        what: what the arrays are, e.g. ``"grad_output of use 3 ('block.fc.weight', step 1)"``.
        against: what ``want`` is, for the message.
        floor: the smallest scale the tolerance is relative to: pass a fraction
            of the largest magnitude among related arrays when ``want`` may be
            exactly zero in exact arithmetic (e.g. the gradient of an attention
            key bias, which softmax makes 0 up to rounding).
    """
    got = np.asarray(got)
    want = np.asarray(want)
    if got.shape != want.shape:
        fail(call, f"{what} of shape {want.shape}", f"shape {got.shape} ({describe_array(got)})", hint)
    if got.size == 0:
        return
    if not np.issubdtype(got.dtype, np.number) or np.issubdtype(got.dtype, np.complexfloating):
        fail(call, f"{what} as a real floating-point array", f"dtype {got.dtype}", hint)
    g = got.astype(np.float64)
    bad = ~np.isfinite(g)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        fail(call, f"{what}: finite values", f"{int(bad.sum())} non-finite values, first at index {idx} ({g[idx]})",
             hint)
    w = want.astype(np.float64)
    scale = max(float(np.max(np.abs(w))), floor)
    diff = np.abs(g - w)
    worst = float(diff.max())
    if worst > rtol * scale:
        idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
        fail(
            call,
            f"{what} equal to {against} within {rtol:g} x max|expected| = {rtol * scale:.3g}",
            f"max abs diff {worst:.3g} at index {idx} (got {_fmt(g[idx])}, expected {_fmt(w[idx])}); "
            f"max|expected| = {scale:.3g}, {int((diff > rtol * scale).sum())} of {diff.size} entries off",
            hint,
        )


def assert_equal_arrays(got, want, *, call: str, what: str, hint: str | None = None) -> None:
    """Bit-identical: same shape, same dtype, same values (NaN equal to NaN)."""
    got = np.asarray(got)
    want = np.asarray(want)
    if got.shape != want.shape or got.dtype != want.dtype:
        fail(call, f"{what}: {describe_array(want)}", describe_array(got), hint)
    if not np.array_equal(got, want, equal_nan=np.issubdtype(want.dtype, np.inexact)):
        neq = got != want
        if np.issubdtype(want.dtype, np.inexact):
            neq &= ~(np.isnan(got) & np.isnan(want))
        idx = tuple(int(i) for i in np.argwhere(neq)[0])
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64)) if got.dtype.kind in "fiu" else None
        extra = f", max abs diff {np.nanmax(diff):.3g}" if diff is not None else ""
        fail(
            call,
            f"{what} bit-identical",
            f"{int(neq.sum())} of {neq.size} entries differ, first at index {idx} "
            f"(got {_fmt(got[idx])}, expected {_fmt(want[idx])}){extra}",
            hint,
        )
