"""The portable sketch kernels, written once against the array API, and the validation of uses.

Every use of a parameter is turned into ``[N, width]`` numbers (``width`` is
the parameter's sketch width, or its number of elements under
:class:`~sdi_core.specs.Exact`), on the factors' own namespace, device and
dtype (at least float32).  Because every map here is linear, features of
several uses at the same step simply add.

Outer-product uses (linear layers, embeddings) have two routes that agree to
float rounding:

- ``"exact_hash"``: ``G_b = sum_t g_bt a_bt^T`` with one batched matmul, then a
  CountSketch of ``vec(G_b)`` with the combined hash ``(h_r + h_c) mod m`` and
  sign ``s_r * s_c``.  Cheap whenever ``d_out * d_in`` is moderate.
- ``"fft"``: ``irfft(sum_t rfft(CS_r g_bt) * rfft(CS_c a_bt))``: the sum over
  tokens is taken in the frequency domain, one inverse FFT per example.
  Wins for large layers with few tokens.

:func:`choose_route` is the cost model: the prior that
:class:`~sdi_core.engine.SketchEngine` uses for ``route="auto"`` when it does
not time the routes.  The engine (accumulation, native fast paths, route
timing) is in :mod:`sdi_core.engine`; these functions are its portable path.
"""

from __future__ import annotations

import math
from typing import Any

from ._array import array_namespace, device_or_none as _dev, float_dtype_for
from .countsketch import countsketch
from .factors import FactorUse, SDIError, StackedUse
from .specs import ParamSketchSpec

# Relative costs per element, calibrated on a 2-core x86 CPU with NumPy/PyTorch
# (benchmarks/bench_routes.py): a scatter-add element costs ~15 matmul
# multiply-adds, an FFT butterfly ~3.
_COST_SCATTER = 15.0
_COST_FFT = 3.0


def route_costs(batch: int, tokens: int, rows: int, cols: int, m: int) -> dict[str, float]:
    """Modelled relative cost of each outer-product route for ``batch`` examples of ``tokens`` tokens.

    ``exact_hash`` costs a ``[rows, tokens] x [tokens, cols]`` matmul plus a
    scatter of ``rows * cols`` elements per example; ``fft`` costs scattering
    both factors, two real FFTs per token and one inverse FFT per example.
    """
    half = m // 2 + 1
    log_m = math.log2(max(m, 2))
    return {
        "exact_hash": batch * (tokens * rows * cols + _COST_SCATTER * rows * cols),
        "fft": batch * (_COST_SCATTER * tokens * (rows + cols) + _COST_FFT * (2 * tokens + 1) * m * log_m
                        + 4.0 * tokens * half),
    }


def choose_route(batch: int, tokens: int, rows: int, cols: int, m: int) -> str:
    """The cheaper outer-product route by the cost model :func:`route_costs` (the prior of ``route="auto"``)."""
    costs = route_costs(batch, tokens, rows, cols, m)
    return "exact_hash" if costs["exact_hash"] <= costs["fft"] else "fft"


def _with_tokens(x, xp):
    """``[B, d]`` -> ``[B, 1, d]``; ``[B, T, d]`` unchanged."""
    return xp.expand_dims(x, axis=1) if x.ndim == 2 else x


def _fail(use: FactorUse | StackedUse, msg: str) -> SDIError:
    where = f"step {use.step}" if isinstance(use, FactorUse) else f"steps {list(use.steps)}"
    return SDIError(f"Use of parameter {use.param!r} at {where} ({use.kind}): {msg}")


def flat_to_features(flat, spec: ParamSketchSpec, lo: int = 0, hi: int | None = None, *, method: str = "auto"):
    """Features ``[B, width]`` of per-example gradients given flat on positions ``[lo, hi)``.

    Args:
        flat: ``[B, hi - lo]`` per-example gradient entries, positions
            ``lo..hi`` of the row-major canonical gradient (others are zero).
        spec: the parameter's sketch spec.
    """
    xp = array_namespace(flat)
    numel = spec.param.numel
    hi = numel if hi is None else hi
    if spec.mode == "exact":
        if (lo, hi) == (0, numel):
            return flat
        b = flat.shape[0]
        parts = []
        dev = _dev(flat)
        if lo > 0:
            parts.append(xp.zeros((b, lo), dtype=flat.dtype, device=dev))
        parts.append(flat)
        if hi < numel:
            parts.append(xp.zeros((b, numel - hi), dtype=flat.dtype, device=dev))
        return xp.concat(parts, axis=1)
    return countsketch(flat, spec.flat_table().subset(lo, hi), method=method)


def outer_features(row_f, col_f, spec: ParamSketchSpec, *, row_range=None, route: str = "auto", method: str = "auto"):
    """Features of ``G_b = sum_t row_f[b, t] col_f[b, t]^T`` without forming it when sketching by FFT.

    Args:
        row_f: ``[B, T, R]`` factor along the canonical rows (``R`` may be a
            slice ``row_range`` of the rows).
        col_f: ``[B, T, C]`` factor along the canonical columns.
        spec: the parameter's sketch spec (canonical ``(rows, C)``).
        row_range: ``(r0, r1)`` rows touched, default all.
        route: ``"auto"``, ``"fft"`` or ``"exact_hash"``.

    Returns:
        ``[B, width]`` features.
    """
    xp = array_namespace(row_f, col_f)
    rows, cols = spec.param.matrix_shape
    r0, r1 = row_range if row_range is not None else (0, rows)
    b, t, r = row_f.shape
    if route == "auto":
        route = "exact_hash" if spec.mode != "tensor" else choose_route(b, t, r, cols, spec.width)
    if route == "fft" and spec.mode == "tensor":
        rt = spec.axis_table("rows").subset(r0, r1)
        ct = spec.axis_table("cols")
        return _fft_outer(xp, countsketch(row_f, rt, method=method), countsketch(col_f, ct, method=method), spec.width)
    return flat_to_features(outer_flat(row_f, col_f), spec, r0 * cols, r1 * cols, method=method)


def outer_flat(row_f, col_f):
    """Per-example ``vec(sum_t row_f[b, t] col_f[b, t]^T)``: ``[B, T, R], [B, T, C] -> [B, R * C]``."""
    xp = array_namespace(row_f, col_f)
    b, _, r = row_f.shape
    g = xp.matmul(xp.matrix_transpose(row_f), col_f)  # [B, R, C]: one batched matmul
    return xp.reshape(g, (b, r * col_f.shape[-1]))


def _fft_outer(xp, row_cs, col_cs, m: int):
    """``irfft(sum_t rfft(row_cs) * rfft(col_cs))``: ``[B, T, m]`` x2 -> ``[B, m]``."""
    if not hasattr(xp, "fft"):
        raise SDIError(f"Namespace {xp.__name__} has no fft extension; use TensorSketch(route='exact_hash').")
    prod = xp.fft.rfft(row_cs, axis=-1) * xp.fft.rfft(col_cs, axis=-1)
    return xp.fft.irfft(xp.sum(prod, axis=1), n=m, axis=-1)


def embedding_features(ids, g, spec: ParamSketchSpec, ignore_index: int | None = None, *, route: str = "exact_hash",
                       method: str = "auto"):
    """Features ``[N, width]`` of ``sum_t onehot(ids[n, t]) g[n, t]^T`` (the portable one-hot formulation).

    Args:
        ids: ``[N, T]`` integer ids; ids equal to ``ignore_index`` contribute nothing.
        g: ``[N, T, dim]`` grad-outputs (the accumulation dtype).

    The native kernels of :mod:`sdi_core.engine` scatter with the combined
    hash instead and never build the ``[N, T, vocab]`` one-hot; this is the
    reference they are tested against.
    """
    xp = array_namespace(g)
    rows = spec.param.shape[0]
    onehot = xp.astype(xp.expand_dims(ids, axis=-1) == xp.arange(rows, device=_dev(ids)), g.dtype)
    if ignore_index is not None:
        onehot = onehot * xp.expand_dims(xp.astype(ids != ignore_index, g.dtype), axis=-1)
    return outer_features(onehot, g, spec, route=route, method=method)


# ------------------------------------------------------------------ validation


def _cast(xp, x, dtype):
    return x if x is None or x.dtype == dtype else xp.astype(x, dtype)


def stack_use(use: FactorUse | StackedUse, spec: ParamSketchSpec) -> tuple[StackedUse, Any]:
    """Validate a use and put it in the stacked form ``[B, S, T, ...]``, factors cast to the accumulation dtype.

    A :class:`FactorUse` becomes a stacked use with ``S = 1`` (and ``T = 1``
    when it had no token axis), as views where the namespace allows.

    Returns:
        ``(stacked use, accumulation dtype)``: float64 when a factor is
        float64, float32 otherwise (float16/bfloat16 factors are upcast).

    Raises:
        SDIError: naming the parameter, step and kind, for shapes that do not
            fit the parameter's canonical shape, non-float factors, non-integer
            ids, a missing factor, or a bad step.
    """
    kind = use.kind
    if isinstance(use, FactorUse):
        if isinstance(use.step, bool) or not isinstance(use.step, int) or use.step < 0:
            raise _fail(use, f"step must be a non-negative int assigned at forward time, got {use.step!r}.")
        if use.grad_output is None:
            raise _fail(use, "grad_output is None; every use needs the gradient of the loss w.r.t. its output.")
        g, a = use.grad_output, use.activation
        xp = array_namespace(g) if a is None or kind == "embedding" else array_namespace(a, g)
        if kind == "dense":
            g = xp.expand_dims(g, axis=1)
        else:
            if g.ndim not in (2, 3):
                raise _fail(use, f"grad_output must be [B, d] or [B, T, d], got shape {tuple(g.shape)}.")
            g = xp.expand_dims(_with_tokens(g, xp), axis=1)
            if a is not None:
                if kind == "embedding":
                    a = a if a.ndim != 1 else xp.expand_dims(a, axis=1)
                elif a.ndim == 2:
                    a = xp.expand_dims(a, axis=1)
                a = xp.expand_dims(a, axis=1)
        su = StackedUse(use.param, kind, a, g, (use.step,), use.row_slice, use.ignore_index)
    else:
        su = use
        if su.grad_output is None:
            raise _fail(su, "grad_output is None; every use needs the gradient of the loss w.r.t. its output.")
        g, a = su.grad_output, su.activation
        xp = array_namespace(g) if a is None or kind == "embedding" else array_namespace(a, g)
        want = 2 + len(spec.param.shape) if kind == "dense" else 4
        if g.ndim != want or g.shape[1] != len(su.steps):
            raise _fail(su, f"a stacked grad_output must be [B, S={len(su.steps)}, "
                            f"{'*shape' if kind == 'dense' else 'T, d'}], got shape {tuple(g.shape)}.")
    dtype = float_dtype_for(xp, g, None if kind == "embedding" else a)
    g = _cast(xp, g, dtype)
    shape = spec.param.shape
    if kind == "dense":
        if tuple(g.shape[2:]) != tuple(shape):
            raise _fail(su, f"dense gradient has shape {tuple(g.shape[:1]) + tuple(g.shape[2:])}, expected "
                            f"[B, {', '.join(map(str, shape))}].")
        return StackedUse(su.param, kind, None, g, su.steps), dtype
    if kind in ("bias", "scale"):
        lo, hi = su.row_slice if su.row_slice is not None else (0, shape[0])
        if len(shape) != 1 or g.shape[-1] != hi - lo:
            raise _fail(su, f"grad_output feature size {g.shape[-1]} does not match parameter shape {shape} "
                            f"(rows {lo}:{hi}).")
        if kind == "scale":
            if a is None:
                raise _fail(su, "a 'scale' use needs the normalised input (xhat) as activation.")
            a = _cast(xp, a, dtype)
            if tuple(a.shape) != tuple(g.shape):
                raise _fail(su, f"activation shape {tuple(a.shape)} != grad_output shape {tuple(g.shape)}; "
                                "they must match element for element.")
        return StackedUse(su.param, kind, a, g, su.steps, (lo, hi)), dtype
    mat = spec.param.matrix_shape
    if mat is None:
        raise _fail(su, f"a {kind!r} use needs a 2-D parameter, but {su.param!r} has shape {shape}.")
    rows, cols = mat
    if kind == "linear":
        if a is None:
            raise _fail(su, "a 'linear' use needs its input activation.")
        a = _cast(xp, a, dtype)
        r0, r1 = su.row_slice if su.row_slice is not None else (0, rows)
        if a.ndim != g.ndim or a.shape[:-1] != g.shape[:-1]:
            raise _fail(su, f"activation {tuple(a.shape)} and grad_output {tuple(g.shape)} disagree on [B, T].")
        if a.shape[-1] != cols or g.shape[-1] != r1 - r0:
            raise _fail(su, f"factors [.., d_in={a.shape[-1]}] and [.., d_out={g.shape[-1]}] do not fit the "
                            f"canonical weight shape (d_out, d_in) = {shape} (rows {r0}:{r1}). A weight stored "
                            "(d_in, d_out) must be reported with canonical shape (d_out, d_in).")
        return StackedUse(su.param, kind, a, g, su.steps, (r0, r1)), dtype
    ids = a
    if ids is None:
        raise _fail(su, "an 'embedding' use needs the integer ids as activation.")
    if tuple(ids.shape) != tuple(g.shape[:3]) or g.shape[-1] != cols:
        raise _fail(su, f"ids {tuple(ids.shape)} and grad_output {tuple(g.shape)} do not fit embedding "
                        f"shape {shape}: expected ids [B, (S,) T] and grad_output [B, (S,) T, {cols}].")
    if xp.isdtype(ids.dtype, "real floating") or not xp.isdtype(ids.dtype, "integral"):
        raise _fail(su, f"embedding ids must be integers, got dtype {ids.dtype}.")
    return StackedUse(su.param, kind, ids, g, su.steps, None, su.ignore_index), dtype
