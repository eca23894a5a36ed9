"""Views of selected parameters: which tensors are a parameter (or a slice, transpose, broadcast or scalar
multiple of one), followed through the view operations the capture understands.

A use of a view is attributed to the stored parameter: a row slice to its rows, a transpose with the
factors swapped, a scalar multiple with the gradient scaled.  Any other derivation marks the view ``bad``
(an error is raised only if it is used with gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .capture import BatchCapture

__all__ = ["View", "view_op", "slice_change"]

@dataclass(eq=False)
class View:
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


def view_op(st: "BatchCapture", func, args, kwargs, opname):
    v = st.view_of(args[0]) if args else None
    if v is None:  # the parameter is an argument, not the tensor being viewed (e.g. index_select on ids)
        raise st.unsupported(st.find_views(args, kwargs)[0], opname)
    out = func(*args, **kwargs)
    if opname == "index_select":
        return st.embedding_like(v, out, args, kwargs, opname)
    if opname == "__getitem__":
        idx = args[1]
        if isinstance(idx, torch.Tensor) and not torch.is_floating_point(idx) and idx.dtype != torch.bool:
            return st.gather(v, out, idx, opname)
    if not isinstance(out, torch.Tensor):
        if isinstance(out, (tuple, list)):  # split / chunk / tensor_split
            return type(out)(split_part(st, v, t, opname, args, kwargs, out) for t in out)
        return out
    change = view_change(st, v, out, opname, args, kwargs)
    return st.derive(v, out, **change)

def split_part(st, v, t, opname, args, kwargs, parts):
    dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
    if v.lead or v.transposed or dim not in (0, -len(v.base)) or not isinstance(t, torch.Tensor):
        return st.derive(v, t, bad=f"{opname} along a dimension other than the stored rows")
    start = 0
    for p in parts:
        if p is t:
            break
        start += p.shape[0]
    r0 = (v.rows[0] if v.rows else 0) + start
    return st.derive(v, t, rows=(r0, r0 + t.shape[0]))

def view_change(st, v: View, out: torch.Tensor, opname: str, args, kwargs) -> dict:
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
        return slice_change(st, v, out, opname, args)
    if opname in ("view", "reshape", "view_as", "reshape_as", "unsqueeze", "expand", "expand_as"):
        shape = tuple(out.shape)
        n = len(shape) - len(base)
        if n >= 0 and shape[n:] == base and (opname in ("expand", "expand_as") or all(s == 1 for s in shape[:n])):
            return {"lead": n}
        return {"bad": f"{opname} to shape {shape} reshapes the parameter"}
    return {"bad": opname}

def slice_change(st, v: View, out, opname, args) -> dict:
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
