"""Capture the factor stream of a PyTorch forward/backward pass.

While a batch runs, a :class:`~torch.overrides.TorchFunctionMode` sees every
torch call.  Each call that involves a selected parameter (or a view of one)
is a *use*: the mode computes the call's output natively, remembers the
activation (a reference, not a copy) and the step the use belongs to (decided
now, at forward time), and registers a tensor hook on the output.  The
backward pass then delivers the output's gradient to the hook, which hands a
:class:`sdi_core.FactorUse` to a callback (the core's streaming sketcher) and
drops the activation.  Backward hooks fire in reverse step order; nothing
depends on that order, because the step is stored with the use.

Selected parameters never accumulate ``.grad``: every parameter of the model
has ``requires_grad`` switched off for the duration, and gradients flow only
through activations.  A use whose output would not require grad (its inputs
carry no gradient, e.g. an embedding of integer ids) gets a zero scalar
"anchor" that requires grad added to its output, so its hook fires.

Understood uses (anything else involving a selected parameter raises an
:class:`~sdi_core.SDIError` naming the parameter and the operation):

- ``F.linear`` (``nn.Linear``, fused qkv), ``matmul`` / ``@`` / ``mm`` /
  ``addmm`` with a parameter operand (GPT-2 ``Conv1D``, a weight called from
  another module, a tied unembedding), on the weight, its transpose or a row
  slice of it (``split`` / ``chunk`` / ``narrow`` / ``[a:b]``);
- ``F.embedding`` (with ``padding_idx``), ``torch.embedding``, ``W[ids]``,
  ``index_select``;
- ``F.layer_norm`` (with or without weight and bias), ``F.rms_norm``;
- elementwise ``x * w``, ``x + b``, ``x - b`` with a broadcast parameter
  (hand-written norms, biases, ``x * (1 + w)``), with scalar factors folded in;
- ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``): its
  sequence-first q/k/v projections (slices of ``in_proj_weight``) and output
  projection are captured, and the attention core runs natively.

Activations must be batch-major: the leading axis is the example (2-D
activations of ``B * T`` rows are example-major, as ``x.view(-1, d)`` gives).
A use whose input does not depend on the batch at all (``pos_emb(arange(T))``)
is *shared*: its output is expanded over the batch so each example receives
its own gradient.
"""

from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from sdi_core import FactorUse, SDIError
from sdi_core.coverage import Coverage

from . import example_axis as ex
from .selection import LOOP, Selection

__all__ = ["FactorCapture", "BatchCapture", "capture_factors", "infer_batch_size"]


# ----------------------------------------------------------------------------- views


@dataclass(eq=False)
class _View:
    """A tensor that is a selected parameter, or a view of one the capture understands.

    The view is ``coef * broadcast(transpose?(P[rows]))``: a row slice of the
    stored tensor, optionally transposed (2-D), with ``lead`` broadcast axes
    in front and a scalar factor.  ``bad`` says why a view cannot be
    attributed (an error is raised only if it is used with gradients).
    """

    name: str
    tensor: torch.Tensor
    stored: tuple[int, ...]
    rows: tuple[int, int] | None = None
    transposed: bool = False
    lead: int = 0
    coef: float = 1.0
    bad: str | None = None

    @property
    def base(self) -> tuple[int, ...]:
        shape = list(self.stored)
        if self.rows is not None:
            shape[0] = self.rows[1] - self.rows[0]
        return tuple(reversed(shape)) if self.transposed else tuple(shape)

    @property
    def plain(self) -> bool:
        return self.rows is None and not self.transposed and self.lead == 0 and self.bad is None


@dataclass(eq=False)
class _Record:
    """One use, waiting for its output's gradient."""

    name: str
    step: int
    kind: str  # linear | bias | scale | embedding | dense-add | dense-mul
    use_index: int
    opname: str
    act: Any = None  # tensor, or a zero-argument callable computing it
    swap: bool = False  # linear: the rows factor is the activation (y = x @ W)
    rows: tuple[int, int] | None = None
    coef: float = 1.0
    layout: str = "batch"  # batch | mT (features on axis -2: W @ x)
    act_prov: Any = None  # where the examples lie in the activation / the output (example_axis.Prov)
    out_prov: Any = None
    shared: str | None = None  # None | "expand0" | "prepend": output expanded over the batch
    ignore_index: int | None = None
    base: tuple[int, ...] = ()  # dense: the view's (unbroadcast) shape
    stored: tuple[int, ...] = ()
    source: Any = None  # the tensor the activation is read from, and its version at forward time
    version: int = -1


def _name(func) -> str:
    n = getattr(func, "__name__", None) or repr(func)
    if n == "__get__":
        owner = getattr(func, "__self__", None)
        return "." + str(getattr(owner, "__name__", "?"))
    return n


def _tensors(obj) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            if isinstance(o, torch.Tensor):
                yield o
            elif isinstance(o, (list, tuple)):
                for p in o:
                    if isinstance(p, torch.Tensor):
                        yield p
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# External data enters the graph through these: their outputs carry the batch.
_DATA_CONSTRUCTORS = {"tensor", "as_tensor", "asarray", "from_numpy", "frombuffer", "from_dlpack", "as_strided"}

_VIEW_OPS = {
    "t", "transpose", "swapaxes", "swapdims", "permute", "split", "chunk", "tensor_split", "narrow", "view",
    "reshape", "view_as", "reshape_as", "unsqueeze", "expand", "expand_as", "contiguous", "clone", "to", "type",
    "float", "double", "half", "bfloat16", "__getitem__", ".T", ".mT", ".H", ".mH", "neg", "__neg__", "negative",
    "index_select",
}  # fmt: skip
_UNTRACKED = {"detach", ".data", ".grad"}  # no gradient flows through these, in training either
# Outputs that depend on a tensor's shape only (the random ones must not be re-run to probe them).
_SHAPE_ONLY = {
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like", "new_zeros",
    "new_ones", "new_empty", "new_full", "size", "dim", "numel", "stride", "is_contiguous", "data_ptr", "__len__",
}  # fmt: skip
_INPLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ipow__", "__imatmul__"}
_ELEMENTWISE = {
    "mul", "__mul__", "__rmul__", "multiply", "add", "__add__", "__radd__", "sub", "__sub__", "__rsub__", "subtract",
    "rsub", "div", "__truediv__", "true_divide", "divide",
}  # fmt: skip

_MHA_SIG = inspect.signature(F.multi_head_attention_forward)
# Phases in which the example axis is followed: the forward pass, and the forward recomputed by activation
# checkpointing during backward (which must run the same operations, and records no uses).
_TRACKING = ("forward", "recompute")
# Record kinds in the coverage report's vocabulary (sdi_core.coverage.KINDS).
_COVERAGE_KIND = {"linear": "linear", "bias": "bias", "scale": "scale", "embedding": "embedding",
                  "dense-add": "dense", "dense-mul": "dense", "dense-fallback": "dense"}


def infer_batch_size(batch) -> int | None:
    """Leading size of the first tensor or array (``ndim >= 1``) in a batch pytree, or None."""
    stack = [batch]
    while stack:
        obj = stack.pop(0)
        shape = getattr(obj, "shape", None)
        if shape is not None and not isinstance(obj, type) and len(shape) >= 1:
            try:
                return int(shape[0])
            except (TypeError, ValueError):
                continue
        if isinstance(obj, Mapping):
            stack = list(obj.values()) + stack
        elif isinstance(obj, (list, tuple)):
            stack = list(obj) + stack
    return None


# ------------------------------------------------------------------------------ mode


class _Mode(TorchFunctionMode):
    def __init__(self, state: "BatchCapture"):
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        st = self.state
        if st.passthrough:
            return func(*args, **kwargs)
        views = st._find_views(args, kwargs)
        if not views:
            out = func(*args, **kwargs)
            if st.phase in _TRACKING:
                st._propagate(func, args, kwargs, out)
            return out
        return st._dispatch(func, args, kwargs, views)


# --------------------------------------------------------------------------- capture


class BatchCapture:
    """The per-batch state of a capture: views, records, steps, provenance (internal)."""

    def __init__(self, owner: "FactorCapture", batch, on_use: Callable[[FactorUse], None], batch_size: int | None):
        self.owner = owner
        self.fallback = owner.fallback
        self.sel = owner.selection
        self.on_use = on_use
        self.batch_hint = batch_size if batch_size is not None else infer_batch_size(batch)
        self.B: int | None = None
        self.phase = "idle"
        self.passthrough = False
        self.views: dict[int, _View] = {}
        for name, p in self.sel.params.items():
            self.views[id(p)] = _View(name, p, tuple(p.shape))
        self.group = {p.name: p.group for p in self.sel.infos}
        self.batchy: dict[int, tuple] = {}  # id -> (weak reference, Prov); a dead reference never matches
        for t in _tensors_deep(batch):  # the batch defines the example axis: axis 0 of its tensors of B rows
            if t.ndim >= 1 and (self.batch_hint is None or t.shape[0] == self.batch_hint):
                self._mark(t, ex.Axis(0))
        self.use_count = {n: 0 for n in self.sel.params}
        self.n_uses = 0
        self.group_uses = {g: 0 for g in self.sel.groups}
        self.handles: list = []
        self.pending: list[_Record] = []
        self.anchors: dict = {}
        self.nograd_use: tuple[str, str] | None = None
        self.replayed: tuple[str, str] | None = None
        self.emitted = 0
        self.leaked: str | None = None
        self.coverage = Coverage(groups={p.name: p.group for p in self.sel.infos})
        self.input_prov: dict = {}  # storage key -> Prov of the loop calls' inputs (checkpoint recomputation)

    # ------------------------------------------------------------ bookkeeping
    def _find_views(self, args, kwargs) -> list[_View]:
        found = []
        views = self.views
        for t in _tensors(args):
            v = views.get(id(t))
            if v is not None and v.tensor is t:
                found.append(v)
        if kwargs:
            for t in _tensors(kwargs):
                v = views.get(id(t))
                if v is not None and v.tensor is t:
                    found.append(v)
        return found

    def _view_of(self, x) -> _View | None:
        if not isinstance(x, torch.Tensor):
            return None
        v = self.views.get(id(x))
        return v if v is not None and v.tensor is x else None

    def _carries(self, x) -> bool:
        return self.prov(x) is not None

    def prov(self, x) -> ex.Prov:
        """Where the examples lie in ``x`` (:mod:`sdi_torch.example_axis`); None if it does not carry the batch."""
        if not isinstance(x, torch.Tensor):
            return None
        entry = self.batchy.get(id(x))
        if entry is None or entry[0]() is not x:
            if self.phase == "recompute" and self.input_prov:
                return self.input_prov.get(_storage_key(x))
            return None
        return entry[1]

    def _mark(self, t: torch.Tensor, prov: ex.Prov) -> None:
        if prov is None:
            self.batchy.pop(id(t), None)
        else:
            self.batchy[id(t)] = (weakref.ref(t), prov)

    def _info(self, obj):
        """``obj`` with every tensor replaced by its :class:`example_axis.Tensor` record."""
        if isinstance(obj, torch.Tensor):
            return ex.Tensor(tuple(obj.shape), self.prov(obj), obj.dtype == torch.bool)
        if isinstance(obj, (list, tuple)) and any(isinstance(o, (torch.Tensor, list, tuple)) for o in obj):
            return type(obj)(self._info(o) for o in obj) if not hasattr(obj, "_fields") else tuple(
                self._info(o) for o in obj)
        if isinstance(obj, torch.Size):
            return tuple(obj)
        return obj

    def call_prov(self, opname: str, args, kwargs, outs: list) -> list:
        """The provenance of each tensor in ``outs``, the outputs of ``opname(*args, **kwargs)``."""
        return ex.propagate(opname, tuple(self._info(a) for a in args),
                            {k: self._info(v) for k, v in kwargs.items()}, [tuple(o.shape) for o in outs])

    def _propagate(self, func, args, kwargs, out) -> None:
        """Follow the example axis from the inputs of a torch call to its outputs."""
        name = _name(func)
        if name in _DATA_CONSTRUCTORS:  # external (batch) data entering the graph: examples first
            for t in _tensors(out):
                if t.ndim >= 1 and (self.batch_hint is None or t.shape[0] == self.batch_hint):
                    self._mark(t, ex.Axis(0))
            return
        batchy = self.batchy
        carried = False
        for t in _tensors(args):
            if id(t) in batchy and self.prov(t) is not None:
                carried = True
                break
        if not carried and kwargs:
            carried = any(self.prov(t) is not None for t in _tensors(kwargs))
        if not carried:
            return
        if name == "__setitem__":
            self._setitem(args)
            return
        outs = list(_tensors(out))
        for t, p in zip(outs, self.call_prov(name, args, kwargs, outs)):
            self._mark(t, p)
        if args and isinstance(args[0], torch.Tensor) and (
            (name.endswith("_") and not name.startswith("__")) or name in _INPLACE_DUNDERS
        ) and not any(t is args[0] for t in outs):
            self._mark(args[0], ex.propagate(name, (self._info(args[0]),) + tuple(self._info(a) for a in args[1:]),
                                             {}, [tuple(args[0].shape)])[0])
        o = kwargs.get("out") if kwargs else None
        if isinstance(o, torch.Tensor) and not any(t is o for t in outs):
            self._mark(o, ex.Lost(name, "wrote batch data into an out= tensor"))

    def _setitem(self, args) -> None:
        """``dest[idx] = value``: the destination's examples from the value's, if they line up exactly."""
        dest, idx, value = args[0], args[1], args[2]
        pv = self.prov(value)
        pd = self.prov(dest)
        if pv is None:
            return
        if isinstance(pv, ex.Lost):
            self._mark(dest, pv)
            return
        iidx = self._info(idx)
        want = None
        view_shape = tuple(dest[idx].shape) if not isinstance(pd, ex.Lost) else ()
        if view_shape:
            aligned = ex.Axis(pv.dim + len(view_shape) - value.ndim, pv.outer, pv.inner) \
                if value.ndim <= len(view_shape) else None
            for d in range(dest.ndim):
                cand = ex.Axis(d, pv.outer, pv.inner)
                if ex.index_axis(tuple(dest.shape), iidx, cand) == aligned:
                    want = cand
                    break
        if want is not None and (pd is None or pd == want):
            self._mark(dest, want)
        else:
            self._mark(dest, ex.Lost("__setitem__", "wrote batch data into a tensor so that its examples cannot "
                                     "be followed", ((tuple(value.shape)), tuple(dest.shape))))

    def _derive(self, v: _View, t: torch.Tensor, **changes) -> torch.Tensor:
        nv = _View(v.name, t, v.stored, v.rows, v.transposed, v.lead, v.coef, v.bad)
        for k, val in changes.items():
            setattr(nv, k, val)
        self.views[id(t)] = nv
        return t

    def _fail(self, v: _View | str, opname: str, why: str) -> SDIError:
        name = v.name if isinstance(v, _View) else v
        return SDIError(f"Parameter {name!r} is used in {opname}: {why}")

    def _unsupported(self, v: _View, opname: str) -> SDIError:
        extra = f" ({v.bad})" if v.bad else ""
        return SDIError(
            f"Parameter {v.name!r}{extra} is used in the operation {opname!r}, which the SDI capture does not "
            "understand, so its per-example gradient cannot be captured exactly. Supported uses: F.linear / "
            "matmul / addmm on the weight, its transpose or row slices; F.embedding; F.layer_norm; F.rms_norm; "
            "nn.MultiheadAttention; einsum that is a linear map; x * w, x + b; with fallback='dense' (the "
            "default) any other torch function whose other inputs hold the examples on an axis of their own. "
            "Rewrite the use in one of these forms, or leave the parameter out of the selection."
        )

    def _step(self, name: str, opname: str) -> int:
        group = self.group[name]
        self.group_uses[group] += 1
        k = self.use_count[name]
        self.use_count[name] = k + 1
        if group != LOOP:
            return 0
        if self.sel.loop_by_uses:
            return k
        stack = self.owner._stack
        if not stack:
            raise SDIError(
                f"Parameter {name!r} of the loop is used in {opname!r} outside every call of the loop module(s) "
                f"{[type(m).__name__ for m in self.sel.loop_modules]}, so its loop step is ambiguous. Use it only "
                "inside the loop body, or select it in a one-slot group (groups={'coda': [...]}) instead of loop."
            )
        return self.owner._calls[stack[-1]] - 1

    def _record(self, v: _View, kind: str, opname: str, **kw) -> _Record | None:
        if self.phase != "forward":
            return None
        if v.bad:
            raise self._unsupported(v, opname)
        rec = _Record(v.name, self._step(v.name, opname), kind, self.n_uses, opname, **kw)
        self.coverage.add(v.name, rec.step, _COVERAGE_KIND[kind])
        src = rec.act if isinstance(rec.act, torch.Tensor) else getattr(rec.act, "source", None)
        if isinstance(src, torch.Tensor):
            rec.source, rec.version = src, src._version
        self.n_uses += 1
        return rec

    def _anchor(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.dtype, like.device)
        a = self.anchors.get(key)
        if a is None:
            a = torch.zeros((), dtype=like.dtype, device=like.device, requires_grad=True)
            self.anchors[key] = a
        return a

    def _finish(self, out: torch.Tensor, recs: list, act_inputs: list, opname: str, prov: ex.Prov,
                layout: str = "batch"):
        """Expand a shared output over the batch, anchor it, mark it with ``prov`` (where its examples lie) and
        hook it.  ``layout`` is ``"mT"`` when the features are on axis -2 (``W @ x``)."""
        n_uses = len(recs)  # the same in a checkpoint's recomputation, where _record returns None
        recs = [r for r in recs if r is not None]
        shared = None
        if prov is None and layout == "batch":
            shared = self._shared_mode(out, act_inputs, n_uses, recs, opname)
            if shared == "expand0":
                out = out.expand(self.batch_hint, *out.shape[1:])
            elif shared == "prepend":
                out = out.expand(self.batch_hint, *out.shape)
            if shared is not None or (n_uses and out.ndim >= 1 and self.batch_hint is not None
                                      and out.shape[0] == self.batch_hint):
                prov = ex.Axis(0)  # expanded here, or explicitly broadcast over the batch by the caller
        if torch.is_floating_point(out) and not out.requires_grad:
            out = out + self._anchor(out)
        if self.phase in _TRACKING:
            self._mark(out, prov)
        if self.phase == "forward":
            if recs:
                if not isinstance(prov, ex.Axis) and self.batch_hint != 1:
                    raise self._lost_error(recs[0], out, prov, act_inputs)
                for r in recs:
                    r.shared = shared
                    r.layout = layout
                    r.out_prov = prov
                    src = r.act if isinstance(r.act, torch.Tensor) else getattr(r.act, "source", None)
                    # a shared activation is expanded over the batch at emission; one explicitly broadcast over
                    # it (arange(T).expand(B, T)) has the output's leading axes
                    r.act_prov = None if shared is not None else (self.prov(src) or prov)
                self.pending.extend(recs)
                self.handles.append(out.register_hook(_Hook(self, recs)))
        return out

    def _lost_error(self, rec: "_Record", out: torch.Tensor, prov: ex.Prov, act_inputs: list) -> SDIError:
        shapes = [tuple(a.shape) for a in act_inputs if isinstance(a, torch.Tensor)]
        why = prov.describe() if isinstance(prov, ex.Lost) else "it does not depend on the batch"
        return SDIError(
            f"Parameter {rec.name!r} at step {rec.step}: the examples of the input of {rec.opname!r} (shapes "
            f"{shapes}, output {tuple(out.shape)}) cannot be located, so its per-example gradient cannot be "
            f"captured. The example axis was {why}. SDI follows the examples from the batch (axis 0 of its "
            "tensors) through every operation and never guesses them from sizes. Fix: keep the examples on an "
            "axis of their own up to this use (transpose, permute and reshapes that keep the example axis whole "
            "are followed; see sdi_torch.example_axis.known_ops()), or leave the parameter out of the selection."
        )

    def _shared_mode(self, out, act_inputs, n_uses, recs, opname) -> str | None:
        if not n_uses or out.ndim == 0:
            return None
        if not recs:  # a checkpoint's recomputation: decided as in the forward pass, which raised any error
            recs = [_Record("?", 0, "?", 0, opname)]
        B = self.batch_hint
        if B is None:
            raise SDIError(
                f"The input of {opname!r} (using {recs[0].name!r}) does not depend on the batch, so its output "
                "must be expanded over the batch, but the batch size could not be read from the batch. Pass "
                "batch_size=... to the Attributor."
            )
        if out.shape[0] == 1 and B != 1:
            return "expand0"
        if out.shape[0] != B:
            return "prepend"
        for a in act_inputs:
            if isinstance(a, torch.Tensor) and a.ndim >= 1 and a.shape[0] == B and a.stride(0) == 0:
                return None  # explicitly broadcast over the batch (e.g. arange(T).expand(B, T))
        if B == 1:
            return None
        raise SDIError(
            f"The input of {opname!r} (using parameter {recs[0].name!r}) does not depend on the batch, yet its "
            f"leading axis has the batch size {B}, so SDI cannot tell whether it holds one row per example or is "
            "shared by all of them. Give it an explicit batch axis (e.g. torch.arange(T).expand(B, T) for "
            "positions) or derive it from the batch (e.g. torch.zeros_like(x))."
        )

    # --------------------------------------------------------------- dispatch
    def _dispatch(self, func, args, kwargs, views):
        opname = _name(func)
        if not torch.is_grad_enabled():
            # No gradient flows from here, exactly as in training; remember it to catch reentrant checkpoints.
            if self.phase == "forward" and self.nograd_use is None:
                self.nograd_use = (views[0].name, opname)
            return func(*args, **kwargs)
        if self.phase == "backward" and self.nograd_use is not None and self.replayed is None:
            self.replayed = (views[0].name, opname)
        if opname in _UNTRACKED:
            return func(*args, **kwargs)
        if (opname.endswith("_") and not opname.startswith("__")) or opname in _INPLACE_DUNDERS or (
            kwargs and self._view_of(kwargs.get("out")) is not None
        ):
            if args and self._view_of(args[0]) is not None or self._view_of(kwargs.get("out")) is not None:
                raise self._fail(views[0], opname, "in-place modification of a selected parameter during the "
                                 "forward pass is not supported (it would also fail in training).")
            raise self._unsupported(views[0], opname)  # e.g. buffer[i] = W: the copy carries W's gradient
        handler = _HANDLERS.get(func) or _HANDLERS_BY_NAME.get(opname)
        if handler is not None:
            return handler(self, func, args, kwargs, opname)
        if opname in _VIEW_OPS:
            return self._view_op(func, args, kwargs, opname)
        if opname in _ELEMENTWISE:
            return self._elementwise(func, args, kwargs, opname)
        if opname in _SHAPE_ONLY or self._differentiable(func, args, kwargs) is False:
            return func(*args, **kwargs)  # sizes, comparisons, zeros_like: no gradient reaches the parameter
        return self.dense_use(func, args, kwargs, views, opname)

    def dense_use(self, func, args, kwargs, views, opname):
        """A use the capture has no factor form for: its exact per-example gradient, by ``torch.func``.

        The call runs natively now; when its output's gradient arrives, the gradient with respect to each
        selected parameter in it is taken per example (``vmap`` of a ``vjp`` over the tracked example axes),
        which is exact and costs one more pass through this call per use.  ``fallback="error"`` refuses instead.
        """
        if self.fallback != "dense":
            raise self._unsupported(views[0], opname)
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or not torch.is_floating_point(out):
            raise self._unsupported(views[0], opname)
        flat, spec = tree_flatten((args, kwargs))
        params, batch_dims = [], {}
        for i, x in enumerate(flat):
            if not isinstance(x, torch.Tensor):
                continue
            v = self._view_of(x)
            if v is not None:
                if v.bad:
                    raise self._unsupported(v, opname)
                params.append((i, v))
                continue
            p = self.prov(x)
            if p is None:
                continue
            if not (isinstance(p, ex.Axis) and p.outer == 1 and p.inner == 1):
                raise self._fail(views[0], opname, f"an exact per-example gradient needs each input's examples on "
                                 f"an axis of their own, but an input of shape {tuple(x.shape)} has them "
                                 f"{p.describe()}.")
            batch_dims[i] = p.dim
        if not batch_dims:
            raise self._fail(views[0], opname, "no other operand depends on the batch: this builds a derived "
                             "parameter tensor, which SDI cannot attribute through. Apply the operation to the "
                             "activations instead, or leave the parameter out of the selection.")
        prov = self.call_prov(opname, args, kwargs, [out])[0]
        if isinstance(prov, ex.Axis) and (prov.outer != 1 or prov.inner != 1):
            prov = ex.Lost(opname, "its output merges the example axis with another")
        recs = []
        for i, v in params:
            rec = self._record(v, "dense-fallback", opname, stored=v.stored)
            if rec is not None:  # None in a checkpoint's recomputation
                rec.act = _DenseCall(func, flat, spec, i, v, batch_dims, self.sel.params[v.name])
            recs.append(rec)
        return self._finish(out, recs, [flat[i] for i in batch_dims], opname, prov)

    def _differentiable(self, func, args, kwargs) -> bool:
        """Whether ``func``'s outputs depend differentiably on the selected parameters among its arguments."""
        def probe(x):
            if isinstance(x, torch.Tensor) and self._view_of(x) is not None and (
                torch.is_floating_point(x) or torch.is_complex(x)
            ):
                return x.detach().requires_grad_(True)
            if isinstance(x, (list, tuple)):
                return type(x)(probe(y) for y in x)
            return x

        try:
            with torch.enable_grad():
                out = func(*[probe(a) for a in args], **{k: probe(v) for k, v in kwargs.items()})
        except Exception:
            return True  # cannot tell: treat as a gradient path (and raise)
        return any(t.requires_grad for t in _tensors(out))

    # ------------------------------------------------------------ view ops
    def _view_op(self, func, args, kwargs, opname):
        v = self._view_of(args[0]) if args else None
        if v is None:  # the parameter is an argument, not the tensor being viewed (e.g. index_select on ids)
            raise self._unsupported(self._find_views(args, kwargs)[0], opname)
        out = func(*args, **kwargs)
        if opname == "index_select":
            return self._embedding_like(v, out, args, kwargs, opname)
        if opname == "__getitem__":
            idx = args[1]
            if isinstance(idx, torch.Tensor) and not torch.is_floating_point(idx) and idx.dtype != torch.bool:
                return self._gather(v, out, idx, opname)
        if not isinstance(out, torch.Tensor):
            if isinstance(out, (tuple, list)):  # split / chunk / tensor_split
                return type(out)(self._split_part(v, t, opname, args, kwargs, out) for t in out)
            return out
        change = self._view_change(v, out, opname, args, kwargs)
        return self._derive(v, out, **change)

    def _split_part(self, v, t, opname, args, kwargs, parts):
        dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
        if v.lead or v.transposed or dim not in (0, -len(v.base)) or not isinstance(t, torch.Tensor):
            return self._derive(v, t, bad=f"{opname} along a dimension other than the stored rows")
        start = 0
        for p in parts:
            if p is t:
                break
            start += p.shape[0]
        r0 = (v.rows[0] if v.rows else 0) + start
        return self._derive(v, t, rows=(r0, r0 + t.shape[0]))

    def _view_change(self, v: _View, out: torch.Tensor, opname: str, args, kwargs) -> dict:
        if opname in ("contiguous", "clone", "to", "type", "float", "double", "half", "bfloat16"):
            return {} if tuple(out.shape) == tuple(args[0].shape) else {"bad": f"{opname} changed the shape"}
        if opname in ("neg", "__neg__", "negative"):
            return {"coef": -v.coef}
        base = v.base
        if opname in ("t", ".T", ".mT", ".H", ".mH", "transpose", "swapaxes", "swapdims", "permute"):
            if v.lead == 0 and len(base) == 1 and out.ndim == 1:
                return {}
            if v.lead == 0 and len(base) == 2 and out.ndim == 2:
                if opname in ("transpose", "swapaxes", "swapdims"):
                    d0, d1 = (int(args[1]) % 2, int(args[2]) % 2) if len(args) >= 3 else (0, 1)
                    return {} if d0 == d1 else {"transposed": not v.transposed}
                if opname == "permute":
                    dims = tuple(args[1]) if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
                    return {} if tuple(int(d) % 2 for d in dims) == (0, 1) else {"transposed": not v.transposed}
                return {"transposed": not v.transposed}
            return {"bad": f"{opname} of a broadcast view"}
        if opname in ("__getitem__", "narrow"):
            return self._slice_change(v, out, opname, args)
        if opname in ("view", "reshape", "view_as", "reshape_as", "unsqueeze", "expand", "expand_as"):
            shape = tuple(out.shape)
            n = len(shape) - len(base)
            if n >= 0 and shape[n:] == base and (opname in ("expand", "expand_as") or all(s == 1 for s in shape[:n])):
                return {"lead": n}
            return {"bad": f"{opname} to shape {shape} reshapes the parameter"}
        return {"bad": opname}

    def _slice_change(self, v: _View, out, opname, args) -> dict:
        if opname == "narrow":
            dim, start, length = args[1], args[2], args[3]
            if isinstance(start, torch.Tensor):
                start = int(start)
            idx = (slice(None),) * (dim % max(out.ndim, 1)) + (slice(start, start + length),)
        else:
            idx = args[1]
        if not isinstance(idx, tuple):
            idx = (idx,)
        lead = 0
        items = list(idx)
        while items and items[0] is None:
            lead += 1
            items.pop(0)
        first = items.pop(0) if items else slice(None)
        if not all(it == slice(None) or it is Ellipsis for it in items) or v.lead:
            return {"bad": "indexing other than a slice of rows"}
        if first is Ellipsis:
            first = slice(None)
        if not isinstance(first, slice):
            return {"bad": "indexing other than a slice of rows"}
        start, stop, step = first.indices(v.base[0])
        if step != 1:
            return {"bad": "a strided slice"}
        if first == slice(None):
            return {"lead": lead}
        if v.transposed:
            return {"bad": "a column slice of the stored weight", "lead": lead}
        r0 = (v.rows[0] if v.rows else 0) + start
        return {"rows": (r0, r0 + max(stop - start, 0)), "lead": lead}

    # -------------------------------------------------------------- uses
    def _linear_use(self, x, w, b, opname: str, out=None, transposed_extra=False):
        """``out = x @ w^T + b`` (computed natively when ``out`` is None) with w/b possibly views."""
        wv, bv = self._view_of(w), self._view_of(b)
        if self._view_of(x) is not None:
            raise self._fail(self._view_of(x), opname, "a parameter used as the input (activation) of a linear "
                             "map is not supported.")
        if out is None:
            out = F.linear(x, w, b)
        recs = []
        if wv is not None:
            transposed = wv.transposed != transposed_extra
            if wv.lead or len(wv.stored) != 2:
                raise self._fail(wv, opname, f"expected a 2-D weight (or its transpose / row slice), got a view "
                                 f"of shape {tuple(w.shape)} of a parameter of shape {wv.stored}.")
            recs.append(self._record(wv, "linear", opname, act=x, swap=transposed, rows=wv.rows, coef=wv.coef,
                                     stored=wv.stored))
        if bv is not None:
            recs.append(self._bias_record(bv, opname))
        prov = self.call_prov("linear", (x, w), {}, [out])[0]
        return self._finish(out, recs, [x], opname, prov)

    def _bias_record(self, bv: _View, opname: str, coef: float = 1.0):
        if bv.transposed or len(bv.base) != 1:
            return self._record(bv, "dense-add", opname, coef=bv.coef * coef, rows=bv.rows, base=bv.base,
                                stored=bv.stored)
        return self._record(bv, "bias", opname, rows=bv.rows, coef=bv.coef * coef, stored=bv.stored)

    def _gather(self, v: _View, out, ids, opname):
        if not v.plain or len(v.stored) != 2:
            raise self._fail(v, opname, "embedding lookups need the plain 2-D weight.")
        rec = self._record(v, "embedding", opname, act=ids, coef=v.coef, stored=v.stored)
        return self._finish(out, [rec], [ids], opname, self.prov(ids))

    def _embedding_like(self, v, out, args, kwargs, opname):
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        ids = args[2] if len(args) > 2 else kwargs.get("index")
        if dim != 0:
            raise self._fail(v, opname, "index_select along a dimension other than 0 is not supported.")
        return self._gather(v, out, ids, opname)

    def _elementwise(self, func, args, kwargs, opname):
        a = args[0] if args else kwargs.get("input")
        b = args[1] if len(args) > 1 else kwargs.get("other")
        alpha = kwargs.get("alpha", 1)
        va, vb = self._view_of(a), self._view_of(b)
        if va is not None and vb is not None:
            raise self._fail(va, opname, f"combining two parameter tensors ({va.name!r}, {vb.name!r}) is not supported.")
        if kwargs.get("rounding_mode") is not None:
            raise self._unsupported(va or vb, opname)
        v, other, v_first = (va, b, True) if va is not None else (vb, a, False)
        add = opname in ("add", "__add__", "__radd__")
        sub = opname in ("sub", "__sub__", "__rsub__", "subtract", "rsub")
        mul = opname in ("mul", "__mul__", "__rmul__", "multiply")
        div = opname in ("div", "__truediv__", "true_divide", "divide")
        if opname == "__rsub__" or opname == "rsub":
            v_first = not v_first  # __rsub__(self, other) computes other - self
        if alpha != 1 and not (add or sub):
            raise self._unsupported(v, opname)
        scalar = _is_number(other) or (
            isinstance(other, torch.Tensor) and other.ndim == 0 and not self._carries(other) and not other.requires_grad
        )
        out = func(*args, **kwargs)
        if scalar:  # a derived parameter tensor: coef * P + const
            if isinstance(other, torch.Tensor):
                other = other.item()
            if add:
                coef = v.coef * (alpha if not v_first else 1)
            elif sub:
                coef = v.coef * ((-alpha) if not v_first else 1)
            elif mul:
                coef = v.coef * other
            elif div and v_first:
                coef = v.coef / other
            else:
                raise self._unsupported(v, opname)
            return self._derive(v, out, coef=coef)
        if not isinstance(other, torch.Tensor) or div:
            return self.dense_use(func, args, kwargs, [v], opname)
        if not self._carries(other) and not other.requires_grad:
            raise self._fail(v, opname, "the other operand does not depend on the batch: this builds a derived "
                             "parameter tensor, which SDI cannot attribute through. Apply the operation to the "
                             "activations instead.")
        if tuple(out.shape[out.ndim - len(v.base):]) != v.base or tuple(v.tensor.shape[v.lead:]) != v.base:
            raise self._fail(v, opname, f"the parameter view of shape {tuple(v.tensor.shape)} must broadcast along "
                             f"leading axes only (output shape {tuple(out.shape)}).")
        if mul:
            kind = "scale" if len(v.base) == 1 and not v.transposed else "dense-mul"
            rec = self._record(v, kind, opname, act=other, rows=v.rows, coef=v.coef, base=v.base, stored=v.stored)
        else:
            sign = 1.0
            if sub and not v_first:
                sign = -float(alpha)
            elif not v_first:
                sign = float(alpha)
            rec = self._bias_record(v, opname, coef=sign)
        return self._finish(out, [rec], [other], opname, self.call_prov(opname, args, kwargs, [out])[0])

    # ---------------------------------------------------------- bookkeeping at the end
    def emit(self, rec: _Record, g: torch.Tensor) -> None:
        B = self.B
        if rec.source is not None:
            if rec.source._version != rec.version:
                raise SDIError(
                    f"The input of {rec.opname!r} (a use of parameter {rec.name!r} at step {rec.step}) was modified "
                    "in place after the use, so its value at the time of the use is lost (autograd would reject this "
                    "in training too). Replace the in-place operation (e.g. x += y -> x = x + y)."
                )
            rec.source = None
        if rec.coef != 1.0:
            g = g * rec.coef
        if rec.kind == "linear":
            x, rec.act = rec.act, None
            a = self._rows(x, rec, "activation")
            gg = self._rows(g, rec, "gradient")
            if rec.swap:
                use = FactorUse(rec.name, rec.step, "linear", gg, a, rec.use_index, row_slice=rec.rows)
            else:
                use = FactorUse(rec.name, rec.step, "linear", a, gg, rec.use_index, row_slice=rec.rows)
        elif rec.kind == "bias":
            use = FactorUse(rec.name, rec.step, "bias", None, self._rows(g, rec, "gradient"), rec.use_index,
                            row_slice=rec.rows)
        elif rec.kind == "scale":
            act, rec.act = rec.act, None
            if callable(act):
                act = act()
            if tuple(act.shape) != tuple(g.shape):
                act = act.expand(g.shape)
            use = FactorUse(rec.name, rec.step, "scale", self._rows(act, rec, "activation"),
                            self._rows(g, rec, "gradient"), rec.use_index, row_slice=rec.rows)
        elif rec.kind == "embedding":
            ids, rec.act = rec.act, None
            use = FactorUse(rec.name, rec.step, "embedding", self._ids(ids, rec), self._rows(g, rec, "gradient"),
                            rec.use_index, ignore_index=rec.ignore_index)
        elif rec.kind == "dense-fallback":
            call, rec.act = rec.act, None
            use = FactorUse(rec.name, rec.step, "dense", None, call.per_example_grad(g, rec.out_prov, B),
                            rec.use_index)
        else:  # dense-add / dense-mul: an N-D parameter broadcast along leading axes
            act, rec.act = rec.act, None
            contrib = g if rec.kind == "dense-add" else g * act
            nb = len(rec.base)
            per = self._batch_major(contrib, rec, "gradient", trailing=nb).sum(1)  # [B, *base]
            full = per
            if rec.rows is not None:
                full = per.new_zeros((B,) + tuple(rec.stored))
                full[:, rec.rows[0]:rec.rows[1]] = per
            use = FactorUse(rec.name, rec.step, "dense", None, full, rec.use_index)
        self.emitted += 1
        self.on_use(use)

    def _batch_major(self, t: torch.Tensor, rec: _Record, what: str, trailing: int = 1) -> torch.Tensor:
        """``t`` as ``[B, -1, *t.shape[-trailing:]]`` (examples first), by the example axis tracked for it."""
        B = self.B
        prov = rec.act_prov if what == "activation" else rec.out_prov
        if rec.layout == "mT":  # W @ x: features on axis -2
            t = t.mT
            if isinstance(prov, ex.Axis) and prov.dim == t.ndim - 1:
                prov = ex.Axis(t.ndim - 2, prov.outer, prov.inner)
        if what == "activation" and rec.shared is not None:  # the gradient is of the expanded output already
            t = t.expand(B, *t.shape[1:]) if rec.shared == "expand0" else t.expand(B, *t.shape)
            prov = ex.Axis(0)
        return _examples_first(t, prov, B, trailing, rec, what)

    def _rows(self, t, rec, what):
        return self._batch_major(t, rec, what, trailing=1)

    def _ids(self, ids: torch.Tensor, rec: _Record) -> torch.Tensor:
        B = self.B
        prov = rec.act_prov
        if rec.shared is not None:
            ids = ids.expand(B, *ids.shape[1:]) if rec.shared == "expand0" else ids.expand(B, *ids.shape)
            prov = ex.Axis(0)
        return _examples_first(ids, prov, B, 0, rec, "ids")


def _examples_first(t: torch.Tensor, prov, B: int, trailing: int, rec: _Record, what: str) -> torch.Tensor:
    """``t`` as ``[B, -1, *t.shape[t.ndim - trailing:]]``: the tracked example axis unmerged and moved first."""
    tail = tuple(t.shape[t.ndim - trailing:])
    if B == 1 and not isinstance(prov, ex.Axis):
        return t.reshape((1, -1) + tail)  # one example: every row is its own
    ok = isinstance(prov, ex.Axis) and prov.dim < t.ndim - trailing and \
        t.shape[prov.dim] == prov.outer * B * prov.inner
    if not ok:
        where = prov.describe() if prov is not None else "not tracked (it does not depend on the batch)"
        raise SDIError(
            f"Parameter {rec.name!r} in {rec.opname!r} at step {rec.step}: its {what} has shape {tuple(t.shape)} "
            f"and its example axis is {where}, which does not hold the {B} examples of the batch. This is a bug "
            "in the example-axis tracking of sdi_torch (please report it with the model); leave the parameter "
            "out of the selection meanwhile."
        )
    d = prov.dim
    if prov.outer != 1 or prov.inner != 1:
        t = t.unflatten(d, (prov.outer, B, prov.inner))
        d += 1
    if d != 0:
        t = t.movedim(d, 0)
    return t.reshape((B, -1) + tail)


def _storage_key(t: torch.Tensor) -> tuple:
    """Identifies ``t``'s data exactly (a detached copy has the same key)."""
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


def _tensors_deep(obj):
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            yield o
        elif isinstance(o, Mapping):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)


class _Recompute:
    """An activation recomputed from ``source`` when the gradient arrives (a norm's ``xhat``)."""

    __slots__ = ("source", "fn")

    def __init__(self, source: torch.Tensor, fn):
        self.source = source
        self.fn = fn

    def __call__(self):
        with torch.no_grad():
            return self.fn(self.source.detach())


class _DenseCall:
    """One call of a use without a factor form, kept until its output's gradient arrives."""

    __slots__ = ("func", "flat", "spec", "pos", "view", "batch_dims", "param")

    def __init__(self, func, flat, spec, pos, view, batch_dims, param):
        self.func, self.flat, self.spec, self.pos = func, flat, spec, pos
        self.view, self.batch_dims, self.param = view, batch_dims, param

    def _rebuild(self, p: torch.Tensor) -> torch.Tensor:
        v = self.view
        t = p
        if v.rows is not None:
            t = t[v.rows[0]:v.rows[1]]
        if v.transposed:
            t = t.T
        if v.coef != 1.0:
            t = t * v.coef
        t = t.to(v.tensor.dtype)
        return t if tuple(t.shape) == tuple(v.tensor.shape) else t.expand(v.tensor.shape)

    def per_example_grad(self, g: torch.Tensor, out_prov, B: int) -> torch.Tensor:
        """``[B, *param.shape]``: the gradient of each example's output, contracted with ``g``, w.r.t. the parameter."""
        from torch.func import vjp, vmap

        od = out_prov.dim
        order = list(self.batch_dims)
        func, flat, spec, pos = self.func, self.flat, self.spec, self.pos

        def one(g_b, *xs_b):
            def f(p):
                args = list(flat)
                for i, x in zip(order, xs_b):
                    args[i] = x.unsqueeze(self.batch_dims[i])  # each example as a batch of one
                args[pos] = self._rebuild(p)
                a, k = tree_unflatten(args, spec)
                return func(*a, **k).squeeze(od)

            _, pull = vjp(f, self.param.detach())
            return pull(g_b)[0]

        with torch.enable_grad():
            per = vmap(one, in_dims=(od, *[self.batch_dims[i] for i in order]))(g, *[flat[i] for i in order])
        self.flat = None
        return per


class _Recomputation:
    """Context of a checkpoint's recomputation: the capture's mode pushed, phase ``"recompute"``."""

    def __init__(self, owner: "FactorCapture", state: "BatchCapture", inner):
        self.owner, self.state, self.inner = owner, state, inner

    def __enter__(self):
        self.inner.__enter__()
        st = self.state
        self.saved = (st.phase, st.passthrough)
        if st.phase == "backward":
            st.phase, st.passthrough = "recompute", False
            self.owner._mode.__enter__()
            self.pushed = True
        else:
            self.pushed = False
        return self

    def __exit__(self, *exc):
        if self.pushed:
            self.owner._mode.__exit__(*exc)
        self.state.phase, self.state.passthrough = self.saved
        return self.inner.__exit__(*exc)


class _LeakWatch:
    """Pre-hook on a parameter's AccumulateGrad node: any gradient arriving there bypassed the capture."""

    def __init__(self, owner: "FactorCapture", name: str):
        self.owner = owner
        self.name = name

    def __call__(self, grad_outputs):
        st = self.owner._state
        if st is not None and st.leaked is None and any(g is not None for g in grad_outputs):
            st.leaked = self.name
        return None


class _Hook:
    """Tensor hook delivering an output's gradient to its records."""

    __slots__ = ("state", "recs")

    def __init__(self, state: BatchCapture, recs: list[_Record]):
        self.state = state
        self.recs = recs

    def __call__(self, grad):
        st = self.state
        if st.phase != "backward":
            return None
        st.passthrough = True  # the sketch's own torch calls need no interception
        try:
            for r in self.recs:
                st.emit(r, grad)
        finally:
            st.passthrough = False
        return None


# --------------------------------------------------------------------------- handlers


def _h_linear(st: BatchCapture, func, args, kwargs, opname):
    bound = _bind(("input", "weight", "bias"), args, kwargs)
    return st._linear_use(bound["input"], bound["weight"], bound.get("bias"), opname,
                          out=func(*args, **kwargs))


def _h_matmul(st: BatchCapture, func, args, kwargs, opname):
    if opname == "__rmatmul__":
        a, b = args[1], args[0]
    else:
        a = args[0] if args else kwargs.get("input")
        b = args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2"))
    va, vb = st._view_of(a), st._view_of(b)
    out = func(*args, **kwargs)
    if vb is not None and va is None:
        if b.ndim != 2 or a.ndim < 1:
            raise st._fail(vb, opname, f"expected x @ W with a 2-D weight, got shapes {tuple(a.shape)} @ {tuple(b.shape)}.")
        # x @ V == F.linear(x, V^T)
        return st._linear_use(a, b, None, opname, out=out, transposed_extra=True)
    if va is not None and vb is None:
        if a.ndim != 2 or b.ndim < 2:
            raise st._fail(va, opname, f"expected W @ x with a 2-D weight and a batched x, got shapes "
                           f"{tuple(a.shape)} @ {tuple(b.shape)}.")
        # V @ x == (x^T @ V^T)^T == F.linear(x^T, V)^T: record in the transposed layout
        recs = [st._record(va, "linear", opname, act=b, swap=va.transposed, rows=va.rows, coef=va.coef,
                           stored=va.stored)]
        if va.lead:
            raise st._fail(va, opname, "a broadcast view of a weight is not supported in matmul.")
        return st._finish(out, recs, [b], opname, st.call_prov(opname, args, kwargs, [out])[0], layout="mT")
    raise st._fail(va, opname, "a product of two parameter tensors is not supported.")


def _h_addmm(st: BatchCapture, func, args, kwargs, opname):
    bound = _bind(("input", "mat1", "mat2"), args, kwargs)
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
        v = st._find_views(args, kwargs)[0]
        raise st._fail(v, opname, "addmm with beta or alpha other than 1 is not supported.")
    x, w, b = bound["mat1"], bound["mat2"], bound["input"]
    if st._view_of(x) is not None:
        raise st._fail(st._view_of(x), opname, "a parameter as the left operand of addmm is not supported.")
    return st._linear_use(x, w, b, opname, out=func(*args, **kwargs), transposed_extra=True)


def _h_embedding(st: BatchCapture, func, args, kwargs, opname):
    if func is torch.embedding:
        bound = _bind(("weight", "input", "padding_idx", "scale_grad_by_freq", "sparse"), args, kwargs)
        pad = bound.get("padding_idx", -1)
        pad = None if pad is None or pad < 0 else pad
    else:
        bound = _bind(("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
                      args, kwargs)
        pad = bound.get("padding_idx")
        if pad is not None and pad < 0:
            pad = bound["weight"].shape[0] + pad
    v = st._view_of(bound["weight"])
    if v is None or st._view_of(bound["input"]) is not None:
        raise st._unsupported(st._find_views(args, kwargs)[0], opname)
    if bound.get("scale_grad_by_freq"):
        raise st._fail(v, opname, "scale_grad_by_freq=True scales gradients by batch-wide token counts, which mixes "
                       "examples; use scale_grad_by_freq=False.")
    if not v.plain or len(v.stored) != 2:
        raise st._fail(v, opname, "embedding lookups need the plain 2-D weight.")
    out = func(*args, **kwargs)
    rec = st._record(v, "embedding", opname, act=bound["input"], coef=v.coef, ignore_index=pad, stored=v.stored)
    return st._finish(out, [rec], [bound["input"]], opname, st.prov(bound["input"]))


def _h_norm(st: BatchCapture, func, args, kwargs, opname):
    if func is F.layer_norm:
        bound = _bind(("input", "normalized_shape", "weight", "bias", "eps"), args, kwargs)
        eps = bound.get("eps", 1e-5)
        xhat_fn = lambda x, s=tuple(bound["normalized_shape"]), e=eps: F.layer_norm(x, s, None, None, e)
    else:
        bound = _bind(("input", "normalized_shape", "weight", "eps"), args, kwargs)
        eps = bound.get("eps")
        xhat_fn = lambda x, s=tuple(bound["normalized_shape"]), e=eps: F.rms_norm(x, s, None, e)
    x = bound["input"]
    if st._view_of(x) is not None:
        raise st._fail(st._view_of(x), opname, "normalising a parameter tensor is not supported.")
    out = func(*args, **kwargs)
    recs = []
    wv, bv = st._view_of(bound.get("weight")), st._view_of(bound.get("bias"))
    if wv is not None:
        if wv.lead or wv.transposed:
            raise st._fail(wv, opname, "the norm's weight must be the parameter or a row slice of it.")

        xhat = _Recompute(x, xhat_fn)

        kind = "scale" if len(wv.base) == 1 else "dense-mul"
        recs.append(st._record(wv, kind, opname, act=xhat, rows=wv.rows, coef=wv.coef, base=wv.base,
                               stored=wv.stored))
    if bv is not None:
        if bv.lead or bv.transposed:
            raise st._fail(bv, opname, "the norm's bias must be the parameter or a row slice of it.")
        recs.append(st._bias_record(bv, opname))
    return st._finish(out, recs, [x], opname, st.call_prov(opname, args, kwargs, [out])[0])


def _h_mha(st: BatchCapture, func, args, kwargs, opname):
    ba = _MHA_SIG.bind(*args, **kwargs)
    ba.apply_defaults()
    A = dict(ba.arguments)
    for k in ("query", "key", "value", "attn_mask", "key_padding_mask", "static_k", "static_v", "bias_k", "bias_v"):
        v = st._view_of(A.get(k))
        if v is not None:
            raise st._fail(v, "multi_head_attention_forward", f"a selected parameter as its {k!r} is not supported "
                           "(add_bias_kv=True biases and parameters used as inputs are not captured); leave it out "
                           "of the selection.")
    q_in, k_in, v_in = A["query"], A["key"], A["value"]
    if q_in.dim() != 3:
        raise st._fail(st._find_views(args, kwargs)[0], "multi_head_attention_forward",
                       "unbatched (2-D) inputs have no batch axis; call nn.MultiheadAttention with batched inputs.")
    E = A["embed_dim_to_check"]
    if A["use_separate_proj_weight"]:
        ws = (A["q_proj_weight"], A["k_proj_weight"], A["v_proj_weight"])
    else:
        ws = tuple(_row_part(st, A["in_proj_weight"], i * E, (i + 1) * E) for i in range(3))
    b = A["in_proj_bias"]
    bs = (None, None, None) if b is None else tuple(_row_part(st, b, i * E, (i + 1) * E) for i in range(3))
    q = st._linear_use(q_in, ws[0], bs[0], "multi_head_attention_forward(q)")
    k = st._linear_use(k_in, ws[1], bs[1], "multi_head_attention_forward(k)")
    v = st._linear_use(v_in, ws[2], bs[2], "multi_head_attention_forward(v)")
    eye = torch.eye(E, dtype=q.dtype, device=q.device)  # x @ I^T is exact: the projections are done above
    A.update(query=q, key=k, value=v, in_proj_weight=None, in_proj_bias=None, out_proj_weight=eye,
             out_proj_bias=None, use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye,
             v_proj_weight=eye)
    attn, weights = func(**A)
    if st.phase in _TRACKING:
        for t, p in zip((attn, weights), st.call_prov("multi_head_attention_forward", (q, k, v), {},
                                                       [attn] + ([weights] if weights is not None else []))):
            st._mark(t, p)
    out = st._linear_use(attn, ba.arguments["out_proj_weight"], ba.arguments["out_proj_bias"],
                         "multi_head_attention_forward(out_proj)")
    return out, weights


def _row_part(st: BatchCapture, t, r0: int, r1: int):
    if t is None:
        return None
    part = t[r0:r1]
    v = st._view_of(t)
    if v is not None:
        change = st._slice_change(v, part, "__getitem__", (t, slice(r0, r1)))
        st._derive(v, part, **change)
    return part


def _bind(names, args, kwargs) -> dict:
    out = dict(zip(names, args))
    for k, val in kwargs.items():
        out[k] = val
    return out


def _h_einsum(st: BatchCapture, func, args, kwargs, opname):
    """``einsum`` with a 2-D weight that is a linear map of one other operand: a linear use; else the fallback."""
    eq = args[0] if args and isinstance(args[0], str) else None
    ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    views = st._find_views(args, kwargs)
    if eq is None or kwargs or len(ops) != 2 or len(views) != 1:
        return st.dense_use(func, args, kwargs, views, opname)
    wi = 0 if st._view_of(ops[0]) is not None else 1
    w, x = ops[wi], ops[1 - wi]
    wv = st._view_of(w)
    if not isinstance(x, torch.Tensor) or w.ndim != 2 or wv.lead:
        return st.dense_use(func, args, kwargs, views, opname)
    terms, rhs = ex.parse_einsum(eq, [o.ndim for o in ops])
    wt, xt = terms[wi], terms[1 - wi]
    # a linear map: one weight letter contracted with x, the other one new in the output, x's rest kept once each
    if len(set(wt)) != 2 or len(set(xt)) != len(xt) or len(set(rhs)) != len(rhs):
        return st.dense_use(func, args, kwargs, views, opname)
    c = [ch for ch in wt if ch in xt and ch not in rhs]
    f = [ch for ch in wt if ch not in xt and ch in rhs]
    keep = [ch for ch in xt if ch not in c]
    if len(c) != 1 or len(f) != 1 or sorted(keep + f) != sorted(rhs):
        return st.dense_use(func, args, kwargs, views, opname)
    c, f = c[0], f[0]
    # x permuted to [..keep, c]; W as F.linear's [f, c] (its transpose when the weight is written "cf")
    xp = x.permute([xt.index(ch) for ch in keep] + [xt.index(c)])
    st._mark(xp, st.call_prov("permute", (x, [xt.index(ch) for ch in keep] + [xt.index(c)]), {}, [xp])[0])
    if wt.index(f) == 0:
        y = st._linear_use(xp, w, None, opname)
    else:
        y = st._linear_use(xp, w, None, opname, out=F.linear(xp, w.T), transposed_extra=True)
    order = keep + [f]
    perm = [order.index(ch) for ch in rhs]
    out = y.permute(perm)
    if st.phase in _TRACKING:
        st._mark(out, st.call_prov("permute", (y, perm), {}, [out])[0])
    return out


_HANDLERS: dict = {}
_HANDLERS_BY_NAME: dict = {}


def _register():
    def put(obj, handler):
        if obj is not None:
            _HANDLERS[obj] = handler

    put(F.linear, _h_linear)
    put(getattr(torch._C._nn, "linear", None), _h_linear)
    for name in ("matmul", "mm", "__matmul__", "__rmatmul__"):
        put(getattr(torch, name, None), _h_matmul)
        put(getattr(torch.Tensor, name, None), _h_matmul)
        _HANDLERS_BY_NAME[name] = _h_matmul
    put(torch.addmm, _h_addmm)
    put(torch.Tensor.addmm, _h_addmm)
    put(F.embedding, _h_embedding)
    put(torch.embedding, _h_embedding)
    put(F.layer_norm, _h_norm)
    if hasattr(F, "rms_norm"):
        put(F.rms_norm, _h_norm)
    put(F.multi_head_attention_forward, _h_mha)
    put(torch.einsum, _h_einsum)


_register()


# --------------------------------------------------------------------------- session


class FactorCapture:
    """Install the capture on a model; run batches through it (internal engine of :class:`Attributor`).

    Use as a context manager: on entry every parameter's ``requires_grad`` is
    switched off and forward hooks are put on the loop modules; on exit (even
    on error) both are restored.
    """

    def __init__(self, model: nn.Module, selection: Selection, *, batch_size: Callable | int | None = None,
                 fallback: str = "dense"):
        if fallback not in ("dense", "error"):
            raise SDIError(f"fallback must be 'dense' (an exact per-example gradient for uses without a factor "
                           f"form) or 'error', got {fallback!r}.")
        self.fallback = fallback
        self.model = model
        self.selection = selection
        self.batch_size = batch_size
        self._active = False
        self._state: BatchCapture | None = None
        self._calls: dict = {}
        self._depth: dict = {}
        self._stack: list = []
        self._mode = None
        self._original_generator = None
        self._handles: list = []
        self._accumulators: list = []
        self._saved_requires_grad: list = []

    def __enter__(self) -> "FactorCapture":
        if self._active:
            raise SDIError("This capture is already active; featurize calls cannot be nested.")
        self._saved_requires_grad = [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            for name, p in self.selection.params.items():
                if p.requires_grad:
                    # A view made before featurize (a cached transpose) still leads to this node; with
                    # requires_grad off the engine drops what arrives, so watch for it.
                    acc = p.view_as(p).grad_fn.next_functions[0][0]
                    self._handles.append(acc.register_prehook(_LeakWatch(self, name)))
                    self._accumulators.append(acc)
            for p, _ in self._saved_requires_grad:
                p.requires_grad_(False)
            for m in self.selection.loop_modules:
                self._handles.append(m.register_forward_pre_hook(self._pre))
                self._handles.append(m.register_forward_hook(self._post, always_call=True))
            ckpt = torch.utils.checkpoint
            original = getattr(ckpt, "_checkpoint_without_reentrant_generator", None)
            if original is not None:  # process-global for the duration of the capture, restored on exit
                self._original_generator = original
                ckpt._checkpoint_without_reentrant_generator = self._checkpoint_generator
        except BaseException:
            self._restore()
            raise
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._original_generator is not None:
            torch.utils.checkpoint._checkpoint_without_reentrant_generator = self._original_generator
            self._original_generator = None
        for h in self._handles:
            h.remove()
        self._handles = []
        self._accumulators = []
        for p, flag in self._saved_requires_grad:
            p.requires_grad_(flag)
        self._saved_requires_grad = []
        self._active = False
        self._state = None

    def _pre(self, module, args):
        st = self._state
        if st is None or st.phase != "forward":
            return None  # a checkpoint's recomputation is no new call (see _checkpoint_generator)
        d = self._depth.get(module, 0)
        self._depth[module] = d + 1
        if d == 0:
            self._calls[module] = self._calls.get(module, 0) + 1
        self._stack.append(module)
        return None

    def _post(self, module, args, output):
        st = self._state
        if st is None or st.phase != "forward":
            return None
        if self._stack and self._stack[-1] is module:
            self._stack.pop()
            self._depth[module] -= 1
        return None

    def _checkpoint_generator(self, fn, preserve_rng_state=True, context_fn=None, determinism_check="default",
                              debug=False, early_stop=True, *args, **kwargs):
        """``torch.utils.checkpoint``'s non-reentrant driver, with the capture added to its recomputation.

        The recomputation runs during backward, outside the capture's mode; it must repeat the forward's
        operations exactly (else torch raises ``CheckpointError``), so it runs through the mode again, in the
        phase ``"recompute"``: operations are followed but no use is recorded and no step counted.  Its
        inputs are detached copies of the forward's (same storage), which gives back their example axes.
        """
        st = self._state
        if st is not None and st.phase == "forward":
            for t in _tensors_deep((args, kwargs)):
                p = st.prov(t)
                if p is not None:
                    st.input_prov[_storage_key(t)] = p
            user_context = context_fn or torch.utils.checkpoint.noop_context_fn

            def context():
                fwd, recompute = user_context()
                return fwd, _Recomputation(self, st, recompute)

            context_fn = context
        if context_fn is None:
            context_fn = torch.utils.checkpoint.noop_context_fn
        return self._original_generator(fn, preserve_rng_state, context_fn, determinism_check, debug, early_stop,
                                        *args, **kwargs)

    def run(self, loss_fn: Callable, batch, on_use: Callable[[FactorUse], None],
            on_loss: Callable[[torch.Tensor, dict], None] | None = None) -> dict:
        """Forward and backward one batch; stream its uses to ``on_use``.

        Args:
            loss_fn: ``loss_fn(model, batch) -> [B]`` per-example losses.
            on_use: called with each :class:`~sdi_core.FactorUse` as its
                grad-output arrives (during backward).
            on_loss: called as ``on_loss(loss, steps)`` with the detached
                loss ``[B]`` and ``{group: S_g}`` before backward (e.g. to size
                a sketcher).

        Returns:
            ``{"loss": [B] detached, "steps": {group: S_g}, "uses": n}``.
        """
        if not self._active:
            raise SDIError("FactorCapture.run must be called inside `with FactorCapture(...)`.")
        hint = self.batch_size(batch) if callable(self.batch_size) else self.batch_size
        st = BatchCapture(self, batch, on_use, hint)
        self._state = st
        self._calls = {m: 0 for m in self.selection.loop_modules}
        self._depth = {}
        self._stack = []
        grads_before = [(p, p.grad, None if p.grad is None else p.grad._version) for p in self.model.parameters()]
        mode = self._mode = _Mode(st)
        try:
            st.phase = "forward"
            with mode:
                loss = loss_fn(self.model, batch)
            st.phase = "checks"
            loss = _check_loss(loss)
            lp = st.prov(loss)
            if isinstance(lp, ex.Lost) or (isinstance(lp, ex.Axis) and lp != ex.Axis(0)):
                if int(loss.shape[0]) != 1:
                    why = lp.describe() if isinstance(lp, ex.Lost) else f"on {lp.describe()}"
                    raise SDIError(
                        f"loss_fn returned losses of shape {tuple(loss.shape)} whose examples cannot be followed "
                        f"from the batch: the example axis was {why}. Per-example losses must keep the examples "
                        "apart (no sum or mean over the batch, no normalisation by a batch-wide count such as "
                        "mask.sum()); reduce each example's own tokens only, e.g. loss.sum(1) / mask.sum(1)."
                    )
            st.B = int(loss.shape[0])
            if st.batch_hint is not None and st.batch_hint != st.B and any(r.shared for r in st.pending):
                raise SDIError(
                    f"loss_fn returned {st.B} losses but the batch size read from the batch is {st.batch_hint}; "
                    "pass batch_size= (a callable batch -> B) to the Attributor."
                )
            steps = self._steps(st)
            if on_loss is not None:
                on_loss(loss.detach(), steps)
            if not loss.requires_grad:
                raise SDIError(
                    "The loss does not depend on any use of the selected parameters (it does not require grad). "
                    "Check that loss_fn runs the model on the batch and that the selection is used in it."
                )
            st.phase = "backward"
            with mode:
                torch.autograd.backward(loss.sum())
            st.phase = "done"
            self._check_nograd(st)
            if st.leaked is not None:
                raise SDIError(
                    f"Parameter {st.leaked!r} received a gradient through a path the capture did not see (a view or "
                    "copy of it made before featurize, e.g. a cached transpose). SDI would miss that use; create "
                    "such views inside forward."
                )
            for p, g0, v0 in grads_before:
                if p.grad is not g0 or (g0 is not None and g0._version != v0):
                    name = next((n for n, q in self.model.named_parameters() if q is p), "?")
                    if g0 is None:
                        p.grad = None
                    raise SDIError(
                        f"Parameter {name!r} received a gradient through a path the capture did not see (a view or "
                        "copy of it made before featurize, e.g. a cached transpose). SDI would miss that use; "
                        "create such views inside forward."
                    )
            self._check_unused(st)
            cov = st.coverage
            cov.steps_run = dict(steps)
            cov.steps_with_grad = {g: len({s for p, per in cov.uses.items() if cov.groups[p] == g
                                           for s, k in per.items() if sum(k.values())}) for g in steps}
            return {"loss": loss.detach(), "steps": steps, "uses": st.emitted, "coverage": cov}
        finally:
            st.phase = "done"
            for h in st.handles:
                h.remove()
            st.pending.clear()
            st.handles.clear()
            self._state = None

    def _check_nograd(self, st: BatchCapture) -> None:
        if st.nograd_use is None:
            return
        name, op = st.nograd_use
        if st.use_count.get(name, 0) == 0 or st.replayed is not None:
            raise SDIError(
                f"Parameter {name!r} was used in {op!r} with gradients disabled in the forward pass, so no "
                "gradient reaches it there. If this is reentrant activation checkpointing "
                "(torch.utils.checkpoint(..., use_reentrant=True)), use use_reentrant=False, which the capture "
                "supports; if it is a torch.no_grad() block, leave the parameter out of the selection."
            )

    def _check_unused(self, st: BatchCapture) -> None:
        """A group none of whose parameters is used is a selection mistake; one unused parameter in a used
        group is not (its features are zero): the coverage reports it and the Attributor warns."""
        for group in self.selection.groups:
            names = self.selection.names_in(group)
            if names and all(st.use_count[n] == 0 for n in names):
                raise SDIError(
                    f"None of the selected parameters of group {group!r} ({names[:8]}"
                    f"{' ...' if len(names) > 8 else ''}) is used (with gradients enabled) in the forward pass "
                    "of this batch. Leave them out of the selection, or check that loss_fn runs the part of the "
                    "model they belong to."
                )

    def _steps(self, st: BatchCapture) -> dict[str, int]:
        sel = self.selection
        self._check_nograd(st)
        steps = {g: 1 for g in sel.groups}
        if LOOP in steps:
            loop_names = sel.names_in(LOOP)
            if sel.loop_by_uses:
                counts = {n: st.use_count[n] for n in loop_names}
                if all(c == 0 for c in counts.values()):
                    raise SDIError(
                        f"None of the loop parameters {loop_names} is used in the forward pass (with gradients "
                        "enabled). Check the loop selection."
                    )
                if len(set(counts.values())) > 1:
                    raise SDIError(
                        f"The loop parameters are used different numbers of times in the forward pass ({counts}), so "
                        "the step of each use is ambiguous. Pass the looped module as loop= (a step is then one "
                        "call of it), or select parameters that are used once per step."
                    )
                steps[LOOP] = next(iter(counts.values()))
            else:
                calls = {f"{type(m).__name__}#{i}": self._calls.get(m, 0) for i, m in enumerate(sel.loop_modules)}
                called = {k: c for k, c in calls.items() if c > 0}  # uncalled modules only lend weights
                if not called:
                    raise SDIError(
                        f"The loop module(s) {list(calls)} are never called in the forward pass. Pass the module "
                        "that the model calls once per loop step (and call it as module(x), not module.forward(x))."
                    )
                if len(set(called.values())) > 1:
                    raise SDIError(
                        f"The loop modules are called different numbers of times ({called}); a loop step is one call, "
                        "so pass a single module per step (or modules called once per step each)."
                    )
                steps[LOOP] = next(iter(called.values()))
        return steps


def _check_loss(loss) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise SDIError(
            f"loss_fn must return a torch.Tensor of per-example losses with shape (B,), got {type(loss).__name__}."
        )
    if loss.ndim != 1:
        hint = (
            " It returned a scalar: return the per-example losses (e.g. reduction='none', then a mean over "
            "tokens per example), not their mean."
            if loss.ndim == 0
            else " Reduce every axis but the batch axis (e.g. loss.mean(dim=1))."
        )
        raise SDIError(f"loss_fn must return per-example losses of shape (B,), got shape {tuple(loss.shape)}.{hint}")
    if not torch.is_floating_point(loss):
        raise SDIError(f"loss_fn must return floating-point losses, got dtype {loss.dtype}.")
    return loss


def capture_factors(model: nn.Module, loop, loss_fn: Callable, batch, *, groups=None, batch_size=None):
    """Losses and the factor stream of one batch, in forward order (for tests and inspection).

    Returns:
        ``(loss [B], uses, steps)``: ``uses`` is the list of
        :class:`~sdi_core.FactorUse` (torch tensors, batch-major
        ``[B, T, d]``) sorted by ``use_index`` (forward order); ``steps`` is
        ``{group: S_g}``.
    """
    from .selection import resolve_selection

    sel = resolve_selection(model, loop, groups)
    uses: list[FactorUse] = []

    def keep(use):
        uses.append(FactorUse(use.param, use.step, use.kind,
                              None if use.activation is None else use.activation.detach().clone(),
                              use.grad_output.detach().clone(), use.use_index, use.row_slice, use.ignore_index))

    with FactorCapture(model, sel, batch_size=batch_size) as cap:
        res = cap.run(loss_fn, batch, keep)
    uses.sort(key=lambda u: u.use_index)
    return res["loss"], uses, res["steps"]
