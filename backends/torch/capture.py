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

Understood uses (the op handlers, :mod:`sdi_torch.handlers`):

- ``F.linear`` (``nn.Linear``, fused qkv), ``matmul`` / ``@`` / ``mm`` /
  ``addmm`` with a parameter operand (GPT-2 ``Conv1D``, a weight called from
  another module, a tied unembedding), an ``einsum`` that is a linear map,
  on the weight, its transpose or a row slice of it (``split`` / ``chunk`` /
  ``narrow`` / ``[a:b]``; :mod:`sdi_torch.views`);
- ``F.embedding`` (with ``padding_idx``), ``torch.embedding``, ``W[ids]``,
  ``index_select``;
- ``F.layer_norm`` (with or without weight and bias), ``F.rms_norm``;
- elementwise ``x * w``, ``x + b``, ``x - b`` with a broadcast parameter
  (hand-written norms, biases, ``x * (1 + w)``), with scalar factors folded in;
- ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``): its
  sequence-first q/k/v projections (slices of ``in_proj_weight``) and output
  projection are captured, and the attention core runs natively.

Any other use of a selected parameter is taken as its exact per-example
gradient (``fallback="dense"``: a ``torch.func`` vmap of a vjp over the
call) or refused (``fallback="error"``).

Where the examples are in each tensor is followed by provenance
(:mod:`sdi_torch.example_axis`), never read from sizes: the batch's tensors
hold one example per index of axis 0, and every operation of the forward
pass moves that axis in a way its arguments determine.  A use whose input
does not depend on the batch at all (``pos_emb(arange(T))``) is *shared*: its
output is expanded over the batch so each example receives its own gradient.
The session (:class:`~sdi_torch.session.FactorCapture`) installs all this on
a model and removes it again.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from sdi_core import FactorUse, SDIError
from sdi_core.coverage import Coverage

from . import example_axis as ex
from .selection import LOOP
from .views import View, view_op

__all__ = ["FactorCapture", "BatchCapture", "capture_factors", "infer_batch_size"]


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
        views = st.find_views(args, kwargs)
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
        self.views: dict[int, View] = {}
        for name, p in self.sel.params.items():
            self.views[id(p)] = View(name, p, tuple(p.shape))
        self.group = {p.name: p.group for p in self.sel.infos}
        self.batchy: dict[int, tuple] = {}  # id -> (weak reference, Prov); a dead reference never matches
        for t in _tensors_deep(batch):  # the batch defines the example axis: axis 0 of its tensors of B rows
            if t.ndim >= 1 and (self.batch_hint is None or t.shape[0] == self.batch_hint):
                self.mark(t, ex.Axis(0))
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
    def find_views(self, args, kwargs) -> list[View]:
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

    def view_of(self, x) -> View | None:
        if not isinstance(x, torch.Tensor):
            return None
        v = self.views.get(id(x))
        return v if v is not None and v.tensor is x else None

    def carries(self, x) -> bool:
        return self.prov(x) is not None

    @property
    def tracking(self) -> bool:
        """Whether the example axis is followed now (the forward pass or a checkpoint's recomputation)."""
        return self.phase in _TRACKING

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

    def mark(self, t: torch.Tensor, prov: ex.Prov) -> None:
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
                    self.mark(t, ex.Axis(0))
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
            self.mark(t, p)
        if args and isinstance(args[0], torch.Tensor) and (
            (name.endswith("_") and not name.startswith("__")) or name in _INPLACE_DUNDERS
        ) and not any(t is args[0] for t in outs):
            self.mark(args[0], ex.propagate(name, (self._info(args[0]),) + tuple(self._info(a) for a in args[1:]),
                                             {}, [tuple(args[0].shape)])[0])
        o = kwargs.get("out") if kwargs else None
        if isinstance(o, torch.Tensor) and not any(t is o for t in outs):
            self.mark(o, ex.Lost(name, "wrote batch data into an out= tensor"))

    def _setitem(self, args) -> None:
        """``dest[idx] = value``: the destination's examples from the value's, if they line up exactly."""
        dest, idx, value = args[0], args[1], args[2]
        pv = self.prov(value)
        pd = self.prov(dest)
        if pv is None:
            return
        if isinstance(pv, ex.Lost):
            self.mark(dest, pv)
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
            self.mark(dest, want)
        else:
            self.mark(dest, ex.Lost("__setitem__", "wrote batch data into a tensor so that its examples cannot "
                                     "be followed", ((tuple(value.shape)), tuple(dest.shape))))

    def derive(self, v: View, t: torch.Tensor, **changes) -> torch.Tensor:
        nv = View(v.name, t, v.stored, v.rows, v.transposed, v.lead, v.coef, v.bad)
        for k, val in changes.items():
            setattr(nv, k, val)
        self.views[id(t)] = nv
        return t

    def fail(self, v: View | str, opname: str, why: str) -> SDIError:
        name = v.name if isinstance(v, View) else v
        return SDIError(f"Parameter {name!r} is used in {opname}: {why}")

    def unsupported(self, v: View, opname: str) -> SDIError:
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

    def record(self, v: View, kind: str, opname: str, **kw) -> _Record | None:
        if self.phase != "forward":
            return None
        if v.bad:
            raise self.unsupported(v, opname)
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

    def finish(self, out: torch.Tensor, recs: list, act_inputs: list, opname: str, prov: ex.Prov,
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
            self.mark(out, prov)
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
            kwargs and self.view_of(kwargs.get("out")) is not None
        ):
            if args and self.view_of(args[0]) is not None or self.view_of(kwargs.get("out")) is not None:
                raise self.fail(views[0], opname, "in-place modification of a selected parameter during the "
                                 "forward pass is not supported (it would also fail in training).")
            raise self.unsupported(views[0], opname)  # e.g. buffer[i] = W: the copy carries W's gradient
        handler = HANDLERS.get(func) or HANDLERS_BY_NAME.get(opname)
        if handler is not None:
            return handler(self, func, args, kwargs, opname)
        if opname in _VIEW_OPS:
            return view_op(self, func, args, kwargs, opname)
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
            raise self.unsupported(views[0], opname)
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or not torch.is_floating_point(out):
            raise self.unsupported(views[0], opname)
        flat, spec = tree_flatten((args, kwargs))
        params, batch_dims = [], {}
        for i, x in enumerate(flat):
            if not isinstance(x, torch.Tensor):
                continue
            v = self.view_of(x)
            if v is not None:
                if v.bad:
                    raise self.unsupported(v, opname)
                params.append((i, v))
                continue
            p = self.prov(x)
            if p is None:
                continue
            if not (isinstance(p, ex.Axis) and p.outer == 1 and p.inner == 1):
                raise self.fail(views[0], opname, f"an exact per-example gradient needs each input's examples on "
                                 f"an axis of their own, but an input of shape {tuple(x.shape)} has them "
                                 f"{p.describe()}.")
            batch_dims[i] = p.dim
        if not batch_dims:
            raise self.fail(views[0], opname, "no other operand depends on the batch: this builds a derived "
                             "parameter tensor, which SDI cannot attribute through. Apply the operation to the "
                             "activations instead, or leave the parameter out of the selection.")
        prov = self.call_prov(opname, args, kwargs, [out])[0]
        if isinstance(prov, ex.Axis) and (prov.outer != 1 or prov.inner != 1):
            prov = ex.Lost(opname, "its output merges the example axis with another")
        recs = []
        for i, v in params:
            rec = self.record(v, "dense-fallback", opname, stored=v.stored)
            if rec is not None:  # None in a checkpoint's recomputation
                rec.act = DenseCall(func, flat, spec, i, v, batch_dims, self.sel.params[v.name])
            recs.append(rec)
        return self.finish(out, recs, [flat[i] for i in batch_dims], opname, prov)

    def _differentiable(self, func, args, kwargs) -> bool:
        """Whether ``func``'s outputs depend differentiably on the selected parameters among its arguments."""
        def probe(x):
            if isinstance(x, torch.Tensor) and self.view_of(x) is not None and (
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
    def linear_use(self, x, w, b, opname: str, out=None, transposed_extra=False):
        """``out = x @ w^T + b`` (computed natively when ``out`` is None) with w/b possibly views."""
        wv, bv = self.view_of(w), self.view_of(b)
        if self.view_of(x) is not None:
            raise self.fail(self.view_of(x), opname, "a parameter used as the input (activation) of a linear "
                             "map is not supported.")
        if out is None:
            out = F.linear(x, w, b)
        recs = []
        if wv is not None:
            transposed = wv.transposed != transposed_extra
            if wv.lead or len(wv.stored) != 2:
                raise self.fail(wv, opname, f"expected a 2-D weight (or its transpose / row slice), got a view "
                                 f"of shape {tuple(w.shape)} of a parameter of shape {wv.stored}.")
            recs.append(self.record(wv, "linear", opname, act=x, swap=transposed, rows=wv.rows, coef=wv.coef,
                                     stored=wv.stored))
        if bv is not None:
            recs.append(self.bias_record(bv, opname))
        prov = self.call_prov("linear", (x, w), {}, [out])[0]
        return self.finish(out, recs, [x], opname, prov)

    def bias_record(self, bv: View, opname: str, coef: float = 1.0):
        if bv.transposed or len(bv.base) != 1:
            return self.record(bv, "dense-add", opname, coef=bv.coef * coef, rows=bv.rows, base=bv.base,
                                stored=bv.stored)
        return self.record(bv, "bias", opname, rows=bv.rows, coef=bv.coef * coef, stored=bv.stored)

    def gather(self, v: View, out, ids, opname):
        if not v.plain or len(v.stored) != 2:
            raise self.fail(v, opname, "embedding lookups need the plain 2-D weight.")
        rec = self.record(v, "embedding", opname, act=ids, coef=v.coef, stored=v.stored)
        return self.finish(out, [rec], [ids], opname, self.prov(ids))

    def embedding_like(self, v, out, args, kwargs, opname):
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        ids = args[2] if len(args) > 2 else kwargs.get("index")
        if dim != 0:
            raise self.fail(v, opname, "index_select along a dimension other than 0 is not supported.")
        return self.gather(v, out, ids, opname)

    def _elementwise(self, func, args, kwargs, opname):
        a = args[0] if args else kwargs.get("input")
        b = args[1] if len(args) > 1 else kwargs.get("other")
        alpha = kwargs.get("alpha", 1)
        va, vb = self.view_of(a), self.view_of(b)
        if va is not None and vb is not None:
            raise self.fail(va, opname, f"combining two parameter tensors ({va.name!r}, {vb.name!r}) is not supported.")
        if kwargs.get("rounding_mode") is not None:
            raise self.unsupported(va or vb, opname)
        v, other, v_first = (va, b, True) if va is not None else (vb, a, False)
        add = opname in ("add", "__add__", "__radd__")
        sub = opname in ("sub", "__sub__", "__rsub__", "subtract", "rsub")
        mul = opname in ("mul", "__mul__", "__rmul__", "multiply")
        div = opname in ("div", "__truediv__", "true_divide", "divide")
        if opname == "__rsub__" or opname == "rsub":
            v_first = not v_first  # __rsub__(self, other) computes other - self
        if alpha != 1 and not (add or sub):
            raise self.unsupported(v, opname)
        scalar = _is_number(other) or (
            isinstance(other, torch.Tensor) and other.ndim == 0 and not self.carries(other) and not other.requires_grad
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
                raise self.unsupported(v, opname)
            return self.derive(v, out, coef=coef)
        if not isinstance(other, torch.Tensor) or div:
            return self.dense_use(func, args, kwargs, [v], opname)
        if not self.carries(other) and not other.requires_grad:
            raise self.fail(v, opname, "the other operand does not depend on the batch: this builds a derived "
                             "parameter tensor, which SDI cannot attribute through. Apply the operation to the "
                             "activations instead.")
        if tuple(out.shape[out.ndim - len(v.base):]) != v.base or tuple(v.tensor.shape[v.lead:]) != v.base:
            raise self.fail(v, opname, f"the parameter view of shape {tuple(v.tensor.shape)} must broadcast along "
                             f"leading axes only (output shape {tuple(out.shape)}).")
        if mul:
            kind = "scale" if len(v.base) == 1 and not v.transposed else "dense-mul"
            rec = self.record(v, kind, opname, act=other, rows=v.rows, coef=v.coef, base=v.base, stored=v.stored)
        else:
            sign = 1.0
            if sub and not v_first:
                sign = -float(alpha)
            elif not v_first:
                sign = float(alpha)
            rec = self.bias_record(v, opname, coef=sign)
        return self.finish(out, [rec], [other], opname, self.call_prov(opname, args, kwargs, [out])[0])

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
            try:
                per = call.per_example_grad(g, rec.out_prov, B)
            except Exception as exc:  # noqa: BLE001 - torch.func cannot take this op per example
                raise SDIError(
                    f"Parameter {rec.name!r} at step {rec.step}: the exact per-example gradient of its use in "
                    f"{rec.opname!r} (the fallback for uses without a factor form) failed in torch.func: "
                    f"{type(exc).__name__}: {exc}. Rewrite the use as a linear map, embedding, scale or bias, "
                    "or leave the parameter out of the selection."
                ) from exc
            use = FactorUse(rec.name, rec.step, "dense", None, per, rec.use_index)
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


# The handlers and the session build on BatchCapture; imported last (they import this module).
from .handlers import HANDLERS, HANDLERS_BY_NAME, DenseCall  # noqa: E402
from .session import FactorCapture, capture_factors  # noqa: E402
