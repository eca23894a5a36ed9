"""Sketching factor streams into per-step features, written once against the array API.

Every use of a parameter is turned into ``[B, width]`` numbers (``width`` is
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

``"auto"`` picks per use with :func:`choose_route`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from ._array import array_namespace, device_or_none as _dev, float_dtype_for
from .countsketch import HashTable, countsketch
from .factors import FactorUse, SDIError
from .specs import ParamSketchSpec, SketchPlan

# Relative costs per element, calibrated on a 2-core x86 CPU with NumPy/PyTorch
# (benchmarks/bench_routes.py): a scatter-add element costs ~15 matmul
# multiply-adds, an FFT butterfly ~3.
_COST_SCATTER = 15.0
_COST_FFT = 3.0


def choose_route(batch: int, tokens: int, rows: int, cols: int, m: int) -> str:
    """Cheaper outer-product route for ``batch`` examples of ``tokens`` tokens.

    ``exact_hash`` costs a ``[rows, tokens] x [tokens, cols]`` matmul plus a
    scatter of ``rows * cols`` elements per example; ``fft`` costs scattering
    both factors, two real FFTs per token and one inverse FFT per example.
    """
    exact = batch * (tokens * rows * cols + _COST_SCATTER * rows * cols)
    half = m // 2 + 1
    log_m = math.log2(max(m, 2))
    fft = batch * (
        _COST_SCATTER * tokens * (rows + cols)
        + _COST_FFT * (2 * tokens + 1) * m * log_m
        + 4.0 * tokens * half
    )
    return "exact_hash" if exact <= fft else "fft"


def _with_tokens(x, xp):
    """``[B, d]`` -> ``[B, 1, d]``; ``[B, T, d]`` unchanged."""
    return xp.expand_dims(x, axis=1) if x.ndim == 2 else x


def _fail(use: FactorUse, msg: str) -> SDIError:
    return SDIError(f"Use of parameter {use.param!r} at step {use.step} ({use.kind}): {msg}")


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


def use_features(use: FactorUse, spec: ParamSketchSpec, *, route: str = "auto", method: str = "auto",
                 defer_hash: bool = False):
    """Features ``[B, width]`` of one use's per-example gradient (see :class:`FactorUse` for shapes).

    Computed in the accumulation dtype (float64 for float64 factors, float32
    otherwise), on the factors' namespace and device.

    With ``defer_hash=True``, a use that would be hashed from its materialised
    per-example gradient returns ``("flat", flat [B, hi - lo], lo, hi)``
    instead, so that a caller can add several uses' gradients before hashing
    once (see :class:`StreamingSketcher`'s ``sum_steps``).
    """
    kind = use.kind
    g = use.grad_output
    if g is None:
        raise _fail(use, "grad_output is None; every use needs the gradient of the loss w.r.t. its output.")
    xp = array_namespace(g) if use.activation is None or kind == "embedding" else array_namespace(use.activation, g)
    dtype = float_dtype_for(xp, g, None if kind == "embedding" else use.activation)
    g = xp.astype(g, dtype) if g.dtype != dtype else g
    shape = spec.param.shape
    mat = spec.param.matrix_shape
    if kind == "dense":
        b = g.shape[0]
        if tuple(g.shape[1:]) != tuple(shape):
            raise _fail(use, f"dense gradient has shape {tuple(g.shape)}, expected [B, {', '.join(map(str, shape))}].")
        return flat_to_features(xp.reshape(g, (b, spec.param.numel)), spec, method=method)
    if g.ndim not in (2, 3):
        raise _fail(use, f"grad_output must be [B, d] or [B, T, d], got shape {tuple(g.shape)}.")
    g = _with_tokens(g, xp)
    b = g.shape[0]
    if kind in ("bias", "scale"):
        lo, hi = use.row_slice if use.row_slice is not None else (0, shape[0])
        if len(shape) != 1 or g.shape[-1] != hi - lo:
            raise _fail(use, f"grad_output feature size {g.shape[-1]} does not match parameter shape {shape} "
                             f"(rows {lo}:{hi}).")
        if kind == "bias":
            flat = xp.sum(g, axis=1)
        else:
            a = use.activation
            if a is None:
                raise _fail(use, "a 'scale' use needs the normalised input (xhat) as activation.")
            a = _with_tokens(xp.astype(a, dtype) if a.dtype != dtype else a, xp)
            if tuple(a.shape) != tuple(g.shape):
                raise _fail(use, f"activation shape {tuple(a.shape)} != grad_output shape {tuple(g.shape)}; "
                                 "they must match element for element.")
            flat = xp.sum(a * g, axis=1)
        return flat_to_features(flat, spec, lo, hi, method=method)
    if mat is None:
        raise _fail(use, f"a {kind!r} use needs a 2-D parameter, but {use.param!r} has shape {shape}.")
    rows, cols = mat
    if kind == "linear":
        a = use.activation
        if a is None:
            raise _fail(use, "a 'linear' use needs its input activation.")
        a = _with_tokens(xp.astype(a, dtype) if a.dtype != dtype else a, xp)
        r0, r1 = use.row_slice if use.row_slice is not None else (0, rows)
        if a.shape[:2] != g.shape[:2]:
            raise _fail(use, f"activation {tuple(a.shape)} and grad_output {tuple(g.shape)} disagree on [B, T].")
        if a.shape[-1] != cols or g.shape[-1] != r1 - r0:
            raise _fail(use, f"factors [.., d_in={a.shape[-1]}] and [.., d_out={g.shape[-1]}] do not fit the "
                             f"canonical weight shape (d_out, d_in) = {shape} (rows {r0}:{r1}). A weight stored "
                             "(d_in, d_out) must be reported with canonical shape (d_out, d_in).")
        if defer_hash and _defers(spec, route, g.shape[0], g.shape[1], r1 - r0, cols):
            return ("flat", outer_flat(g, a), r0 * cols, r1 * cols)
        return outer_features(g, a, spec, row_range=(r0, r1), route=route, method=method)
    if kind == "embedding":
        ids = use.activation
        if ids is None:
            raise _fail(use, "an 'embedding' use needs the integer ids as activation.")
        if ids.ndim == 1:
            ids = xp.expand_dims(ids, axis=1)
        if tuple(ids.shape) != tuple(g.shape[:2]) or g.shape[-1] != cols:
            raise _fail(use, f"ids {tuple(ids.shape)} and grad_output {tuple(g.shape)} do not fit embedding "
                             f"shape {shape}: expected ids [B, T] and grad_output [B, T, {cols}].")
        if xp.isdtype(ids.dtype, "real floating") or not xp.isdtype(ids.dtype, "integral"):
            raise _fail(use, f"embedding ids must be integers, got dtype {ids.dtype}.")
        onehot = xp.astype(xp.expand_dims(ids, axis=-1) == xp.arange(rows, device=_dev(ids)), dtype)
        if use.ignore_index is not None:
            keep = xp.astype(ids != use.ignore_index, dtype)
            onehot = onehot * xp.expand_dims(keep, axis=-1)
        if defer_hash and _defers(spec, route, g.shape[0], g.shape[1], rows, cols):
            return ("flat", outer_flat(onehot, g), 0, rows * cols)
        return outer_features(onehot, g, spec, route=route, method=method)
    raise _fail(use, "unsupported kind")


def _defers(spec: ParamSketchSpec, route: str, b: int, t: int, r: int, c: int) -> bool:
    """Whether an outer use goes through its materialised gradient (so hashing can be deferred)."""
    if spec.mode != "tensor":
        return False
    if route == "auto":
        route = choose_route(b, t, r, c, spec.width)
    return route == "exact_hash"


class StreamingSketcher:
    """Accumulates features of a batch as a backend streams uses to it.

    Typical use by a backend::

        sk = StreamingSketcher(plan, batch_size=B)
        for use in uses:          # as each use's grad-output appears, any order
            sk.add(use)
        features = sk.finalize(steps={"loop": tau})   # group -> [B, S_g, D_g]

    Args:
        plan: the :class:`~sdi_core.specs.SketchPlan` (sketch and parameters).
        batch_size: B, the number of examples (rows) in every use.
        route: overrides the plan sketch's outer-product route.
        check_finite: raise on NaN/inf features at :meth:`finalize`, naming
            the parameter and step (needs concrete arrays: pass False under jit).
    """

    def __init__(self, plan: SketchPlan, batch_size: int, *, route: str | None = None, check_finite: bool = True,
                 sum_steps: bool = False):
        self.plan = plan
        self.batch_size = int(batch_size)
        self.route = route or getattr(plan.sketch, "route", "auto")
        self.check_finite = check_finite
        self.sum_steps = bool(sum_steps)
        self._acc: dict[tuple[str, int, str], Any] = {}
        self._flat: dict[tuple[str, int, str, int, int], Any] = {}
        self._max_step: dict[str, int] = {}
        self._xp = None

    def add(self, use: FactorUse) -> None:
        """Sketch one use and add it to the features of ``(use.param, use.step)``.

        With ``sum_steps=True`` all steps share one slot, and uses hashed from
        their materialised gradient are summed *before* hashing (one hash per
        parameter and batch instead of one per step): the train side of the
        query-step trajectory needs nothing more.
        """
        spec = self.plan.spec(use.param)
        group = spec.param.group
        if not isinstance(use.step, int) or use.step < 0:
            raise _fail(use, f"step must be a non-negative int assigned at forward time, got {use.step!r}.")
        step = 0 if self.sum_steps else use.step
        out = use_features(use, spec, route=self.route, defer_hash=self.sum_steps)
        if isinstance(out, tuple):
            _, flat, lo, hi = out
            self._check_batch(use, flat)
            self._accumulate(self._flat, (group, step, use.param, lo, hi), flat)
        else:
            self._check_batch(use, out)
            self._accumulate(self._acc, (group, step, use.param), out)
        self._max_step[group] = max(self._max_step.get(group, -1), use.step)

    def _check_batch(self, use: FactorUse, arr) -> None:
        if arr.shape[0] != self.batch_size:
            raise _fail(use, f"batch size {arr.shape[0]} differs from the sketcher's {self.batch_size}.")
        xp = array_namespace(arr)
        if self._xp is None:
            self._xp = xp
        elif self._xp is not xp:
            raise _fail(use, f"arrays from {xp.__name__} mixed with {self._xp.__name__} in one batch.")

    def _accumulate(self, table: dict, key, arr) -> None:
        xp = self._xp
        prev = table.get(key)
        if prev is not None and prev.dtype != arr.dtype:
            hi = xp.result_type(prev.dtype, arr.dtype)
            prev, arr = xp.astype(prev, hi), xp.astype(arr, hi)
        table[key] = arr if prev is None else prev + arr

    def _hash_deferred(self) -> None:
        for (group, step, name, lo, hi), flat in self._flat.items():
            feats = flat_to_features(flat, self.plan.spec(name), lo, hi)
            self._accumulate(self._acc, (group, step, name), feats)
        self._flat = {}

    def finalize(self, steps: Mapping[str, int] | None = None, *, dtype=None) -> dict[str, Any]:
        """Features per group, ``[B, S_g, D_g]`` (``S_g = 1`` with ``sum_steps``), zeros where a parameter had no use.

        Args:
            steps: number of steps per group; default: the largest step seen
                plus one (1 for a group that saw no use).
            dtype: output dtype; default the widest dtype accumulated.
        """
        if self._xp is None:
            raise SDIError(
                "No use of any selected parameter was recorded in this batch. Check that the selected "
                "parameters are used in the forward pass and that the loss depends on them."
            )
        xp = self._xp
        self._hash_deferred()
        steps = dict(steps or {})
        any_arr = next(iter(self._acc.values()))
        if dtype is None:
            dtype = any_arr.dtype
            for a in self._acc.values():
                dtype = xp.result_type(dtype, a.dtype)
        dev = _dev(any_arr)
        out = {}
        for g in self.plan.layout.groups:
            n_steps = steps.get(g.name, self._max_step.get(g.name, 0) + 1)
            if self._max_step.get(g.name, -1) >= n_steps:
                raise SDIError(
                    f"Group {g.name!r}: a use was recorded at step {self._max_step[g.name]} but the group has "
                    f"{n_steps} steps. Pass the loop count the model actually ran."
                )
            per_step = []
            for s in range(1 if self.sum_steps else n_steps):
                blocks = []
                for name, (lo, hi) in zip(g.params, g.offsets):
                    a = self._acc.get((g.name, s, name))
                    if a is None:
                        a = xp.zeros((self.batch_size, hi - lo), dtype=dtype, device=dev)
                    else:
                        if self.check_finite and not bool(xp.all(xp.isfinite(a))):
                            raise SDIError(
                                f"Non-finite (NaN or inf) gradient factors for parameter {name!r} at step {s} "
                                f"of group {g.name!r}. Check the loss and inputs of this batch (lower the "
                                "learning rate of the checkpoint, or clip/skip the offending examples)."
                            )
                        a = xp.astype(a, dtype) if a.dtype != dtype else a
                    blocks.append(a)
                per_step.append(xp.concat(blocks, axis=1) if len(blocks) > 1 else blocks[0])
            out[g.name] = xp.stack(per_step, axis=1)
        return out


def sketch_uses(plan: SketchPlan, uses: Iterable[FactorUse], batch_size: int, *, steps=None, route=None,
                check_finite: bool = True, sum_steps: bool = False) -> dict[str, Any]:
    """Sketch a whole list of uses at once: ``{group: [B, S_g, D_g]}`` (see :class:`StreamingSketcher`)."""
    sk = StreamingSketcher(plan, batch_size, route=route, check_finite=check_finite, sum_steps=sum_steps)
    for u in uses:
        sk.add(u)
    return sk.finalize(steps)
