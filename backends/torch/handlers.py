"""Op handlers: how each understood use of a selected parameter becomes factor records.

Each handler is ``handler(st, func, args, kwargs, opname) -> output``: it computes the call's output
natively and records the use through the capture's small public interface (:class:`BatchCapture`
``view_of``, ``find_views``, ``record``, ``linear_use``, ``bias_record``, ``finish``, ``dense_use``,
``call_prov``, ``prov``, ``mark``, ``fail``, ``unsupported``, ``tracking``).  :class:`DenseCall` is the
exact fallback: the per-example gradient of one call by ``torch.func``.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_unflatten

from . import example_axis as ex
from .views import slice_change

if TYPE_CHECKING:
    from .capture import BatchCapture


__all__ = ["HANDLERS", "HANDLERS_BY_NAME", "DenseCall"]

_MHA_SIG = inspect.signature(F.multi_head_attention_forward)


class Recompute:
    """An activation recomputed from ``source`` when the gradient arrives (a norm's ``xhat``)."""

    __slots__ = ("source", "fn")

    def __init__(self, source: torch.Tensor, fn):
        self.source = source
        self.fn = fn

    def __call__(self):
        with torch.no_grad():
            return self.fn(self.source.detach())


class DenseCall:
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


def _h_linear(st: BatchCapture, func, args, kwargs, opname):
    bound = _bind(("input", "weight", "bias"), args, kwargs)
    return st.linear_use(bound["input"], bound["weight"], bound.get("bias"), opname,
                          out=func(*args, **kwargs))


def _h_matmul(st: BatchCapture, func, args, kwargs, opname):
    if opname == "__rmatmul__":
        a, b = args[1], args[0]
    else:
        a = args[0] if args else kwargs.get("input")
        b = args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2"))
    va, vb = st.view_of(a), st.view_of(b)
    out = func(*args, **kwargs)
    if vb is not None and va is None:
        if b.ndim != 2 or a.ndim < 1:
            raise st.fail(vb, opname, f"expected x @ W with a 2-D weight, got shapes {tuple(a.shape)} @ {tuple(b.shape)}.")
        # x @ V == F.linear(x, V^T)
        return st.linear_use(a, b, None, opname, out=out, transposed_extra=True)
    if va is not None and vb is None:
        if a.ndim != 2 or b.ndim < 2:
            raise st.fail(va, opname, f"expected W @ x with a 2-D weight and a batched x, got shapes "
                           f"{tuple(a.shape)} @ {tuple(b.shape)}.")
        # V @ x == (x^T @ V^T)^T == F.linear(x^T, V)^T: record in the transposed layout
        recs = [st.record(va, "linear", opname, act=b, swap=va.transposed, rows=va.rows, coef=va.coef,
                           stored=va.stored)]
        if va.lead:
            raise st.fail(va, opname, "a broadcast view of a weight is not supported in matmul.")
        return st.finish(out, recs, [b], opname, st.call_prov(opname, args, kwargs, [out])[0], layout="mT")
    raise st.fail(va, opname, "a product of two parameter tensors is not supported.")


def _h_addmm(st: BatchCapture, func, args, kwargs, opname):
    bound = _bind(("input", "mat1", "mat2"), args, kwargs)
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
        v = st.find_views(args, kwargs)[0]
        raise st.fail(v, opname, "addmm with beta or alpha other than 1 is not supported.")
    x, w, b = bound["mat1"], bound["mat2"], bound["input"]
    if st.view_of(x) is not None:
        raise st.fail(st.view_of(x), opname, "a parameter as the left operand of addmm is not supported.")
    return st.linear_use(x, w, b, opname, out=func(*args, **kwargs), transposed_extra=True)


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
    v = st.view_of(bound["weight"])
    if v is None or st.view_of(bound["input"]) is not None:
        raise st.unsupported(st.find_views(args, kwargs)[0], opname)
    if bound.get("scale_grad_by_freq"):
        raise st.fail(v, opname, "scale_grad_by_freq=True scales gradients by batch-wide token counts, which mixes "
                       "examples; use scale_grad_by_freq=False.")
    if not v.plain or len(v.stored) != 2:
        raise st.fail(v, opname, "embedding lookups need the plain 2-D weight.")
    out = func(*args, **kwargs)
    rec = st.record(v, "embedding", opname, act=bound["input"], coef=v.coef, ignore_index=pad, stored=v.stored)
    return st.finish(out, [rec], [bound["input"]], opname, st.prov(bound["input"]))


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
    if st.view_of(x) is not None:
        raise st.fail(st.view_of(x), opname, "normalising a parameter tensor is not supported.")
    out = func(*args, **kwargs)
    recs = []
    wv, bv = st.view_of(bound.get("weight")), st.view_of(bound.get("bias"))
    if wv is not None:
        if wv.lead or wv.transposed:
            raise st.fail(wv, opname, "the norm's weight must be the parameter or a row slice of it.")

        xhat = Recompute(x, xhat_fn)

        kind = "scale" if len(wv.base) == 1 else "dense-mul"
        recs.append(st.record(wv, kind, opname, act=xhat, rows=wv.rows, coef=wv.coef, base=wv.base,
                               stored=wv.stored))
    if bv is not None:
        if bv.lead or bv.transposed:
            raise st.fail(bv, opname, "the norm's bias must be the parameter or a row slice of it.")
        recs.append(st.bias_record(bv, opname))
    return st.finish(out, recs, [x], opname, st.call_prov(opname, args, kwargs, [out])[0])


def _h_mha(st: BatchCapture, func, args, kwargs, opname):
    ba = _MHA_SIG.bind(*args, **kwargs)
    ba.apply_defaults()
    A = dict(ba.arguments)
    for k in ("query", "key", "value", "attn_mask", "key_padding_mask", "static_k", "static_v", "bias_k", "bias_v"):
        v = st.view_of(A.get(k))
        if v is not None:
            raise st.fail(v, "multi_head_attention_forward", f"a selected parameter as its {k!r} is not supported "
                           "(add_bias_kv=True biases and parameters used as inputs are not captured); leave it out "
                           "of the selection.")
    q_in, k_in, v_in = A["query"], A["key"], A["value"]
    if q_in.dim() != 3:
        raise st.fail(st.find_views(args, kwargs)[0], "multi_head_attention_forward",
                       "unbatched (2-D) inputs have no batch axis; call nn.MultiheadAttention with batched inputs.")
    E = A["embed_dim_to_check"]
    if A["use_separate_proj_weight"]:
        ws = (A["q_proj_weight"], A["k_proj_weight"], A["v_proj_weight"])
    else:
        ws = tuple(_row_part(st, A["in_proj_weight"], i * E, (i + 1) * E) for i in range(3))
    b = A["in_proj_bias"]
    bs = (None, None, None) if b is None else tuple(_row_part(st, b, i * E, (i + 1) * E) for i in range(3))
    q = st.linear_use(q_in, ws[0], bs[0], "multi_head_attention_forward(q)")
    k = st.linear_use(k_in, ws[1], bs[1], "multi_head_attention_forward(k)")
    v = st.linear_use(v_in, ws[2], bs[2], "multi_head_attention_forward(v)")
    eye = torch.eye(E, dtype=q.dtype, device=q.device)  # x @ I^T is exact: the projections are done above
    A.update(query=q, key=k, value=v, in_proj_weight=None, in_proj_bias=None, out_proj_weight=eye,
             out_proj_bias=None, use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye,
             v_proj_weight=eye)
    attn, weights = func(**A)
    if st.tracking:
        for t, p in zip((attn, weights), st.call_prov("multi_head_attention_forward", (q, k, v), {},
                                                       [attn] + ([weights] if weights is not None else []))):
            st.mark(t, p)
    out = st.linear_use(attn, ba.arguments["out_proj_weight"], ba.arguments["out_proj_bias"],
                         "multi_head_attention_forward(out_proj)")
    return out, weights


def _row_part(st: BatchCapture, t, r0: int, r1: int):
    if t is None:
        return None
    part = t[r0:r1]
    v = st.view_of(t)
    if v is not None:
        change = slice_change(st, v, part, "__getitem__", (t, slice(r0, r1)))
        st.derive(v, part, **change)
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
    views = st.find_views(args, kwargs)
    if eq is None or kwargs or len(ops) != 2 or len(views) != 1:
        return st.dense_use(func, args, kwargs, views, opname)
    wi = 0 if st.view_of(ops[0]) is not None else 1
    w, x = ops[wi], ops[1 - wi]
    wv = st.view_of(w)
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
    st.mark(xp, st.call_prov("permute", (x, [xt.index(ch) for ch in keep] + [xt.index(c)]), {}, [xp])[0])
    if wt.index(f) == 0:
        y = st.linear_use(xp, w, None, opname)
    else:
        y = st.linear_use(xp, w, None, opname, out=F.linear(xp, w.T), transposed_extra=True)
    order = keep + [f]
    perm = [order.index(ch) for ch in rhs]
    out = y.permute(perm)
    if st.tracking:
        st.mark(out, st.call_prov("permute", (y, perm), {}, [out])[0])
    return out


HANDLERS: dict = {}  # torch function -> handler
HANDLERS_BY_NAME: dict = {}  # name -> handler (methods reached by name)


def _register() -> None:
    def put(obj, handler):
        if obj is not None:
            HANDLERS[obj] = handler

    put(F.linear, _h_linear)
    put(getattr(torch._C._nn, "linear", None), _h_linear)
    for name in ("matmul", "mm", "__matmul__", "__rmatmul__"):
        put(getattr(torch, name, None), _h_matmul)
        put(getattr(torch.Tensor, name, None), _h_matmul)
        HANDLERS_BY_NAME[name] = _h_matmul
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
