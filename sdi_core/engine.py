"""The sketch engine: the one accumulator that turns every backend's factor uses into features.

A backend hands the engine *uses* (:class:`~sdi_core.FactorUse`, one step,
as a streaming capture delivers them; or :class:`~sdi_core.StackedUse`,
``[B, S, T, d]`` with a vector of steps, as a ``lax.scan`` produces them) and
gets back ``{group: [B, S_g, D_g]}``.  Everything between lives here, once:

- validation of the factors (:func:`sdi_core.sketch.stack_use`);
- the sketch of every kind of use, by the routes of :mod:`sdi_core.sketch`;
- tensors with at most ``m`` entries stored exactly (the plan's ``"exact"`` specs);
- accumulation per parameter and step, into slots preallocated once the
  step counts are known;
- step summing (``summed=True``): uses hashed from their materialised
  gradient have their per-example gradients summed over all steps first and
  hashed once per parameter and batch;
- the non-finite check, naming the parameter and the step.

The engine has a pure ``init`` / ``update`` / ``finalize`` form::

    engine = SketchEngine(plan)
    state = engine.init(batch_size=B, steps={"loop": tau})
    for use in uses:
        state = engine.update(state, use)
    features = engine.finalize(state)            # {group: [B, S_g, D_g]}

that runs under ``jax.jit`` (state and uses are traced arrays; the updates
are functional).  On NumPy and PyTorch ``update`` writes into the state's
preallocated buffers in place and returns the same buffers: treat the state
passed in as consumed, as with donated buffers.

Kernels.  :class:`Kernels` is the portable implementation, array API only
(bucketed-gather CountSketch, one-hot embeddings, a dict of per-step
features), and the reference every native path is tested against.  Native
kernels for NumPy, PyTorch and JAX override the expensive parts:

- NumPy: ``bincount`` scatters, the embedding scattered with the combined
  hash (no ``[B, T, vocab]`` one-hot), slots added in place;
- PyTorch: additionally, a linear use hashed exactly is ``bmm`` into a
  workspace buffer reused across uses, then one unsigned ``index_add_`` into
  ``2m`` buckets kept per parameter for the whole batch (entry ``(i, j)``
  goes to bucket ``h(i, j)`` when its sign is +1 and ``h(i, j) + m`` when it
  is -1); the sketch is the difference of the halves, taken once per
  parameter at ``finalize``.  Summed, the per-example gradients are
  accumulated with ``baddbmm_`` and hashed once;
- JAX: functional updates, the embedding scatter, and the exact-then-hash
  route run over blocks of rows in a ``lax.map`` (the working set stays in
  cache); stacked uses of one parameter with equal shapes are concatenated
  along the step axis and sketched in one call.

Routes.  With ``route="auto"`` the engine times the two outer-product routes
for each linear use shape the first time it sees it (plan, then execute, as
FFT planners and cuDNN's benchmark mode do): synthetic factors of the use's
shapes, dtype and device, one warm-up and the best of two runs of the real
kernel, a few milliseconds; the choice is cached for the process.  Under
``jax.jit`` the shapes are known at trace time, and the timing runs then,
eagerly, inside ``jax.ensure_compile_time_eval`` on concrete synthetic
arrays, with each candidate jitted on its own: a shape is traced once, so it
is timed once.  :func:`sdi_core.sketch.choose_route`, the cost model, is
the prior: it decides alone when timing is off (``TensorSketch(time_routes=False)``),
and routes whose modelled cost is more than :data:`PRUNE_RATIO` times the
cheapest are not timed.  A forced route is used as given.
:meth:`SketchEngine.routes` reports the choices (``Features.meta["routes"]``).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

import numpy as np

from ._array import array_namespace, device_or_none as _dev, is_jax_namespace, is_numpy_namespace, is_torch_namespace
from .countsketch import _is_jax_tracer
from .factors import FactorUse, SDIError, StackedUse
from .sketch import (_fail, choose_route, embedding_features, flat_to_features, outer_features, outer_flat,
                     route_costs, stack_use)
from .specs import ROUTES, FeatureLayout, ParamSketchSpec, SketchPlan

__all__ = [
    "EngineState",
    "Kernels",
    "SketchEngine",
    "StreamingSketcher",
    "check_features_finite",
    "clear_route_cache",
    "sketch_uses",
    "use_features",
]

METHODS = ("auto", "portable", "native")
OUTER_ROUTES = ("exact_hash", "fft")
PRUNE_RATIO = 8.0
"""Routes whose modelled cost exceeds the cheapest's by this factor are not timed."""

# (kernels, device, dtype, shapes, m, summed) -> (route, how, {route: seconds}); machine facts, shared by all engines
_ROUTE_CACHE: dict = {}


def clear_route_cache() -> None:
    """Forget every timed route choice (the next use of each shape is timed again)."""
    _ROUTE_CACHE.clear()


# ----------------------------------------------------------------------------- state


@dataclass
class EngineState:
    """The features of one batch while uses arrive (see :class:`SketchEngine`).

    Attributes:
        batch_size: B.
        steps: ``{group: S_g}`` when known (slots are preallocated), else None
            (features are kept per parameter and step until ``finalize``).
        summed: whether all steps of a group share one slot.
        arrays: the buffers, keyed by tuples: ``("slot", group)``
            ``[B, S, D_g]``; ``("half", param)`` ``[B, S, 2m]`` (torch);
            ``("gram", param, lo, hi)`` ``[B, hi - lo]`` (summed per-example
            gradients awaiting their hash); ``("param", param)`` ``[B, S, w]``
            (JAX); ``("use", param, step)`` ``[B, w]`` (portable).
        xp, dtype, device: namespace, accumulation dtype and device, from the first use.
        max_step: the largest step seen per group.
    """

    batch_size: int
    steps: dict | None
    summed: bool
    arrays: dict = field(default_factory=dict)
    xp: Any = None
    dtype: Any = None
    device: Any = None
    max_step: dict = field(default_factory=dict)

    def n_slots(self, group: str, steps: Mapping[str, int] | None = None) -> int:
        if self.summed:
            return 1
        src = self.steps if self.steps is not None else steps
        return int(src[group])


class Workspace:
    """Scratch buffers reused across uses and batches (grown as needed, never shrunk)."""

    def __init__(self) -> None:
        self._buffers: dict = {}

    def buffer(self, xp, shape, dtype, like):
        """An uninitialised view of ``shape`` on ``like``'s device (torch: ``empty``; elsewhere: fresh zeros)."""
        numel = math.prod(int(s) for s in shape)
        if not is_torch_namespace(xp):
            return xp.zeros(tuple(shape), dtype=dtype, device=_dev(like))
        key = (str(dtype), str(like.device))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = like.new_empty(numel, dtype=dtype)
            self._buffers[key] = buf
        return buf[:numel].view(tuple(shape))

    def release(self) -> None:
        self._buffers.clear()


# --------------------------------------------------------------------------- kernels


def _fold_steps(xp, su: StackedUse) -> StackedUse:
    """All steps of a use as one step: tokens of every step side by side (dense: summed)."""
    g, a = su.grad_output, su.activation
    if len(su.steps) == 1:
        return replace(su, steps=(0,))
    if su.kind == "dense":
        return replace(su, grad_output=xp.sum(g, axis=1, keepdims=True), steps=(0,))
    b, s, t = g.shape[0], g.shape[1], g.shape[2]
    g = xp.reshape(g, (b, 1, s * t) + tuple(g.shape[3:]))
    if a is not None:
        a = xp.reshape(a, (b, 1, s * t) + tuple(a.shape[3:]))
    return replace(su, activation=a, grad_output=g, steps=(0,))


class Kernels:
    """The portable kernels (array API only): the reference for every native path.

    Subclasses override the row kernels (``flat_rows``, ``linear_rows``,
    ``embedding_rows``) and the accumulation (``accumulate``, ``defer``,
    ``assemble``); :meth:`add` composes them.
    """

    name = "portable"
    countsketch_method = "portable"
    defer_summed = True  # summed: add per-example gradients of exact-then-hash uses, hash once at finalize
    bucket = False  # concatenate same-shape stacked uses of a parameter along the step axis

    def __init__(self, xp, plan: SketchPlan, workspace: Workspace) -> None:
        self.xp = xp
        self.plan = plan
        self.workspace = workspace

    # ----------------------------------------------------------- row kernels: [N, ...] -> [N, width]
    def flat_rows(self, flat, spec: ParamSketchSpec, lo: int, hi: int):
        return flat_to_features(flat, spec, lo, hi, method=self.countsketch_method)

    def linear_rows(self, g, a, spec: ParamSketchSpec, row_range, route: str):
        return outer_features(g, a, spec, row_range=row_range, route=route, method=self.countsketch_method)

    def embedding_rows(self, ids, g, spec: ParamSketchSpec, ignore_index):
        return embedding_features(ids, g, spec, ignore_index, method=self.countsketch_method)

    def _embedding_scatter(self, ids, g, spec: ParamSketchSpec, ignore_index):
        """Bucket and value of every ``(token, j)`` entry of an embedding use: ``([N, T*dim] ints, [N, T*dim], width)``.

        TensorSketch: bucket ``(h_r(id) + h_c(j)) mod m``, value ``s_r(id) s_c(j) g_tj``
        (the combined hash of the outer product, no one-hot); exact: bucket
        ``id * dim + j``.  Ids equal to ``ignore_index`` get value 0 (and a
        clamped, harmless bucket).
        """
        xp = self.xp
        n, t, dim = g.shape
        vocab = spec.param.shape[0]
        flat_ids = xp.reshape(xp.clip(ids, 0, vocab - 1), (n * t,))
        if spec.mode == "tensor":
            rt, ct = spec.axis_table("rows"), spec.axis_table("cols")
            h_r = xp.reshape(xp.take(rt.on(xp, g, "index"), flat_ids), (n, t, 1))
            s_r = xp.reshape(xp.take(rt.on(xp, g, "sign", g.dtype), flat_ids), (n, t, 1))
            index = (h_r + ct.on(xp, g, "index")) % spec.width
            vals = g * s_r * ct.on(xp, g, "sign", g.dtype)
        else:
            index = xp.reshape(xp.astype(flat_ids, xp.int64), (n, t, 1)) * dim + xp.arange(dim, device=_dev(g))
            vals = g
        if ignore_index is not None:
            vals = vals * xp.expand_dims(xp.astype(ids != ignore_index, g.dtype), axis=-1)
        return xp.reshape(index, (n, t * dim)), xp.reshape(vals, (n, t * dim)), spec.width

    # ---------------------------------------------------------------------- one use
    def features(self, su: StackedUse, spec: ParamSketchSpec, route: str):
        """Features ``[B, S, width]`` of a validated stacked use (one slice per step)."""
        xp = self.xp
        g, a = su.grad_output, su.activation
        b, s = g.shape[0], g.shape[1]
        n = b * s
        kind = su.kind
        if kind == "dense":
            out = self.flat_rows(xp.reshape(g, (n, spec.param.numel)), spec, 0, spec.param.numel)
        elif kind in ("bias", "scale"):
            lo, hi = su.row_slice
            summed = xp.sum(g if kind == "bias" else a * g, axis=2)
            out = self.flat_rows(xp.reshape(summed, (n, hi - lo)), spec, lo, hi)
        elif kind == "linear":
            t = g.shape[2]
            out = self.linear_rows(xp.reshape(g, (n, t, g.shape[-1])), xp.reshape(a, (n, t, a.shape[-1])), spec,
                                   su.row_slice, route)
        else:
            t = g.shape[2]
            out = self.embedding_rows(xp.reshape(a, (n, t)), xp.reshape(g, (n, t, g.shape[-1])), spec,
                                      su.ignore_index)
        return xp.reshape(out, (b, s, out.shape[-1]))

    def add(self, state: EngineState, su: StackedUse, spec: ParamSketchSpec, route: str) -> EngineState:
        """Add one validated use (steps already folded when summed) to ``state``."""
        if state.summed and self.defer_summed and su.kind == "linear" and spec.mode == "tensor" \
                and route == "exact_hash":
            return self.defer(state, su, spec)
        return self.accumulate(state, spec, su.steps, self.features(su, spec, route))

    # ---------------------------------------------------------------- accumulation
    @staticmethod
    def _set(state: EngineState, key, value) -> EngineState:
        arrays = dict(state.arrays)
        arrays[key] = value
        return replace(state, arrays=arrays)

    def _add_to(self, state: EngineState, key, value) -> EngineState:
        prev = state.arrays.get(key)
        if prev is None:
            return self._set(state, key, value)
        if prev.dtype != value.dtype:
            dt = self.xp.result_type(prev.dtype, value.dtype)
            prev, value = self.xp.astype(prev, dt), self.xp.astype(value, dt)
        return self._set(state, key, prev + value)

    def accumulate(self, state: EngineState, spec: ParamSketchSpec, steps, feats) -> EngineState:
        """Add ``feats [B, len(steps), width]`` at ``steps`` of ``spec``'s parameter."""
        for j, s in enumerate(steps):
            state = self._add_to(state, ("use", spec.param.name, s), feats[:, j, :])
        return state

    def defer(self, state: EngineState, su: StackedUse, spec: ParamSketchSpec) -> EngineState:
        """Summed exact-then-hash: add the per-example gradient ``[B, R' * C]``; it is hashed at finalize."""
        cols = su.activation.shape[-1]
        r0, r1 = su.row_slice
        flat = outer_flat(su.grad_output[:, 0, ...], su.activation[:, 0, ...])
        return self._add_to(state, ("gram", spec.param.name, r0 * cols, r1 * cols), flat)

    def flush(self, state: EngineState) -> EngineState:
        """Hash the deferred per-example gradients into step 0."""
        grams = [k for k in state.arrays if k[0] == "gram"]
        for key in grams:
            _, name, lo, hi = key
            flat = state.arrays[key]
            state = replace(state, arrays={k: v for k, v in state.arrays.items() if k != key})
            feats = self.flat_rows(self.xp.reshape(flat, (flat.shape[0], hi - lo)), self.plan.spec(name), lo, hi)
            state = self.accumulate(state, self.plan.spec(name), (0,), self.xp.expand_dims(feats, axis=1))
        return state

    def promote(self, state: EngineState, dtype) -> EngineState:
        """The state with every buffer in ``dtype`` (a float64 use after float32 ones)."""
        arrays = {k: self.xp.astype(v, dtype) for k, v in state.arrays.items()}
        return replace(state, arrays=arrays, dtype=dtype)

    def _zeros(self, state: EngineState, shape):
        return self.xp.zeros(tuple(shape), dtype=state.dtype, device=state.device)

    def assemble(self, state: EngineState, n_steps: Mapping[str, int]) -> dict:
        """``{group: [B, S_g, D_g]}`` from the accumulated buffers (zeros where a parameter had no use)."""
        xp = self.xp
        out = {}
        for g in self.plan.layout.groups:
            per_step = []
            for s in range(state.n_slots(g.name, n_steps)):
                blocks = []
                for name, (lo, hi) in zip(g.params, g.offsets):
                    a = state.arrays.get(("use", name, s))
                    blocks.append(self._zeros(state, (state.batch_size, hi - lo)) if a is None
                                  else xp.astype(a, state.dtype) if a.dtype != state.dtype else a)
                per_step.append(xp.concat(blocks, axis=1) if len(blocks) > 1 else blocks[0])
            out[g.name] = xp.stack(per_step, axis=1)
        return out

    # ---------------------------------------------------------------------- timing
    def sync(self, out) -> None:
        """Wait until ``out`` is computed (asynchronous devices)."""

    def best_time(self, fn, args, repeats: int = 2) -> float:
        """Seconds of the fastest of ``repeats`` calls of ``fn(*args)``, after one warm-up call."""
        self.sync(fn(*args))
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.sync(fn(*args))
            best = min(best, time.perf_counter() - t0)
        return best

    def synthetic(self, like, shape, dtype):
        """Random normal values of ``shape`` and ``dtype`` on ``like``'s device (a tracer: the default device)."""
        host = np.random.default_rng(0).standard_normal(tuple(int(s) for s in shape))
        dev = _dev(like)
        arr = self.xp.asarray(host) if dev is None else self.xp.asarray(host, device=dev)
        return self.xp.astype(arr, dtype)


class _InPlaceSlots(Kernels):
    """Accumulation into group slots ``[B, S_g, D_g]`` preallocated once and written in place (NumPy, PyTorch)."""

    def _slot(self, state: EngineState, group: str):
        key = ("slot", group)
        slot = state.arrays.get(key)
        if slot is None:
            width = self.plan.layout.group(group).width
            slot = self._zeros(state, (state.batch_size, state.n_slots(group), width))
            state.arrays[key] = slot
        return slot

    def accumulate(self, state, spec, steps, feats):
        if state.steps is None:
            return super().accumulate(state, spec, steps, feats)
        group, lo, hi = self.plan.offsets[spec.param.name]
        slot = self._slot(state, group)
        for j, s in enumerate(steps):
            slot[:, s, lo:hi] += feats[:, j, :]
        return state

    def defer(self, state, su, spec):
        if state.steps is None:
            return super().defer(state, su, spec)
        cols = su.activation.shape[-1]
        r0, r1 = su.row_slice
        key = ("gram", spec.param.name, r0 * cols, r1 * cols)
        flat = outer_flat(su.grad_output[:, 0, ...], su.activation[:, 0, ...])
        if key in state.arrays:
            state.arrays[key] += flat
        else:
            state.arrays[key] = flat
        return state

    def assemble(self, state, n_steps):
        if state.steps is None:
            return super().assemble(state, n_steps)
        return {g.name: self._slot(state, g.name) for g in self.plan.layout.groups}


class NumpyKernels(_InPlaceSlots):
    """NumPy: ``bincount`` scatters, the embedding by the combined hash, slots in place."""

    name = "numpy"
    countsketch_method = "native"

    def embedding_rows(self, ids, g, spec, ignore_index):
        index, vals, width = self._embedding_scatter(ids, g, spec, ignore_index)
        n = index.shape[0]
        flat = (np.arange(n, dtype=np.int64)[:, None] * width + np.asarray(index, dtype=np.int64)).reshape(-1)
        out = np.bincount(flat, weights=np.asarray(vals).reshape(-1), minlength=n * width)
        return out.astype(g.dtype, copy=False).reshape(n, width)


class TorchKernels(_InPlaceSlots):
    """PyTorch: workspace ``bmm``, one unsigned ``index_add_`` into signed halves, ``baddbmm_`` when summed."""

    name = "torch"
    countsketch_method = "native"

    def embedding_rows(self, ids, g, spec, ignore_index):
        index, vals, width = self._embedding_scatter(ids, g, spec, ignore_index)
        out = g.new_zeros((index.shape[0], width))
        out.scatter_add_(1, index.long(), vals)
        return out

    def add(self, state, su, spec, route):
        if state.steps is not None and su.kind == "linear" and (route == "exact_hash" or spec.mode != "tensor"):
            return self._linear(state, su, spec)
        return super().add(state, su, spec, route)

    def _linear(self, state, su, spec):
        import torch  # the factors are torch tensors, so torch is imported already

        g, a = su.grad_output, su.activation
        b, s, t, rows = g.shape
        cols = a.shape[-1]
        r0, r1 = su.row_slice
        g2, a2 = g.reshape(b * s, t, rows).transpose(1, 2), a.reshape(b * s, t, cols)
        name = spec.param.name
        if state.summed and spec.mode == "tensor":  # s == 1: add this step's gradient, hash once at finalize
            key = ("gram", name, r0 * cols, r1 * cols)
            acc = state.arrays.get(key)
            if acc is None:
                state.arrays[key] = torch.bmm(g2, a2).to(state.dtype)
            else:
                acc.view(b, rows, cols).baddbmm_(g2, a2)
            return state
        G = self.workspace.buffer(self.xp, (b * s, rows, cols), g.dtype, g)
        torch.bmm(g2, a2, out=G)
        flat = G.view(b, s, rows * cols)
        if spec.mode == "tensor":
            halves = state.arrays.get(("half", name))
            if halves is None:
                halves = self._zeros(state, (b, state.n_slots(spec.param.group), 2 * spec.width))
                state.arrays[("half", name)] = halves
            index = spec.flat_table().subset(r0 * cols, r1 * cols).on(self.xp, g, "index2")
            for j, step in enumerate(su.steps):
                halves[:, step].index_add_(1, index, flat[:, j] if flat.dtype == halves.dtype
                                           else flat[:, j].to(halves.dtype))
        else:
            group, lo, _ = self.plan.offsets[name]
            slot = self._slot(state, group)
            for j, step in enumerate(su.steps):
                slot[:, step, lo + r0 * cols:lo + r1 * cols] += flat[:, j]
        return state

    def assemble(self, state, n_steps):
        if state.steps is None:
            return super().assemble(state, n_steps)
        for key in [k for k in state.arrays if k[0] == "half"]:  # the signs, once per parameter and batch
            halves = state.arrays.pop(key)
            group, lo, hi = self.plan.offsets[key[1]]
            m = hi - lo
            self._slot(state, group)[:, :, lo:hi] += halves[:, :, :m] - halves[:, :, m:]
        return super().assemble(state, n_steps)

    def sync(self, out) -> None:
        torch = sys.modules["torch"]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()


class JaxKernels(Kernels):
    """JAX: functional updates, stacked uses concatenated per parameter, exact-then-hash over row blocks."""

    name = "jax"
    countsketch_method = "native"
    defer_summed = False  # uses of a parameter are concatenated and hashed in one call already
    bucket = True
    row_block = 1 << 20  # rows of an exact-then-hash use go in blocks of about row_block / (d_out * d_in)

    def linear_rows(self, g, a, spec, row_range, route):
        import jax

        n = g.shape[0]
        block = max(1, min(n, self.row_block // max(g.shape[-1] * a.shape[-1], 1)))
        if (spec.mode == "tensor" and route != "exact_hash") or block >= n:
            return super().linear_rows(g, a, spec, row_range, route)
        # Forming every row's [d_out, d_in] gradient before hashing it leaves cache; a lax.map over blocks
        # of rows keeps the working set in cache (on a 2-core CPU ~1.8x vs ~1.2x of a forward+backward).
        xp = self.xp
        pad = (-n) % block

        def blocks(x):
            if pad:
                x = xp.concat([x, xp.zeros((pad,) + tuple(x.shape[1:]), dtype=x.dtype)], axis=0)
            return xp.reshape(x, (-1, block) + tuple(x.shape[1:]))

        out = jax.lax.map(lambda ga: super(JaxKernels, self).linear_rows(ga[0], ga[1], spec, row_range, route),
                          (blocks(g), blocks(a)))
        return xp.reshape(out, (-1, out.shape[-1]))[:n]

    def embedding_rows(self, ids, g, spec, ignore_index):
        xp = self.xp
        index, vals, width = self._embedding_scatter(ids, g, spec, ignore_index)
        rows = xp.expand_dims(xp.arange(index.shape[0]), axis=1)
        return xp.zeros((index.shape[0], width), dtype=g.dtype).at[rows, index].add(vals)

    def accumulate(self, state, spec, steps, feats):
        if state.steps is None:
            return super().accumulate(state, spec, steps, feats)
        xp = self.xp
        key = ("param", spec.param.name)
        prev = state.arrays.get(key)
        n = state.n_slots(spec.param.group)
        if prev is None and tuple(steps) == tuple(range(n)):
            return self._set(state, key, feats)
        if prev is None:
            prev = xp.zeros((state.batch_size, n, feats.shape[-1]), dtype=feats.dtype)
        dt = xp.result_type(prev.dtype, feats.dtype)
        prev = prev.astype(dt)
        return self._set(state, key, prev.at[:, xp.asarray(steps)].add(feats.astype(dt)))  # repeated steps add

    def assemble(self, state, n_steps):
        if state.steps is None:
            return super().assemble(state, n_steps)
        xp = self.xp
        out = {}
        for g in self.plan.layout.groups:
            n = state.n_slots(g.name)
            blocks = [state.arrays.get(("param", name)) for name in g.params]
            dt = xp.result_type(*[b.dtype for b in blocks if b is not None]) if any(
                b is not None for b in blocks) else state.dtype
            blocks = [xp.zeros((state.batch_size, n, hi - lo), dtype=dt) if blk is None else blk.astype(dt)
                      for blk, (lo, hi) in zip(blocks, g.offsets)]
            out[g.name] = blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=-1)
        return out

    def sync(self, out) -> None:
        import jax

        jax.block_until_ready(out)

    def best_time(self, fn, args, repeats: int = 2) -> float:
        import jax

        with jax.ensure_compile_time_eval():  # under a jit trace: run the candidates now, on concrete arrays
            return super().best_time(jax.jit(fn), args, repeats)

    def synthetic(self, like, shape, dtype):
        import jax

        with jax.ensure_compile_time_eval():
            return super().synthetic(None if _is_jax_tracer(like) else like, shape, dtype)


def kernels_for(xp, plan: SketchPlan, workspace: Workspace, method: str = "auto") -> Kernels:
    """The kernels of namespace ``xp``: native where there are some, else (or with ``method="portable"``) portable."""
    if method not in METHODS:
        raise SDIError(f"method={method!r}: expected one of {METHODS}.")
    native = None
    if is_numpy_namespace(xp):
        native = NumpyKernels
    elif is_torch_namespace(xp):
        native = TorchKernels
    elif is_jax_namespace(xp):
        native = JaxKernels
    if method == "native" and native is None:
        raise SDIError(f"No native sketch kernels for namespace {xp.__name__}; use method='portable'.")
    cls = Kernels if method == "portable" or native is None else native
    return cls(xp, plan, workspace)


# ---------------------------------------------------------------------------- engine


def _one_param_plan(spec: ParamSketchSpec, sketch) -> SketchPlan:
    """A plan of one parameter sharing ``spec`` (and its cached tables): the scratch space of route timing."""
    plan = SketchPlan(sketch, [spec.param])
    plan.specs[spec.param.name] = spec
    return plan


class SketchEngine:
    """Turns the factor uses of a batch into ``{group: [B, S_g, D_g]}`` features (see the module docstring).

    Args:
        plan: the :class:`~sdi_core.SketchPlan` (sketch, parameters, layout).
        route: overrides the sketch's outer-product route (``"auto"``,
            ``"exact_hash"``, ``"fft"``).
        method: ``"auto"`` (native kernels where the namespace has them),
            ``"portable"`` (array API only) or ``"native"`` (refuse a
            namespace without native kernels).
        time_routes: time the routes for ``route="auto"`` (default: the
            sketch's ``time_routes``, True); False decides by the cost model.

    One engine serves many batches: it keeps the workspace (torch) and the
    route choices.  Keep one per Attributor.
    """

    def __init__(self, plan: SketchPlan, *, route: str | None = None, method: str = "auto",
                 time_routes: bool | None = None) -> None:
        self.plan = plan
        self.route = route or getattr(plan.sketch, "route", "auto")
        if self.route not in ROUTES:
            raise SDIError(f"route={self.route!r}: expected one of {ROUTES}.")
        if method not in METHODS:
            raise SDIError(f"method={method!r}: expected one of {METHODS}.")
        self.method = method
        self.time_routes = bool(getattr(plan.sketch, "time_routes", True) if time_routes is None else time_routes)
        self.workspace = Workspace()
        self._kernels: dict = {}
        self._routes: dict[str, dict] = {}

    def kernels(self, xp) -> Kernels:
        k = self._kernels.get(xp.__name__)
        if k is None:
            k = self._kernels[xp.__name__] = kernels_for(xp, self.plan, self.workspace, self.method)
        return k

    # -------------------------------------------------------------------- pure form
    def init(self, batch_size: int, steps: Mapping[str, int] | None = None, *, summed: bool = False) -> EngineState:
        """An empty state for a batch of ``batch_size`` examples.

        Args:
            steps: ``{group: S_g}`` when known (preallocated slots); groups
                missing from it have one step.  None: counted from the uses
                (or given to :meth:`finalize`).
            summed: one slot per group holding the sum over steps.
        """
        if isinstance(batch_size, bool) or int(batch_size) < 1:
            raise SDIError(f"batch_size={batch_size!r}: must be a positive int.")
        if steps is not None:
            steps = {g: int(steps.get(g, 1)) for g in self.plan.group_names}
            bad = {g: s for g, s in steps.items() if s < 1}
            if bad:
                raise SDIError(f"steps={bad}: every group needs at least one step.")
        return EngineState(int(batch_size), steps, bool(summed))

    def update(self, state: EngineState, uses: FactorUse | StackedUse | Iterable) -> EngineState:
        """``state`` with ``uses`` added (one use or an iterable of them, any order)."""
        if isinstance(uses, (FactorUse, StackedUse)):
            uses = [uses]
        prepared = []
        for use in uses:
            spec = self.plan.spec(use.param)
            su, dtype = stack_use(use, spec)
            if su.grad_output.shape[0] != state.batch_size:
                raise _fail(use, f"batch size {su.grad_output.shape[0]} differs from the sketcher's "
                                 f"{state.batch_size}.")
            xp = array_namespace(su.grad_output)
            if state.xp is None:
                state = replace(state, xp=xp, dtype=dtype, device=_dev(su.grad_output))
            elif state.xp is not xp:
                raise _fail(use, f"arrays from {xp.__name__} mixed with {state.xp.__name__} in one batch.")
            group = spec.param.group
            top = max(su.steps)
            if state.steps is not None and top >= state.steps[group]:
                raise _fail(use, f"step {top} is outside the {state.steps[group]} steps of group {group!r} "
                                 "recorded in the forward pass.")
            state = replace(state, max_step={**state.max_step, group: max(state.max_step.get(group, -1), top)})
            if dtype != state.dtype and xp.result_type(dtype, state.dtype) != state.dtype:
                state = self.kernels(xp).promote(state, dtype)
            prepared.append((su, spec))
        if not prepared:
            return state
        kernels = self.kernels(state.xp)
        if kernels.bucket and len(prepared) > 1:
            prepared = _bucket(kernels.xp, prepared)
        for su, spec in prepared:
            if state.summed:
                su = _fold_steps(kernels.xp, su)
            state = kernels.add(state, su, spec, self._route(kernels, state, su, spec))
        return state

    def finalize(self, state: EngineState, *, steps: Mapping[str, int] | None = None, dtype=None,
                 check_finite: bool | None = None) -> dict[str, Any]:
        """Features per group, ``[B, S_g, D_g]`` (``S_g = 1`` when summed), zeros where a parameter had no use.

        Args:
            steps: steps per group when the state was started without them;
                default: the largest step seen plus one (1 for a group that saw no use).
            dtype: output dtype; default the accumulation dtype.
            check_finite: raise on NaN/inf features naming the parameter and
                step; default: when the arrays are concrete (not under ``jit``).
        """
        if state.xp is None:
            raise SDIError(
                "No use of any selected parameter was recorded in this batch. Check that the selected "
                "parameters are used in the forward pass and that the loss depends on them."
            )
        if state.steps is not None:
            if steps is not None and any(int(steps.get(g, 1)) != n for g, n in state.steps.items()):
                raise SDIError(f"finalize(steps={dict(steps)}) differs from the steps {state.steps} the state was "
                               "started with.")
            n_steps = state.steps
        else:
            given = dict(steps or {})
            n_steps = {g: int(given.get(g, state.max_step.get(g, 0) + 1)) for g in self.plan.group_names}
            for g, n in n_steps.items():
                if state.max_step.get(g, -1) >= n:
                    raise SDIError(
                        f"Group {g!r}: a use was recorded at step {state.max_step[g]} but the group has {n} "
                        "steps. Pass the loop count the model actually ran."
                    )
        kernels = self.kernels(state.xp)
        out = kernels.assemble(kernels.flush(state), n_steps)
        if dtype is not None:
            out = {g: (a if a.dtype == dtype else state.xp.astype(a, dtype)) for g, a in out.items()}
        if check_finite is None:
            check_finite = not any(_is_jax_tracer(a) for a in out.values())
        if check_finite:
            check_features_finite(out, self.plan.layout)
        return out

    # ---------------------------------------------------------------------- routes
    def _route(self, kernels: Kernels, state: EngineState, su: StackedUse, spec: ParamSketchSpec) -> str:
        if su.kind != "linear" or spec.mode != "tensor":
            return "exact_hash"  # materialised: stored exactly, hashed once, or scattered
        name = spec.param.name
        if self.route != "auto":
            self._routes[name] = {"route": self.route, "source": "forced"}
            return self.route
        g, a = su.grad_output, su.activation
        n, t = g.shape[0] * g.shape[1], g.shape[2]
        shape = (n, t, g.shape[-1], a.shape[-1], spec.width, spec.param.matrix_shape, state.summed)
        key = (kernels.name, str(state.device), str(state.dtype), shape)
        prior = choose_route(n, t, g.shape[-1], a.shape[-1], spec.width)
        if not self.time_routes:
            hit = (prior, "prior", None)
        else:
            hit = _ROUTE_CACHE.get(key)
            if hit is None:
                hit = _ROUTE_CACHE[key] = self._time(kernels, state, su, spec, prior)
        route, source, seconds = hit
        self._routes[name] = {"route": route, "source": source, "prior": prior}
        if seconds:
            self._routes[name]["ms"] = {r: round(1e3 * s, 3) for r, s in seconds.items()}
        return route

    def _time(self, kernels: Kernels, state: EngineState, su: StackedUse, spec: ParamSketchSpec, prior: str):
        """Time the outer-product routes for this use's shapes on synthetic factors: ``(route, "timed", seconds)``."""
        g, a = su.grad_output, su.activation
        b, s, t, rows = g.shape
        cols = a.shape[-1]
        modelled = route_costs(b * s, t, rows, cols, spec.width)
        cheapest = min(modelled.values())
        candidates = [r for r in OUTER_ROUTES if modelled[r] <= PRUNE_RATIO * cheapest]
        if len(candidates) == 1:
            return candidates[0], "prior (decisive)", None
        scratch = SketchEngine(_one_param_plan(spec, self.plan.sketch), method=self.method, time_routes=False)
        scratch.workspace = self.workspace
        scratch_kernels = scratch.kernels(kernels.xp)
        scratch_steps = tuple(range(len(su.steps)))  # as few slots as the use needs: the cost is per use
        n_slots = 1 if state.summed else len(scratch_steps)
        g_syn = kernels.synthetic(g, g.shape, g.dtype)
        a_syn = kernels.synthetic(a, a.shape, a.dtype)
        seconds = {}
        for route in candidates:
            def run(g_, a_, route=route):
                st = replace(scratch.init(b, {spec.param.group: n_slots}, summed=state.summed), xp=kernels.xp,
                             dtype=state.dtype, device=_dev(g_))
                st = scratch_kernels.add(st, replace(su, grad_output=g_, activation=a_, steps=scratch_steps), spec,
                                         route)
                return scratch_kernels.assemble(scratch_kernels.flush(st), st.steps)
            seconds[route] = scratch_kernels.best_time(run, (g_syn, a_syn))
        return min(seconds, key=seconds.get), "timed", seconds

    def routes(self) -> dict[str, dict]:
        """The outer-product route chosen for each linear TensorSketched parameter so far.

        ``{param: {"route": ..., "source": "timed" | "prior" | "prior (decisive)" | "forced", "prior": ...,
        "ms": {route: milliseconds}}}`` (the last shape seen per parameter).
        """
        return {k: dict(v) for k, v in self._routes.items()}

    def release(self) -> None:
        """Drop the scratch buffers (after a featurize call)."""
        self.workspace.release()


def _bucket(xp, prepared):
    """Concatenate stacked uses of one parameter with equal shapes along the step axis (one kernel call each)."""
    buckets: dict = {}
    for su, spec in prepared:
        a = su.activation
        key = (su.param, su.kind, su.row_slice, su.ignore_index, tuple(su.grad_output.shape[2:]),
               str(su.grad_output.dtype), None if a is None else (tuple(a.shape[2:]), str(a.dtype)))
        buckets.setdefault(key, []).append((su, spec))
    out = []
    for items in buckets.values():
        if len(items) == 1:
            out.append(items[0])
            continue
        first, spec = items[0]
        a = None if first.activation is None else xp.concat([u.activation for u, _ in items], axis=1)
        g = xp.concat([u.grad_output for u, _ in items], axis=1)
        out.append((replace(first, activation=a, grad_output=g,
                            steps=tuple(s for u, _ in items for s in u.steps)), spec))
    return out


# ------------------------------------------------------------------------ finite check


def check_features_finite(features: Mapping[str, Any], layout: FeatureLayout) -> None:
    """Raise :class:`SDIError` naming the first parameter and step whose features are NaN or inf.

    Args:
        features: ``{group: [B, S_g, D_g]}`` concrete arrays (any namespace).
        layout: where each parameter sits in its group's feature axis.
    """
    for g in layout.groups:
        arr = features[g.name]
        xp = array_namespace(arr)
        if bool(xp.all(xp.isfinite(arr))):
            continue
        for s in range(arr.shape[1]):
            for name, (lo, hi) in zip(g.params, g.offsets):
                if not bool(xp.all(xp.isfinite(arr[:, s, lo:hi]))):
                    raise SDIError(
                        f"Non-finite (NaN or inf) gradient factors for parameter {name!r} at step {s} of group "
                        f"{g.name!r}. Check the loss and inputs of this batch (lower the learning rate of the "
                        "checkpoint, or clip/skip the offending examples)."
                    )


# ------------------------------------------------------------------- convenience forms


def use_features(use: FactorUse, spec: ParamSketchSpec, *, route: str = "auto", method: str = "auto"):
    """Features ``[B, width]`` of one use's per-example gradient (see :class:`FactorUse` for shapes).

    Computed in the accumulation dtype (float64 for float64 factors, float32
    otherwise), on the factors' namespace and device.  ``route="auto"``
    takes the cost model's choice (no timing: this function keeps no state).
    """
    su, _ = stack_use(use, spec)
    xp = array_namespace(su.grad_output)
    kernels = kernels_for(xp, None, Workspace(), method)  # features of one use need no plan
    if route == "auto":
        route = "exact_hash"
        if su.kind == "linear" and spec.mode == "tensor":
            g = su.grad_output
            route = choose_route(g.shape[0], g.shape[2], g.shape[-1], su.activation.shape[-1], spec.width)
    return kernels.features(su, spec, route)[:, 0, :]


class StreamingSketcher:
    """Accumulates features of a batch as a backend streams uses to it (a stateful wrapper of :class:`SketchEngine`).

    Typical use by a backend::

        sk = StreamingSketcher(plan, batch_size=B)
        for use in uses:          # as each use's grad-output appears, any order
            sk.add(use)
        features = sk.finalize(steps={"loop": tau})   # group -> [B, S_g, D_g]

    Args:
        plan: the :class:`~sdi_core.specs.SketchPlan` (sketch and parameters).
        batch_size: B, the number of examples (rows) in every use.
        steps: ``{group: S_g}`` when known up front (preallocated slots).
        route: overrides the plan sketch's outer-product route.
        check_finite: raise on NaN/inf features at :meth:`finalize`, naming
            the parameter and step (needs concrete arrays: pass False under jit).
        summed: all steps share one slot, and uses hashed from their
            materialised gradient are summed *before* hashing (one hash per
            parameter and batch instead of one per step): the train side of
            the query-step trajectory needs nothing more.
        method: kernels, as for :class:`SketchEngine`.
        engine: an engine to reuse (its workspace and route choices); default a new one.
    """

    def __init__(self, plan: SketchPlan, batch_size: int, *, steps: Mapping[str, int] | None = None,
                 route: str | None = None, check_finite: bool = True, summed: bool = False, method: str = "auto",
                 engine: SketchEngine | None = None):
        self.engine = engine or SketchEngine(plan, route=route, method=method)
        self.check_finite = check_finite
        self.state = self.engine.init(batch_size, steps, summed=summed)

    def add(self, use: FactorUse | StackedUse) -> None:
        """Sketch one use and add it to the features of its parameter at its step(s)."""
        self.state = self.engine.update(self.state, use)

    def finalize(self, steps: Mapping[str, int] | None = None, *, dtype=None) -> dict[str, Any]:
        """Features per group, ``[B, S_g, D_g]`` (see :meth:`SketchEngine.finalize`)."""
        return self.engine.finalize(self.state, steps=steps, dtype=dtype, check_finite=self.check_finite)


def sketch_uses(plan: SketchPlan, uses: Iterable[FactorUse | StackedUse], batch_size: int, *, steps=None,
                route=None, check_finite: bool = True, summed: bool = False, method: str = "auto") -> dict[str, Any]:
    """Sketch a whole list of uses at once: ``{group: [B, S_g, D_g]}`` (see :class:`StreamingSketcher`)."""
    sk = StreamingSketcher(plan, batch_size, steps=steps, route=route, check_finite=check_finite, summed=summed,
                           method=method)
    for u in uses:
        sk.add(u)
    return sk.finalize()
