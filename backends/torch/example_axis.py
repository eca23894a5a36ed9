"""Where the examples are in a tensor: the example axis followed by provenance, never guessed from sizes.

The batch defines the example axis once: every tensor of the batch whose
leading size is the batch size holds one example per index of its axis 0.
From there each operation moves the axis in a way its arguments determine
(a transpose swaps it, a reshape merges it with its neighbours, a matmul
keeps it among the leading axes, a sum over it destroys it), so the axis of
every tensor in the forward pass is known exactly, whatever its sizes.  A
batch of 5 sequences of length 5 is no harder than one of 5 sequences of 6.

This module is pure Python on shapes: :func:`propagate` takes an operation's
name, its arguments with every tensor replaced by a :class:`Tensor` record
(its shape and its :data:`Prov`), and the shapes of its outputs, and returns
the provenance of each output.  The capture (:mod:`sdi_torch.capture`) calls
it for every torch operation of the forward pass that touches batch data.

Provenance is one of:

- ``None``: the tensor does not depend on the batch (weights, positions);
- :class:`Axis` ``(dim, outer, inner)``: the examples lie along ``dim``, whose
  index is ``(o * B + b) * inner + i`` for example ``b`` (``outer = inner = 1``
  for a plain axis; ``x.view(B * T, d)`` gives ``Axis(0, 1, T)``, the
  sequence-first ``x.view(T * B, d)`` gives ``Axis(0, T, 1)``);
- :class:`Lost`: the trail is lost (an operation mixed the examples or an
  operation this module does not know): a captured use that needs it is
  refused, naming this operation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

__all__ = ["Axis", "Lost", "Prov", "Tensor", "propagate", "known_ops", "reshape_axis", "index_axis", "einsum_axis"]


@dataclass(frozen=True)
class Axis:
    """The examples lie along ``dim``: index ``(o * B + b) * inner + i`` holds example ``b``."""

    dim: int
    outer: int = 1
    inner: int = 1

    def describe(self) -> str:
        if self.outer == 1 and self.inner == 1:
            return f"axis {self.dim}"
        return f"axis {self.dim} (merged: {self.outer} x B x {self.inner})"


@dataclass(frozen=True)
class Lost:
    """The example axis could not be followed through ``op`` (``why`` says how)."""

    op: str
    why: str
    shapes: tuple = ()

    def describe(self) -> str:
        shapes = f" (input shapes {list(self.shapes)})" if self.shapes else ""
        return f"lost at {self.op!r}{shapes}: {self.why}"


Prov = Union[Axis, Lost, None]


@dataclass(frozen=True)
class Tensor:
    """A tensor as the tracker sees it: its shape and its provenance."""

    shape: tuple[int, ...]
    prov: Prov = None
    is_bool: bool = False

    @property
    def ndim(self) -> int:
        return len(self.shape)


def _tensors(obj) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        out = []
        for o in obj:
            out.extend(_tensors(o))
        return out
    if isinstance(obj, dict):
        out = []
        for o in obj.values():
            out.extend(_tensors(o))
        return out
    return []


def _arg(args, kwargs, pos: int, name: str, default=None):
    if len(args) > pos:
        return args[pos]
    return kwargs.get(name, default)


def _norm_dim(d, ndim: int) -> int:
    d = int(d)
    return d + ndim if d < 0 else d


def _lost(op: str, why: str, tensors: Sequence[Tensor] = ()) -> Lost:
    return Lost(op, why, tuple(t.shape for t in tensors))


def _first_lost(tensors: Sequence[Tensor]) -> Lost | None:
    for t in tensors:
        if isinstance(t.prov, Lost):
            return t.prov
    return None


# ------------------------------------------------------------------ rules
# A rule maps (op, args, kwargs, out_shapes) to one Prov per output.  It runs only when at least one input
# carries the batch (Axis or Lost); a Lost input makes every output Lost (the first loss is kept, so the
# error names where the trail was lost, not where it was noticed).


def _broadcast(op, args, kwargs, outs):
    """Elementwise with broadcasting: the axis keeps its place counted from the right."""
    ts = _tensors(args) + _tensors(kwargs)
    nd = len(outs[0])
    found: Axis | None = None
    for t in ts:
        if not isinstance(t.prov, Axis):
            continue
        d = t.prov.dim + nd - t.ndim
        if t.shape[t.prov.dim] != outs[0][d]:
            return [_lost(op, "broadcasting stretched the example axis", ts)] * len(outs)
        cand = Axis(d, t.prov.outer, t.prov.inner)
        if found is not None and cand != found:
            return [_lost(op, f"combines tensors whose examples lie along different axes ({found.describe()} and "
                          f"{cand.describe()} of the result)", ts)] * len(outs)
        found = cand
    return [found] * len(outs)


def _along(dim_pos: int, dim_name: str, default: Any = None, what: str = "operates along"):
    """A shape-preserving (or size-changing along one dim) op acting along ``dim``: fine unless it is the example axis."""

    def rule(op, args, kwargs, outs):
        x = args[0] if args else kwargs.get("input")
        dims = _arg(args, kwargs, dim_pos, dim_name, default)
        ax = x.prov
        if dims is None:
            if default is None:  # acts on the flattened tensor
                return [_lost(op, f"{what} every axis, the example axis included", [x])] * len(outs)
            dims = default
        dims = [dims] if isinstance(dims, int) else list(dims)
        if any(_norm_dim(d, x.ndim) == ax.dim for d in dims):
            return [_lost(op, f"{what} the example axis, mixing examples", [x])] * len(outs)
        return [ax if len(o) == x.ndim else _lost(op, "changed the number of axes", [x]) for o in outs]

    return rule


def _reduce(op, args, kwargs, outs):
    x = args[0] if args else kwargs.get("input")
    ax = x.prov
    dims = _arg(args, kwargs, 1, "dim", None)
    if isinstance(dims, Tensor):  # torch.max(a, b): elementwise
        return _broadcast(op, args, kwargs, outs)
    if dims is None:
        dims = _arg(args, kwargs, 1, "axis", None)
    keep = bool(_arg(args, kwargs, 2, "keepdim", kwargs.get("keepdims", False)))
    if op in ("std", "var", "std_mean", "var_mean") and isinstance(dims, (bool, float)):
        dims = kwargs.get("dim")  # std(x, unbiased)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return [_lost(op, "reduces over every axis, the example axis included", [x])] * len(outs)
    dims = sorted({_norm_dim(d, x.ndim) for d in ([dims] if isinstance(dims, int) else dims)})
    if ax.dim in dims:
        return [_lost(op, "reduces over the example axis, mixing examples", [x])] * len(outs)
    new = ax.dim if keep else ax.dim - sum(1 for d in dims if d < ax.dim)
    return [Axis(new, ax.outer, ax.inner)] * len(outs)


def _transpose(op, args, kwargs, outs):
    x = args[0]
    ax = x.prov
    if op in ("t", ".T") or (op == "transpose" and x.ndim <= 1):
        if x.ndim < 2:
            return [ax]
        if op == ".T":
            return [Axis(x.ndim - 1 - ax.dim, ax.outer, ax.inner)]
        d0, d1 = 0, 1
    elif op in (".mT", ".mH", "adjoint"):
        d0, d1 = x.ndim - 2, x.ndim - 1
    else:
        d0 = _norm_dim(_arg(args, kwargs, 1, "dim0"), x.ndim)
        d1 = _norm_dim(_arg(args, kwargs, 2, "dim1"), x.ndim)
    d = ax.dim
    d = d1 if d == d0 else d0 if d == d1 else d
    return [Axis(d, ax.outer, ax.inner)]


def _permute(op, args, kwargs, outs):
    x = args[0]
    dims = args[1:] if len(args) > 2 or (len(args) == 2 and isinstance(args[1], int)) else _arg(args, kwargs, 1, "dims")
    dims = [_norm_dim(d, x.ndim) for d in dims]
    return [Axis(dims.index(x.prov.dim), x.prov.outer, x.prov.inner)]


def _movedim(op, args, kwargs, outs):
    x = args[0]
    src = _arg(args, kwargs, 1, "source")
    dst = _arg(args, kwargs, 2, "destination")
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    src = [_norm_dim(d, x.ndim) for d in src]
    dst = [_norm_dim(d, x.ndim) for d in dst]
    order = [None] * x.ndim
    for s, t in zip(src, dst):
        order[t] = s
    rest = iter(d for d in range(x.ndim) if d not in src)
    order = [o if o is not None else next(rest) for o in order]
    return [Axis(order.index(x.prov.dim), x.prov.outer, x.prov.inner)]


def reshape_axis(shape: Sequence[int], new_shape: Sequence[int], ax: Axis) -> Axis | str:
    """Where the examples of ``ax`` lie after a row-major reshape of ``shape`` to ``new_shape`` (or why not).

    The example index is one digit of the flat index: stride ``inner * prod(shape[dim+1:])``, radix ``B``.  It
    survives if one output dimension holds that whole digit.
    """
    n = shape[ax.dim]
    b = n // (ax.outer * ax.inner)
    stride = ax.inner * math.prod(shape[ax.dim + 1:])
    # Output dim k covers flat strides [lo, hi).  With b > 1 at most one dim holds the digit; with b == 1 it
    # fits at the boundaries too, and the outermost choice keeps it off the features (last) axis.
    for k, size in enumerate(new_shape):
        lo = math.prod(new_shape[k + 1:])
        hi = lo * size
        if lo <= stride and stride * b <= hi and stride % lo == 0 and hi % (stride * b) == 0:
            inner = stride // lo
            return Axis(k, size // (b * inner), inner)
    return f"splits the example axis (of size {n} at {ax.describe()}) across dimensions of {tuple(new_shape)}"


def _reshape(op, args, kwargs, outs):
    x = args[0] if args else kwargs.get("input")
    if x.prov is None:
        return [None]
    got = reshape_axis(x.shape, outs[0], x.prov)
    return [got if isinstance(got, Axis) else _lost(op, got, [x])]


def _expand(op, args, kwargs, outs):
    x = args[0]
    ax = x.prov
    d = ax.dim + len(outs[0]) - x.ndim
    if outs[0][d] != x.shape[ax.dim]:
        return [_lost(op, "stretched the example axis", [x])]
    return [Axis(d, ax.outer, ax.inner)]


def _repeat(op, args, kwargs, outs):
    x = args[0]
    reps = args[1:] if len(args) > 2 or (len(args) == 2 and isinstance(args[1], int)) else _arg(args, kwargs, 1, "repeats")
    reps = list(reps)
    nd = len(outs[0])
    reps = [1] * (nd - len(reps)) + reps
    d = x.prov.dim + nd - x.ndim
    if reps[d] != 1:
        return [_lost(op, "repeats along the example axis", [x])]
    return [Axis(d, x.prov.outer, x.prov.inner)]


def _squeeze(op, args, kwargs, outs):
    x = args[0]
    ax = x.prov
    dims = _arg(args, kwargs, 1, "dim")
    if dims is None:
        dims = [d for d, s in enumerate(x.shape) if s == 1]
    else:
        dims = [_norm_dim(d, x.ndim) for d in ([dims] if isinstance(dims, int) else dims)]
        dims = [d for d in dims if x.shape[d] == 1]
    if ax.dim in dims:
        return [_lost(op, "removed the example axis (a batch of one example)", [x])]
    return [Axis(ax.dim - sum(1 for d in dims if d < ax.dim), ax.outer, ax.inner)]


def _unsqueeze(op, args, kwargs, outs):
    x = args[0]
    d = _norm_dim(_arg(args, kwargs, 1, "dim"), x.ndim + 1)
    ax = x.prov
    return [Axis(ax.dim + 1 if d <= ax.dim else ax.dim, ax.outer, ax.inner)]


def _cat(op, args, kwargs, outs):
    ts = list(_arg(args, kwargs, 0, "tensors"))
    dim = _arg(args, kwargs, 1, "dim", 0)
    nd = len(outs[0])
    dim = _norm_dim(dim, nd)
    found = None
    for t in ts:
        if t.ndim == 1 and t.shape[0] == 0:
            continue  # torch.cat skips empty 1-D tensors
        if isinstance(t.prov, Axis):
            if t.prov.dim == dim:
                return [_lost(op, "concatenates along the example axis", ts)]
            if found is not None and t.prov != found:
                return [_lost(op, "concatenates tensors whose examples lie along different axes", ts)]
            found = t.prov
    return [found]


def _stack(op, args, kwargs, outs):
    ts = list(_arg(args, kwargs, 0, "tensors"))
    nd_in = len(outs[0]) - 1
    dim = _norm_dim(_arg(args, kwargs, 1, "dim", 0), nd_in + 1)
    found = None
    for t in ts:
        if isinstance(t.prov, Axis):
            if found is not None and t.prov != found:
                return [_lost(op, "stacks tensors whose examples lie along different axes", ts)]
            found = t.prov
    if found is None:
        return [None]
    return [Axis(found.dim + 1 if dim <= found.dim else found.dim, found.outer, found.inner)]


def _split(op, args, kwargs, outs):
    x = args[0] if args else kwargs.get("input")
    dim = _arg(args, kwargs, 1, "dim", 0) if op == "unbind" else _arg(args, kwargs, 2, "dim", 0)
    dim = _norm_dim(dim, x.ndim)
    if dim == x.prov.dim:
        return [_lost(op, "splits along the example axis (a sub-batch)", [x])] * len(outs)
    if op == "unbind":
        return [Axis(x.prov.dim - (1 if dim < x.prov.dim else 0), x.prov.outer, x.prov.inner)] * len(outs)
    return [x.prov] * len(outs)


def _narrow(op, args, kwargs, outs):
    x = args[0]
    dim = _norm_dim(_arg(args, kwargs, 1, "dim"), x.ndim)
    if dim == x.prov.dim and outs[0][dim] != x.shape[dim]:
        return [_lost(op, "takes part of the example axis (a sub-batch)", [x])]
    return [x.prov]


def _select(op, args, kwargs, outs):
    x = args[0]
    dim = _norm_dim(_arg(args, kwargs, 1, "dim"), x.ndim)
    if dim == x.prov.dim:
        return [_lost(op, "selects one index of the example axis", [x])]
    return [Axis(x.prov.dim - (1 if dim < x.prov.dim else 0), x.prov.outer, x.prov.inner)]


def _getitem(op, args, kwargs, outs):
    x, idx = args[0], args[1]
    if x.prov is None:
        return _index_by_batch(op, x, idx, outs)
    got = index_axis(x.shape, idx, x.prov)
    return [got if isinstance(got, Axis) else _lost(op, got, [x])]


def _index_by_batch(op, x, idx, outs):
    """A tensor that does not carry the batch, indexed by one that does (``pos_table[ids]``)."""
    items = idx if isinstance(idx, tuple) else (idx,)
    ts = [t for t in items if isinstance(t, Tensor)]
    carried = [t for t in ts if t.prov is not None]
    if len(ts) == 1 and isinstance(items[0], Tensor) and isinstance(ts[0].prov, Axis):
        return [ts[0].prov]  # x[ids]: the result has the index's axes first
    return [_lost(op, "indexes with a tensor that carries the batch in a way the tracker does not follow",
                  carried)]


def index_axis(shape: Sequence[int], idx, ax: Axis) -> Axis | str:
    """Where the examples lie in ``x[idx]`` (basic and advanced indexing), or why they cannot be followed."""
    items = list(idx) if isinstance(idx, tuple) else [idx]
    n_real = sum(1 for it in items if it is not None and it is not Ellipsis and not isinstance(it, bool))
    if any(isinstance(it, Tensor) and it.ndim > 0 and it.is_bool for it in items):
        return "a boolean mask index flattens the examples together"
    if Ellipsis in items:
        k = items.index(Ellipsis)
        items = items[:k] + [slice(None)] * (len(shape) - n_real) + items[k + 1:]
    else:
        items = items + [slice(None)] * (len(shape) - n_real)
    out_dim = 0
    in_dim = 0
    result: int | None = None
    adv_dims = []
    first_adv_out = None
    for it in items:
        if it is None:
            out_dim += 1
            continue
        if isinstance(it, (Tensor, list)):
            adv_dims.append(in_dim)
            if first_adv_out is None:
                first_adv_out = out_dim
            in_dim += 1
            continue
        if isinstance(it, bool) or isinstance(it, int):
            if in_dim == ax.dim:
                return "an integer index selects one index of the example axis"
            in_dim += 1
            continue
        if isinstance(it, slice):
            if in_dim == ax.dim:
                start, stop, step = it.indices(shape[in_dim])
                if (start, stop, step) != (0, shape[in_dim], 1):
                    return "a slice takes part of the example axis (a sub-batch)"
                result = out_dim
            in_dim += 1
            out_dim += 1
            continue
        return f"an index of type {type(it).__name__} is not followed"
    if adv_dims:
        if ax.dim in adv_dims:
            return "an advanced (tensor) index on the example axis"
        # Advanced indices are replaced by their broadcast shape: in place when adjacent, else in front.
        idx_nd = max(it.ndim if isinstance(it, Tensor) else 1 for it in items if isinstance(it, (Tensor, list)))
        adjacent = adv_dims == list(range(adv_dims[0], adv_dims[0] + len(adv_dims)))
        pos_adv = first_adv_out if adjacent else 0
        if result is None:
            return "the example axis was not found in the index"
        if result >= pos_adv:
            result += idx_nd
    if result is None:
        return "the example axis was not found in the index"
    return Axis(result, ax.outer, ax.inner)


def _matmul(op, args, kwargs, outs):
    if op == "__rmatmul__":
        a, b = args[1], args[0]
    elif op in ("baddbmm", "addmm", "addbmm", "addmv"):
        bias, a, b = args[0], args[1], args[2]
    else:
        a = args[0] if args else kwargs.get("input")
        b = args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2"))
    nd = len(outs[0])
    cands = []
    for t, is_a in ((a, True), (b, False)):
        if not isinstance(t, Tensor) or not isinstance(t.prov, Axis):
            continue
        d = t.prov.dim
        if t.ndim == 1:
            return [_lost(op, "contracts over the example axis (a vector operand)", [a, b])]
        if is_a and d == t.ndim - 1 or (not is_a and d == t.ndim - 2):
            return [_lost(op, "contracts over the example axis, mixing examples", [a, b])]
        if is_a and d == t.ndim - 2:
            od = nd - 2 if b.ndim > 1 else nd - 1
        elif not is_a and d == t.ndim - 1:
            od = nd - 1
        else:  # a leading (batch) dim of the matmul, aligned from the right
            od = d + nd - t.ndim
        cands.append(Axis(od, t.prov.outer, t.prov.inner))
    if op in ("baddbmm", "addmm", "addbmm", "addmv") and isinstance(bias, Tensor) and isinstance(bias.prov, Axis):
        cands.append(Axis(bias.prov.dim + nd - bias.ndim, bias.prov.outer, bias.prov.inner))
    if not cands:
        return [None]
    if any(c != cands[0] for c in cands):
        return [_lost(op, "multiplies tensors whose examples lie along different axes of the result", [a, b])]
    return [cands[0]]


def _linear(op, args, kwargs, outs):
    x = args[0] if args else kwargs.get("input")
    w = _arg(args, kwargs, 1, "weight")
    if isinstance(w, Tensor) and w.prov is not None:
        return [_lost(op, "the weight of a linear map depends on the batch", [x, w])]
    if not isinstance(x.prov, Axis):
        return [x.prov]
    if x.prov.dim == x.ndim - 1:
        return [_lost(op, "contracts over the example axis (the features axis holds the examples)", [x])]
    return [x.prov]


def _einsum(op, args, kwargs, outs):
    eq = args[0]
    operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    got = einsum_axis(eq, [t.shape if isinstance(t, Tensor) else () for t in operands],
                      [t.prov if isinstance(t, Tensor) else None for t in operands])
    return [got if not isinstance(got, str) else _lost(op, got, operands)]


def parse_einsum(eq: str, ndims: Sequence[int]) -> tuple[list[str], str]:
    """Operand subscripts and output subscripts of an einsum equation, with ``...`` expanded to letters."""
    eq = eq.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    spare = iter(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq)
    n_ell = max([nd - (len(t) - 3) for t, nd in zip(terms, ndims) if "..." in t] or [0])
    ell = "".join(next(spare) for _ in range(n_ell))
    out_terms = []
    for t, nd in zip(terms, ndims):
        if "..." in t:
            k = nd - (len(t) - 3)
            t = t.replace("...", ell[n_ell - k:])
        out_terms.append(t)
    if not arrow:
        counts: dict = {}
        for t in out_terms:
            for c in t:
                counts[c] = counts.get(c, 0) + 1
        rhs = ell + "".join(sorted(c for c, k in counts.items() if k == 1 and c not in ell))
    else:
        rhs = rhs.replace("...", ell)
    return out_terms, rhs


def einsum_axis(eq: str, shapes: Sequence[Sequence[int]], provs: Sequence[Prov]) -> Prov | str:
    terms, rhs = parse_einsum(eq, [len(s) for s in shapes])
    found = None
    for term, prov in zip(terms, provs):
        if not isinstance(prov, Axis):
            continue
        letter = term[prov.dim]
        if found is not None and (letter, prov.outer, prov.inner) != found:
            return "the operands' examples lie along different subscripts"
        found = (letter, prov.outer, prov.inner)
    if found is None:
        return None
    letter, outer, inner = found
    if letter not in rhs:
        return f"sums over the example subscript {letter!r}, mixing examples"
    return Axis(rhs.index(letter), outer, inner)


def _embedding(op, args, kwargs, outs):
    """``F.embedding(ids, W)`` / ``torch.embedding(W, ids)``: the output has the ids' axes first; the weight
    never carries the batch (a weight that did would be Lost already)."""
    ids = next(t for t in _tensors(args) + _tensors(kwargs) if t.prov is not None)
    return [ids.prov]


def _attention(op, args, kwargs, outs):
    q = args[0] if args else kwargs.get("query")
    k = _arg(args, kwargs, 1, "key")
    v = _arg(args, kwargs, 2, "value")
    ts = [t for t in (q, k, v, _arg(args, kwargs, 3, "attn_mask")) if isinstance(t, Tensor)]
    nd = len(outs[0])
    found = None
    for t in ts:
        if isinstance(t.prov, Axis):
            if t.prov.dim >= t.ndim - 2:
                return [_lost(op, "attends across the example axis (it is the sequence or feature axis), mixing "
                              "examples", ts)] * len(outs)
            cand = Axis(t.prov.dim + nd - t.ndim, t.prov.outer, t.prov.inner)
            if found is not None and cand != found:
                return [_lost(op, "query, key and value hold their examples along different axes", ts)] * len(outs)
            found = cand
    return [found] * len(outs)


def _mha(op, args, kwargs, outs):
    """``F.multi_head_attention_forward``: sequence-first ``[T, B, E]``; weights out ``[B, T, S]``."""
    q = args[0] if args else kwargs.get("query")
    k = _arg(args, kwargs, 1, "key")
    v = _arg(args, kwargs, 2, "value")
    ts = [t for t in (q, k, v) if isinstance(t, Tensor)]
    found = None
    for t in ts:
        if isinstance(t.prov, Axis):
            if t.ndim != 3 or t.prov.dim != 1 or t.prov.outer != 1 or t.prov.inner != 1:
                return [_lost(op, "the examples are not on axis 1 of its sequence-first [T, B, E] inputs, so the "
                              "attention would mix examples", ts)] * len(outs)
            found = t.prov
    return [found, None if found is None else Axis(0)][: len(outs)]


def _norm_trailing(shape_pos: int, shape_name: str):
    def rule(op, args, kwargs, outs):
        x = args[0] if args else kwargs.get("input")
        ns = _arg(args, kwargs, shape_pos, shape_name)
        n = 1 if isinstance(ns, int) else len(ns) if ns is not None else 1
        if x.prov.dim >= x.ndim - n:
            return [_lost(op, "normalises over the example axis", [x])] * len(outs)
        return [x.prov] * len(outs)

    return rule


def _per_sample_channels(op, args, kwargs, outs):
    """group_norm, instance_norm, conv: axis 0 is the sample axis."""
    x = args[0] if args else kwargs.get("input")
    if x.prov.dim != 0 or x.prov.outer != 1 or x.prov.inner != 1:
        return [_lost(op, "treats axis 0 as the sample axis, but the examples lie elsewhere", [x])] * len(outs)
    return [x.prov] * len(outs)


def _batch_norm(op, args, kwargs, outs):
    x = args[0] if args else kwargs.get("input")
    training = _arg(args, kwargs, 5, "training", False)
    if training:
        return [_lost(op, "batch norm in train mode normalises with statistics over the batch, mixing examples "
                      "(featurise in eval mode, or use LayerNorm)", [x])] * len(outs)
    if x.prov.dim == 1 and x.ndim > 1:
        return [_lost(op, "normalises per channel (axis 1), which holds the examples", [x])] * len(outs)
    return [x.prov] * len(outs)


def _loss_with_target(op, args, kwargs, outs):
    x = args[0] if args else kwargs.get("input")
    t = _arg(args, kwargs, 1, "target")
    red = kwargs.get("reduction", "mean")
    if red != "none":
        return [_lost(op, f"reduction={red!r} averages over the examples", [x])] * len(outs)
    if op in ("cross_entropy", "nll_loss"):
        # input [N, C, ...] or [C] with target [N, ...]: the class axis 1 is dropped.
        if isinstance(x.prov, Axis) and x.prov.dim == 1 and x.ndim > 1:
            return [_lost(op, "the class axis (1) holds the examples", [x])] * len(outs)
        cands = []
        if isinstance(x.prov, Axis):
            cands.append(Axis(x.prov.dim if x.prov.dim == 0 else x.prov.dim - 1, x.prov.outer, x.prov.inner))
        if isinstance(t, Tensor) and isinstance(t.prov, Axis) and t.ndim == len(outs[0]):
            cands.append(t.prov)
        if not cands:
            return [None]
        if any(c != cands[0] for c in cands):
            return [_lost(op, "the logits and the targets hold their examples along different axes", [x, t])]
        return [cands[0]]
    return _broadcast(op, args, kwargs, outs)


def _same_as_first(op, args, kwargs, outs):
    x = args[0] if args else kwargs.get("input")
    return [x.prov] * len(outs)


def _pad(op, args, kwargs, outs):
    x = args[0] if args else kwargs.get("input")
    pad = list(_arg(args, kwargs, 1, "pad"))
    n = len(pad) // 2
    d = x.prov.dim
    if d >= x.ndim - n:
        k = x.ndim - 1 - d
        if pad[2 * k] != 0 or pad[2 * k + 1] != 0:
            return [_lost(op, "pads the example axis", [x])]
    return [x.prov]


def _take_along(dim_pos: int, index_pos: int):
    def rule(op, args, kwargs, outs):
        x = args[0] if args else kwargs.get("input")
        dim = _arg(args, kwargs, dim_pos, "dim")
        idx = _arg(args, kwargs, index_pos, "index")
        ts = [t for t in (x, idx) if isinstance(t, Tensor)]
        found = None
        for t in ts:
            if isinstance(t.prov, Axis):
                if dim is not None and _norm_dim(dim, t.ndim) == t.prov.dim:
                    return [_lost(op, "gathers along the example axis", ts)]
                if found is not None and found != t.prov:
                    return [_lost(op, "input and index hold their examples along different axes", ts)]
                found = t.prov
        return [found]

    return rule


def _index_select(op, args, kwargs, outs):
    x = args[0] if args else kwargs.get("input")
    dim = _norm_dim(_arg(args, kwargs, 1, "dim"), x.ndim)
    if x.prov is None:
        return [_lost(op, "indexes with a tensor that carries the batch", [x])]
    if dim == x.prov.dim:
        return [_lost(op, "selects along the example axis", [x])]
    return [x.prov]


def _tri(op, args, kwargs, outs):
    x = args[0] if args else kwargs.get("input")
    if x.prov.dim >= x.ndim - 2:
        return [_lost(op, "masks the last two axes, which include the example axis", [x])]
    return [x.prov]


_ELEMENTWISE = """
add __add__ __radd__ __iadd__ add_ sub __sub__ __rsub__ __isub__ sub_ rsub subtract mul __mul__ __rmul__ __imul__
mul_ multiply div __truediv__ __rtruediv__ __itruediv__ div_ divide true_divide floor_divide __floordiv__
__rfloordiv__ remainder __mod__ fmod pow __pow__ __rpow__ pow_ float_power neg __neg__ negative abs __abs__ abs_
exp exp_ exp2 expm1 log log_ log2 log10 log1p sqrt sqrt_ rsqrt square reciprocal sign sgn sin cos tan tanh tanh_ sinh
cosh asin acos atan atan2 asinh acosh atanh erf erfc erfinv sigmoid sigmoid_ logit relu relu_ relu6 gelu silu mish
softplus elu selu celu leaky_relu leaky_relu_ hardtanh hardsigmoid hardswish logsigmoid tanhshrink softsign
threshold prelu rrelu clamp clamp_ clip clamp_min clamp_max maximum minimum fmax fmin where masked_fill masked_fill_
lerp addcmul addcdiv eq ne lt le gt ge __eq__ __ne__ __lt__ __le__ __gt__ __ge__ logical_and logical_or logical_not
logical_xor bitwise_and bitwise_or bitwise_not bitwise_xor __and__ __or__ __xor__ __invert__ __rand__ __ror__ isfinite
isnan isinf isneginf isposinf nan_to_num round floor ceil trunc frac to type type_as float double half bfloat16 int
long bool contiguous clone detach detach_ requires_grad_ cpu cuda conj real imag dropout dropout_ alpha_dropout
feature_alpha_dropout dropout1d dropout2d dropout3d zeros_like ones_like empty_like full_like rand_like randn_like
randint_like copy_ fill_ zero_ __getattr__ angle deg2rad rad2deg heaviside hypot logaddexp logaddexp2 xlogy sinc
square_ copysign nextafter positive __pos__ expand_as_ _conj _neg_view resolve_conj resolve_neg
""".split()

_RULES: dict[str, Callable] = {name: _broadcast for name in _ELEMENTWISE}
_RULES.update({
    "softmax": _along(1, "dim", what="normalises along"), "log_softmax": _along(1, "dim", what="normalises along"),
    "softmin": _along(1, "dim", what="normalises along"), "_softmax": _along(1, "dim", what="normalises along"),
    "cumsum": _along(1, "dim"), "cumprod": _along(1, "dim"), "logcumsumexp": _along(1, "dim"),
    "cummax": _along(1, "dim"), "cummin": _along(1, "dim"), "normalize": _along(2, "dim", default=1),
    "glu": _along(1, "dim", default=-1), "sort": _along(1, "dim", default=-1),
    "argsort": _along(1, "dim", default=-1), "topk": _along(2, "dim", default=-1), "flip": _along(1, "dims"),
    "roll": _along(2, "dims"), "diff": _along(2, "dim", default=-1), "renorm": _along(2, "dim"),
    "sum": _reduce, "mean": _reduce, "nansum": _reduce, "nanmean": _reduce, "prod": _reduce, "amax": _reduce,
    "amin": _reduce, "max": _reduce, "min": _reduce, "std": _reduce, "var": _reduce, "logsumexp": _reduce,
    "norm": _reduce, "all": _reduce, "any": _reduce, "argmax": _reduce, "argmin": _reduce,
    "count_nonzero": _reduce, "median": _reduce, "std_mean": _reduce, "var_mean": _reduce, "aminmax": _reduce,
    "t": _transpose, ".T": _transpose, ".mT": _transpose, ".mH": _transpose, ".H": _transpose,
    "adjoint": _transpose, "transpose": _transpose, "swapaxes": _transpose, "swapdims": _transpose,
    "transpose_": _transpose,
    "permute": _permute, "movedim": _movedim, "moveaxis": _movedim,
    "view": _reshape, "reshape": _reshape, "view_as": _reshape, "reshape_as": _reshape, "flatten": _reshape,
    "unflatten": _reshape, "ravel": _reshape, "_unsafe_view": _reshape,
    "expand": _expand, "expand_as": _expand, "broadcast_to": _expand,
    "repeat": _repeat, "tile": _repeat,
    "squeeze": _squeeze, "squeeze_": _squeeze, "unsqueeze": _unsqueeze, "unsqueeze_": _unsqueeze,
    "cat": _cat, "concat": _cat, "concatenate": _cat, "stack": _stack,
    "split": _split, "chunk": _split, "tensor_split": _split, "unbind": _split, "split_with_sizes": _split,
    "narrow": _narrow, "select": _select, "__getitem__": _getitem,
    "matmul": _matmul, "__matmul__": _matmul, "__rmatmul__": _matmul, "mm": _matmul, "bmm": _matmul,
    "baddbmm": _matmul, "addmm": _matmul, "mv": _matmul,
    "linear": _linear, "einsum": _einsum,
    "embedding": _embedding,
    "scaled_dot_product_attention": _attention, "multi_head_attention_forward": _mha,
    "layer_norm": _norm_trailing(1, "normalized_shape"), "rms_norm": _norm_trailing(1, "normalized_shape"),
    "group_norm": _per_sample_channels, "instance_norm": _per_sample_channels, "conv1d": _per_sample_channels,
    "conv2d": _per_sample_channels, "batch_norm": _batch_norm,
    "cross_entropy": _loss_with_target, "nll_loss": _loss_with_target, "mse_loss": _loss_with_target,
    "l1_loss": _loss_with_target, "smooth_l1_loss": _loss_with_target, "huber_loss": _loss_with_target,
    "binary_cross_entropy": _loss_with_target, "binary_cross_entropy_with_logits": _loss_with_target,
    "kl_div": _loss_with_target,
    "pad": _pad, "gather": _take_along(1, 2), "take_along_dim": _take_along(2, 1),
    "index_select": _index_select, "triu": _tri, "tril": _tri,
})


def known_ops() -> frozenset[str]:
    """The operation names whose effect on the example axis the tracker knows."""
    return frozenset(_RULES)


def propagate(op: str, args: tuple, kwargs: dict, out_shapes: Sequence[tuple[int, ...]]) -> list[Prov]:
    """The provenance of each output of ``op(*args, **kwargs)``.

    Args:
        op: the operation's name (``"transpose"``, ``"__getitem__"``, ``".mT"`` ...).
        args, kwargs: the arguments, each tensor replaced by a :class:`Tensor`.
        out_shapes: the shape of each tensor output, in order.

    Returns:
        one :data:`Prov` per output.  Outputs of an op none of whose inputs
        carries the batch are ``None``; an unknown op on batch data gives
        :class:`Lost` naming it.
    """
    if not out_shapes:
        return []
    ts = _tensors(args) + _tensors(kwargs)
    if not any(t.prov is not None for t in ts):
        return [None] * len(out_shapes)
    lost = _first_lost(ts)
    if lost is not None:
        return [lost] * len(out_shapes)
    rule = _RULES.get(op)
    if rule is None:
        return [_lost(op, "an operation whose effect on the example axis the capture does not know",
                      [t for t in ts if t.prov is not None])] * len(out_shapes)
    try:
        got = rule(op, args, kwargs, out_shapes)
    except (TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError) as exc:
        return [_lost(op, f"its arguments could not be read ({type(exc).__name__}: {exc})", ts)] * len(out_shapes)
    if len(got) < len(out_shapes):
        got = list(got) + [got[-1]] * (len(out_shapes) - len(got))
    return list(got)
