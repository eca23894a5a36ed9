"""A PyTorch fast path for the core's streaming sketcher.

:class:`TorchSketcher` accumulates the features of one batch straight into
preallocated ``[B, S_g, D_g]`` buffers, one per group, and computes the
expensive uses itself:

- TensorSketch of a linear use by the exact-then-hash route:
  ``G_b = g_b^T a_b`` is written into a workspace reused across uses (a fresh
  30 MB buffer per use costs more in page faults than the matmul itself) and
  scattered, unsigned, with one ``index_add_`` into ``2m`` buckets kept for
  the whole batch: entry ``(i, j)`` goes to bucket ``h(i, j)`` when its sign
  ``s_r(i) s_c(j)`` is +1 and to ``h(i, j) + m`` when it is -1, and the
  sketch is the difference of the two halves, taken once per parameter at
  :meth:`TorchSketcher.finalize`.  A linear use then costs two operations
  (``bmm``, ``index_add_``) and no pass over ``G`` or the factors for signs;
- an exactly stored bias or scale is summed over tokens straight into its slot;
- an exactly stored linear use adds ``G`` itself;
- TensorSketch of an embedding use scatters ``s_r(id) s_c(j) g_tj`` to bucket
  ``(h_r(id) + h_c(j)) mod m`` (no ``[B, T, vocab]`` one-hot).

Every other use (biases, scales, dense gradients, linear uses the cost model
sends to the FFT route) goes through :func:`sdi_core.use_features`, the
portable implementation this fast path is tested against.
"""

from __future__ import annotations

from typing import Mapping

import torch

from sdi_core import FactorUse, SDIError, SketchPlan, choose_route, use_features

__all__ = ["TorchSketcher", "Workspace"]


class Workspace:
    """Reusable scratch buffers and device copies of hash tables (one per Attributor)."""

    def __init__(self) -> None:
        self._buffers: dict = {}
        self._tables: dict = {}

    def buffer(self, shape, dtype, device, name: str = "G") -> torch.Tensor:
        """An uninitialised ``shape`` view of the scratch buffer ``name`` (grown as needed, never shrunk)."""
        numel = 1
        for s in shape:
            numel *= int(s)
        key = (name, dtype, str(device))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf[:numel].view(tuple(shape))

    def table(self, spec, what: str, dtype, device) -> torch.Tensor:
        key = (id(spec), what, dtype, str(device))
        t = self._tables.get(key)
        if t is None:
            if what == "index":
                host = spec.flat_table().index
            elif what == "index2":  # negative-sign entries shifted to buckets m .. 2m-1
                table = spec.flat_table()
                host = table.index + spec.width * (table.sign < 0)
            elif what == "h_rows":
                host = spec.h_rows
            elif what == "h_cols":
                host = spec.h_cols
            elif what == "s_rows":
                host = spec.s_rows
            else:
                host = spec.s_cols
            t = torch.as_tensor(host, device=device)
            if dtype is not None:
                t = t.to(dtype)
            self._tables[key] = t
            self._tables[(key, "spec")] = spec  # keep the spec alive so id() stays unique
        return t

    def release(self) -> None:
        """Drop the scratch buffers (the hash tables stay: they are small and reused by every call)."""
        self._buffers.clear()


class TorchSketcher:
    """Streaming sketcher for one batch of torch factors (same contract as :class:`sdi_core.StreamingSketcher`).

    Args:
        plan: the sketch plan.
        batch_size: B.
        steps: ``{group: S_g}`` for this batch (known once the forward pass ran).
        workspace: reused scratch space (see :class:`Workspace`).
        route: overrides the sketch's outer-product route.
    """

    def __init__(self, plan: SketchPlan, batch_size: int, steps: Mapping[str, int], workspace: Workspace | None = None,
                 route: str | None = None) -> None:
        self.plan = plan
        self.B = int(batch_size)
        self.steps = dict(steps)
        self.ws = workspace or Workspace()
        self.route = route or getattr(plan.sketch, "route", "auto")
        self.buffers: dict[str, torch.Tensor] | None = None
        self.halves: dict[str, torch.Tensor] = {}  # param -> [B, S_g, 2m] unsigned buckets (see module doc)
        self.seen: set = set()

    def _alloc(self, dtype, device) -> None:
        self.buffers = {
            g.name: torch.zeros((self.B, self.steps.get(g.name, 1), g.width), dtype=dtype, device=device)
            for g in self.plan.layout.groups
        }

    def _slot(self, use: FactorUse, dtype, device) -> torch.Tensor:
        spec = self.plan.spec(use.param)
        group, lo, hi = self.plan.offsets[use.param]
        if self.buffers is None:
            self._alloc(dtype, device)
        elif self.buffers[group].dtype != dtype and dtype == torch.float64:
            self.buffers = {g: b.to(torch.float64) for g, b in self.buffers.items()}
            self.halves = {n: h.to(torch.float64) for n, h in self.halves.items()}
        buf = self.buffers[group]
        if not isinstance(use.step, int) or not 0 <= use.step < buf.shape[1]:
            raise SDIError(
                f"Use of parameter {use.param!r}: step {use.step!r} is outside the {buf.shape[1]} steps of group "
                f"{group!r} recorded in the forward pass."
            )
        self.seen.add((group, use.step, use.param))
        return buf[:, use.step, lo:hi]

    def add(self, use: FactorUse) -> None:
        """Sketch one use into its ``(group, step, parameter)`` slot."""
        spec = self.plan.spec(use.param)
        g = use.grad_output
        if g.shape[0] != self.B:
            raise SDIError(f"Use of parameter {use.param!r}: batch size {g.shape[0]} differs from the sketcher's {self.B}.")
        acc = torch.float64 if g.dtype == torch.float64 or (
            use.activation is not None and use.activation.dtype == torch.float64) else torch.float32
        if use.kind == "linear" and g.ndim == 3 and use.activation.ndim == 3 and self._linear(use, spec, acc):
            return
        if use.kind == "embedding" and spec.mode == "tensor" and g.ndim == 3 and use.activation.ndim == 2:
            self._embedding(use, spec, acc)
            return
        if spec.mode == "exact" and g.ndim == 3 and (use.kind == "bias" or (
            use.kind == "scale" and use.activation is not None and tuple(use.activation.shape) == tuple(g.shape)
        )) and g.shape[-1] == (use.row_slice[1] - use.row_slice[0] if use.row_slice else spec.param.shape[0]):
            self._elementwise(use, spec, acc)
            return
        feats = use_features(use, spec, route=self.route)
        slot = self._slot(use, feats.dtype if feats.dtype == torch.float64 else acc, feats.device)
        slot += feats.to(slot.dtype)

    def _elementwise(self, use: FactorUse, spec, acc) -> None:
        """Exactly stored bias / scale: the sum over tokens, written straight into an untouched slot."""
        lo, hi = use.row_slice if use.row_slice is not None else (0, spec.param.shape[0])
        g = use.grad_output
        if use.kind == "scale":
            g = g.to(acc) * use.activation.to(acc)
        group = self.plan.offsets[use.param][0]
        first = (group, use.step, use.param) not in self.seen
        slot = self._slot(use, acc, g.device)[:, lo:hi]
        if first and hi - lo == slot.shape[1] and slot.dtype == acc:
            torch.sum(g, dim=1, dtype=acc, out=slot)
        else:
            slot += g.sum(1, dtype=acc).to(slot.dtype)

    def _linear(self, use: FactorUse, spec, acc) -> bool:
        rows, cols = spec.param.matrix_shape
        r0, r1 = use.row_slice if use.row_slice is not None else (0, rows)
        gf, af = use.grad_output, use.activation
        if gf.shape[-1] != r1 - r0 or af.shape[-1] != cols or gf.shape[:2] != af.shape[:2]:
            return False  # let the core raise its shape error
        B, T = gf.shape[0], gf.shape[1]
        if spec.mode == "tensor":
            route = self.route
            if route == "auto":
                route = choose_route(B, T, r1 - r0, cols, spec.width)
            if route != "exact_hash":
                return False
        device = gf.device
        G = self.ws.buffer((B, r1 - r0, cols), acc, device)
        torch.bmm(gf.to(acc).transpose(1, 2), af.to(acc), out=G)
        slot = self._slot(use, acc, device)
        flat = G.view(B, (r1 - r0) * cols).to(slot.dtype)
        if spec.mode == "tensor":
            index = self.ws.table(spec, "index2", None, device)[r0 * cols:r1 * cols]
            halves = self.halves.get(use.param)
            if halves is None:
                halves = torch.zeros((B, self.steps.get(spec.param.group, 1), 2 * spec.width), dtype=slot.dtype,
                                     device=device)
                self.halves[use.param] = halves
            halves[:, use.step].index_add_(1, index, flat)
        else:
            slot[:, r0 * cols:r1 * cols] += flat
        return True

    def _embedding(self, use: FactorUse, spec, acc) -> None:
        ids, g = use.activation, use.grad_output.to(acc)
        B, T, dim = g.shape
        device = g.device
        if use.ignore_index is not None:
            g = g * (ids != use.ignore_index).unsqueeze(-1).to(acc)
        h_r = self.ws.table(spec, "h_rows", None, device)
        h_c = self.ws.table(spec, "h_cols", None, device)
        s_r = self.ws.table(spec, "s_rows", acc, device)
        s_c = self.ws.table(spec, "s_cols", acc, device)
        safe = ids.clamp(0, spec.param.shape[0] - 1)  # an ignored id may be out of range (e.g. -100)
        index = (h_r[safe].unsqueeze(-1) + h_c) % spec.width  # [B, T, dim]
        vals = g * s_r[safe].unsqueeze(-1) * s_c
        slot = self._slot(use, acc, device)
        tmp = torch.zeros((B, spec.width), dtype=slot.dtype, device=device)
        tmp.scatter_add_(1, index.reshape(B, T * dim), vals.reshape(B, T * dim).to(slot.dtype))
        slot += tmp

    def finalize(self, steps: Mapping[str, int] | None = None, *, check_finite: bool = True) -> dict[str, torch.Tensor]:
        """``{group: [B, S_g, D_g]}``; raises naming the parameter and step if any feature is NaN or inf."""
        if self.buffers is None:
            raise SDIError(
                "No use of any selected parameter was recorded in this batch. Check that the selected "
                "parameters are used in the forward pass and that the loss depends on them."
            )
        for name, halves in self.halves.items():  # the signs, once per parameter and batch
            group, lo, hi = self.plan.offsets[name]
            m = hi - lo
            self.buffers[group][:, :, lo:hi] += halves[:, :, :m] - halves[:, :, m:]
        self.halves = {}
        if check_finite:
            for g in self.plan.layout.groups:
                buf = self.buffers[g.name]
                if bool(torch.isfinite(buf).all()):
                    continue
                for s in range(buf.shape[1]):
                    for name, (lo, hi) in zip(g.params, g.offsets):
                        if not bool(torch.isfinite(buf[:, s, lo:hi]).all()):
                            raise SDIError(
                                f"Non-finite (NaN or inf) gradient factors for parameter {name!r} at step {s} of "
                                f"group {g.name!r}. Check the loss and inputs of this batch (lower the learning "
                                "rate of the checkpoint, or clip/skip the offending examples)."
                            )
        return self.buffers
