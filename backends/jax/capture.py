"""Capture per-use gradient factors from a pure JAX loss by transforming its jaxpr.

The user's ``loss_fn(params, batch) -> [B]`` is never rewritten by hand.  It is
traced, for a single example (a batch of one), to a jaxpr; every use of a
selected parameter leaf is located there, following the leaf through views
(transpose, reshape, broadcast, dtype casts, slices) and into ``jit``,
``closed_call``, ``remat`` and ``lax.scan`` bodies.  Each use becomes a *site*:

=============  ==========================================  ===================================
site kind      where the zero perturbation is added        auxiliary output ("activation")
=============  ==========================================  ===================================
``linear``     output of the ``dot_general``               the other operand, ``[N, d_in]``
``embedding``  output of the row ``gather``                the ids, ``[N]``
``scale``      output of ``x * broadcast(w)``              ``x``, ``[N, d]``
``bias``       output of ``x + broadcast(b)``              none
``dense``      the leaf itself, at the use (exact fallback)  none
=============  ==========================================  ===================================

Evaluating the jaxpr with the perturbations added and differentiating the
example's loss with respect to them gives the grad-outputs; ``jax.vmap`` over
the examples makes the rows independent by construction (every example runs in
its own batch of one).  Sites inside a ``lax.scan`` body get one perturbation
per iteration (stacked), so the loop step of a use is its iteration index.

Orientation: a linear use's canonical shape is ``(d_out, d_in)`` read off the
``dot_general`` dimension numbers (the weight's free axis is ``d_out``), so a
kernel stored ``(d_in, d_out)`` and used as ``x @ W`` has canonical shape
``W.T.shape``, as in PyTorch.  Embedding rows stay ``(num, dim)``.

Everything in :class:`CapturePlan` is static bookkeeping computed once per
parameter and batch shape; :func:`run_capture` is the pure, jittable part.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from sdi_core.coverage import Coverage
from sdi_core.factors import ParamInfo, SDIError

__all__ = [
    "loop_step",
    "Site",
    "CapturePlan",
    "build_plan",
    "run_capture",
    "site_arrays",
    "leaf_names",
    "select_leaves",
]

# --------------------------------------------------------------------------- marker

_MARK = "sdi_loop_step_"
_MARK_RE = re.compile(r"sdi_loop_step_(\d+)")
_mark_counter = [0]


def loop_step(fn: Callable) -> Callable:
    """Mark ``fn`` as one loop step of a Python-unrolled loop.

    Every call of the returned function is a separate step (in call order);
    the mark is a :func:`jax.named_scope`, so it costs nothing at run time and
    survives ``jax.jit``.  Use it when the loop body is called from a Python
    ``for`` loop; a ``lax.scan`` / ``fori_loop`` needs no mark (its iterations
    are the steps)::

        @sdi_jax.loop_step
        def body(block_params, h):
            ...

        for s in range(tau):
            h = body(params["block"], h)
    """

    def marked(*args, **kwargs):
        _mark_counter[0] += 1
        with jax.named_scope(f"{_MARK}{_mark_counter[0]}"):
            return fn(*args, **kwargs)

    try:
        marked.__name__ = getattr(fn, "__name__", "loop_step")
        marked.__qualname__ = getattr(fn, "__qualname__", marked.__name__)
        marked.__doc__ = getattr(fn, "__doc__", None)
        marked.__wrapped__ = fn
    except (AttributeError, TypeError):  # functools.partial and friends
        pass
    return marked


# ------------------------------------------------------------------ leaf selection


class _Marker:
    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"<leaf {self.index}>"


def leaf_names(params) -> list[str]:
    """Dotted pytree path of every leaf of ``params`` (flatten order): ``block.mlp.fc1.weight``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return [jax.tree_util.keystr(path, simple=True, separator=".") or "<root>" for path, _ in flat]


def select_leaves(params, selector: Callable, what: str) -> list[int]:
    """Indices (flatten order of ``params``) of the leaves that ``selector(params)`` returns.

    ``selector`` must return a sub-pytree (a subtree, a list or dict of
    leaves, a single leaf) of ``params``; it is called on a copy of the tree
    whose leaves are placeholders, so it may not compute with them.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    markers = treedef.unflatten([_Marker(i) for i in range(len(leaves))])
    try:
        picked = selector(markers)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise SDIError(
            f"The {what} selector raised {type(exc).__name__}: {exc}. It must return a sub-pytree of params "
            f"without computing with the arrays, e.g. `lambda params: params['block']`."
        ) from None
    out_leaves = jax.tree_util.tree_leaves(picked, is_leaf=lambda x: isinstance(x, _Marker))
    bad = [type(x).__name__ for x in out_leaves if not isinstance(x, _Marker)]
    if bad:
        raise SDIError(
            f"The {what} selector returned {len(bad)} value(s) that are not leaves of params ({bad[:3]}). "
            "Return a sub-pytree of params itself, e.g. `lambda params: params['block']`, not arrays computed "
            "from it."
        )
    if not out_leaves:
        raise SDIError(f"The {what} selector selected no leaves of params; it must return a non-empty sub-pytree.")
    idx = [m.index for m in out_leaves]
    if len(set(idx)) != len(idx):
        raise SDIError(f"The {what} selector returned the same leaf more than once; return each leaf once.")
    return idx


# ------------------------------------------------------------------------ analysis

# Ops that only re-index, broadcast or cast a value: a selected leaf seen through
# them is still "the leaf" (they are linear, so a perturbation maps through them).
_VIEW_PRIMS = {"transpose", "convert_element_type", "copy", "copy_p", "reshape", "squeeze", "broadcast_in_dim",
               "slice"}
_CALL_PRIMS = {"jit", "pjit", "closed_call", "core_call", "remat", "remat2", "checkpoint", "named_call"}


@dataclass(frozen=True)
class _Track:
    """A value that is a view of selected leaf ``leaf``: ``ops`` applied to it, in order."""

    leaf: int
    ops: tuple = ()


# ------------------------------------------------------------ prep records: raw arrays -> factors, per kind


@dataclass(frozen=True)
class LinearPrep:
    """A ``dot_general`` with the leaf as operand ``tracked``: how to lay out its factors.

    ``x_perm`` / ``x_shape`` put the other operand as ``[N, d_in]`` (``[N, d_out]`` when ``swap``: the leaf
    is used transposed), ``g_perm`` / ``g_shape`` the output's gradient as ``[..., N, d]``.
    """

    swap: bool
    tracked: int
    x_perm: tuple
    x_shape: tuple
    g_perm: tuple
    g_shape: tuple

    def activation(self, invals):
        x = invals[1 - self.tracked]
        return jnp.reshape(jnp.transpose(x, self.x_perm), self.x_shape)

    def grad(self, g, lead: int):
        perm = tuple(range(lead)) + tuple(lead + p for p in self.g_perm)
        return jnp.reshape(jnp.transpose(g, perm), g.shape[:lead] + self.g_shape)


@dataclass(frozen=True)
class EmbeddingPrep:
    """A ``gather`` of rows of a ``[num, dim]`` leaf by ``n_tok`` ids (``clip``: out-of-range ids clipped)."""

    n_tok: int
    dim: int
    num: int
    clip: bool

    def activation(self, invals):
        ids = jnp.reshape(invals[1][..., 0], (self.n_tok,))
        return jnp.clip(ids, 0, self.num - 1) if self.clip else ids

    def grad(self, g, lead: int):
        return jnp.reshape(g, g.shape[:lead] + (self.n_tok, self.dim))


@dataclass(frozen=True)
class ElementwisePrep:
    """``mul`` (``scale``) or ``add`` (``bias``) with a 1-D leaf broadcast along output axis ``pos``."""

    pos: int
    n_tok: int
    d: int
    other: int
    out_shape: tuple
    scale: bool

    def activation(self, invals):
        if not self.scale:
            return None
        x = jnp.broadcast_to(invals[self.other], self.out_shape)
        return jnp.reshape(jnp.moveaxis(x, self.pos, -1), (self.n_tok, self.d))

    def grad(self, g, lead: int):
        g = jnp.moveaxis(g, lead + self.pos, -1)
        return jnp.reshape(g, g.shape[:lead] + (self.n_tok, self.d))


@dataclass(frozen=True)
class DensePrep:
    """The exact per-example gradient of the leaf (``why``: the reason no factor form applied)."""

    why: str

    def activation(self, invals):
        return None

    def grad(self, g, lead: int):
        raise AssertionError("dense sites are laid out canonically, not as factors")


@dataclass
class Site:
    """One use of one selected leaf (static description).

    Attributes:
        id: index into :attr:`CapturePlan.sites`.
        leaf: flatten index of the leaf in ``params``.
        kind: ``linear``, ``embedding``, ``scale``, ``bias`` or ``dense``.
        primitive: the jaxpr primitive of the use (for messages).
        frames: enclosing step frames, outermost first: ``("scan", key, length,
            reverse)`` or ``("marker", key)``.
        order: forward order of the use in the traced program.
        pert_shape, pert_dtype: the perturbation of one iteration (the use's
            output for factor kinds, the leaf for ``dense``).
        operand: for ``dense``, the operand position the perturbation enters.
        ops: for ``dense``, the view ops from the leaf to that operand.
        prep: the kind's typed record (:class:`LinearPrep`, :class:`EmbeddingPrep`, :class:`ElementwisePrep`,
            :class:`DensePrep`) turning the raw arrays into factors.
        step, step_axis: filled by step resolution (see :class:`CapturePlan`).
    """

    id: int
    leaf: int
    kind: str
    primitive: str
    frames: tuple
    order: int
    pert_shape: tuple
    pert_dtype: Any
    operand: int | None = None
    ops: tuple = ()
    prep: "LinearPrep | EmbeddingPrep | ElementwisePrep | DensePrep | None" = None
    step: int = 0
    step_axis: bool = False
    step_offset: int = 0
    scan_order: int = -1

    @property
    def stack(self) -> tuple[int, ...]:
        """Lengths of the enclosing scans (outermost first): leading axes of this site's arrays."""
        return tuple(f[2] for f in self.frames if f[0] == "scan")


@dataclass
class _Action:
    dense: list = field(default_factory=list)  # site ids whose perturbation enters an operand
    out_site: int | None = None  # site id whose perturbation is added to outvars[0]
    child: "_Scope | None" = None  # call / scan body plan
    scan_sites: tuple = ()  # all site ids inside a scan body (stacked per iteration)


@dataclass
class _Scope:
    actions: dict = field(default_factory=dict)  # eqn index -> _Action

    def empty(self) -> bool:
        return not self.actions


@dataclass(frozen=True)
class _Ctx:
    path: tuple = ()
    frames: tuple = ()
    marker: Any = None


def _is_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.inexact)


def _sub_jaxpr(eqn):
    """``(jaxpr, consts)`` of a call-like equation."""
    p = eqn.params
    sub = p.get("jaxpr", p.get("call_jaxpr"))
    if sub is None:
        return None, None
    if hasattr(sub, "consts"):
        return sub.jaxpr, list(sub.consts)
    return sub, []


def _axis_map(leaf_shape: tuple, ops: tuple) -> list | None:
    """For each axis of ``ops(leaf)``, the leaf axis it indexes (None: broadcast); None when not a pure re-indexing."""
    amap: list = list(range(len(leaf_shape)))
    shape = list(leaf_shape)
    for op, params in ops:
        prim = getattr(op, "name", op)
        if prim in ("convert_element_type", "copy", "copy_p"):
            continue
        if prim == "transpose":
            perm = params["permutation"]
            amap = [amap[i] for i in perm]
            shape = [shape[i] for i in perm]
        elif prim == "broadcast_in_dim":
            new_shape = list(params["shape"])
            new = [None] * len(new_shape)
            for i, d in enumerate(params["broadcast_dimensions"]):
                if shape[i] != new_shape[d]:
                    if amap[i] is not None:
                        return None  # a size-1 leaf axis broadcast: not a plain re-indexing
                    continue
                new[d] = amap[i]
            amap, shape = new, new_shape
        elif prim == "squeeze":
            drop = set(d % len(shape) for d in params["dimensions"])
            amap = [a for i, a in enumerate(amap) if i not in drop]
            shape = [s for i, s in enumerate(shape) if i not in drop]
        elif prim == "reshape":
            if params.get("dimensions") not in (None, ()):
                return None
            new_shape = list(params["new_sizes"])
            old_big = [(s, a) for s, a in zip(shape, amap) if s != 1]
            new_big = [i for i, s in enumerate(new_shape) if s != 1]
            if [s for s, _ in old_big] != [new_shape[i] for i in new_big]:
                return None
            new = [None] * len(new_shape)
            for (s, a), i in zip(old_big, new_big):
                new[i] = a
            amap, shape = new, new_shape
        elif prim == "slice":
            strides = params.get("strides")
            full = all(st == 0 and lim == s for st, lim, s in zip(params["start_indices"], params["limit_indices"], shape))
            if not full or (strides is not None and any(x != 1 for x in strides)):
                return None
        else:
            return None
    return amap


class _Walker:
    def __init__(self, leaf_avals: Sequence, fallback: str, names: Sequence[str]):
        self.leaf_avals = leaf_avals
        self.fallback = fallback
        self.names = names
        self.sites: list[Site] = []
        self.canon: dict[int, tuple] = {}
        self.markers: list = []
        self.scans: dict = {}  # key -> (order, length, reverse)
        self.counter = 0

    # --------------------------------------------------------------- helpers
    def _tick(self) -> int:
        self.counter += 1
        return self.counter

    def _new_site(self, leaf, kind, eqn, ctx, pert_shape, pert_dtype, **kw) -> Site:
        site = Site(len(self.sites), leaf, kind, eqn.primitive.name, ctx.frames, self._tick(),
                    tuple(pert_shape), pert_dtype, **kw)
        self.sites.append(site)
        return site

    def _dense(self, eqn, k: int, track: _Track, ctx, action: _Action, why: str) -> None:
        if self.fallback == "error":
            raise SDIError(
                f"Leaf {self.names[track.leaf]!r} is used by primitive {eqn.primitive.name!r} in a way sdi_jax "
                f"does not factor ({why}). Pass fallback='dense' to take its exact per-example gradient instead, "
                "or select only parameters used as linear/embedding/scale/bias."
            )
        aval = self.leaf_avals[track.leaf]
        site = self._new_site(track.leaf, "dense", eqn, ctx, aval.shape, aval.dtype, operand=k, ops=track.ops)
        site.prep = DensePrep(why)
        action.dense.append(site.id)

    def _canon(self, leaf: int, want: tuple) -> tuple:
        """The leaf's canonical axis order, decided by its first linear/embedding use."""
        if leaf not in self.canon:
            self.canon[leaf] = want
        return self.canon[leaf]

    # ------------------------------------------------------------------ walk
    def walk(self, jaxpr, tracked: dict, ctx: _Ctx) -> tuple[_Scope, list]:
        scope = _Scope()
        tracked = dict(tracked)
        for i, eqn in enumerate(jaxpr.eqns):
            ectx = ctx
            if ctx.marker is None:
                m = _MARK_RE.search(str(eqn.source_info.name_stack))
                if m is not None:
                    key = (ctx.path, int(m.group(1)))
                    ectx = _Ctx(ctx.path, ctx.frames + (("marker", key),), key)
                    if not ctx.frames and key not in self.markers:
                        self.markers.append(key)
            uses = [(k, tracked[v]) for k, v in enumerate(eqn.invars)
                    if isinstance(v, jcore.Var) and v in tracked]
            if not uses:
                continue
            action = _Action()
            outs = self._eqn(eqn, i, uses, ectx, action)
            for v, t in zip(eqn.outvars, outs):
                if t is not None and not isinstance(v, jcore.DropVar):
                    tracked[v] = t
            if action.dense or action.out_site is not None or action.child is not None:
                scope.actions[i] = action
        out_tracks = [tracked.get(v) if isinstance(v, jcore.Var) else None for v in jaxpr.outvars]
        return scope, out_tracks

    def _eqn(self, eqn, i: int, uses, ctx: _Ctx, action: _Action) -> list:
        prim = eqn.primitive.name
        n_out = len(eqn.outvars)
        none = [None] * n_out
        if prim in _VIEW_PRIMS and len(uses) == 1 and uses[0][0] == 0 and len(eqn.invars) == 1:
            k, track = uses[0]
            if prim != "convert_element_type" or _is_float(eqn.params["new_dtype"]):
                return [_Track(track.leaf, track.ops + ((eqn.primitive, dict(eqn.params)),))]
        if prim == "dot_general" and len(uses) == 1 and self._linear(eqn, uses[0], ctx, action):
            return none
        if prim == "gather" and len(uses) == 1 and uses[0][0] == 0 and self._embedding(eqn, uses[0], ctx, action):
            return none
        if prim in ("mul", "add") and len(uses) == 1 and len(eqn.invars) == 2 and \
                self._scale_bias(eqn, uses[0], ctx, action):
            return none
        if prim in _CALL_PRIMS:
            sub, _ = _sub_jaxpr(eqn)
            if sub is not None and len(sub.invars) == len(eqn.invars):
                inner = {sub.invars[k]: t for k, t in uses}
                child, outs = self.walk(sub, inner, _Ctx(ctx.path + (i,), ctx.frames, ctx.marker))
                if not child.empty():
                    action.child = child
                return outs
        if prim == "scan":
            return self._scan(eqn, i, uses, ctx, action)
        if prim == "while":
            k, track = uses[0]
            raise SDIError(
                f"Leaf {self.names[track.leaf]!r} is used inside a lax.while_loop (primitive 'while'), which "
                "reverse-mode autodiff cannot differentiate. Use lax.scan, or lax.fori_loop with Python-int bounds "
                "(it lowers to a scan)."
            )
        why = {
            "dot_general": "a dot_general whose weight operand has batch dimensions, or whose axes do not split "
                           "into one output and the input axes of the canonical (d_out, d_in) shape",
            "gather": "a gather that is not a row lookup W[ids]",
        }.get(prim, f"primitive {prim!r}")
        for k, track in uses:
            self._dense(eqn, k, track, ctx, action, why)
        return none

    # ------------------------------------------------------------ factor kinds
    def _linear(self, eqn, use, ctx: _Ctx, action: _Action) -> bool:
        k, track = use
        if k not in (0, 1):
            return False
        leaf_shape = tuple(self.leaf_avals[track.leaf].shape)
        if len(leaf_shape) < 2:
            return False
        amap = _axis_map(leaf_shape, track.ops)
        if amap is None or None in amap or sorted(amap) != list(range(len(leaf_shape))):
            return False
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        if lb or rb:
            return False
        c_op, c_x = (list(lc), list(rc)) if k == 0 else (list(rc), list(lc))
        op_nd = len(amap)
        x_nd = len(eqn.invars[1 - k].aval.shape)
        f_op = [d for d in range(op_nd) if d not in c_op]
        f_x = [d for d in range(x_nd) if d not in c_x]
        lf = [amap[d] for d in f_op]
        lcs = [amap[d] for d in c_op]
        if len(leaf_shape) == 2:
            want = (0, 1) if lf == [0] else (1, 0)
        else:
            want = tuple(range(len(leaf_shape)))
        canon = self.canon.get(track.leaf, want)
        rows, cols = canon[0], list(canon[1:])
        # positions of the free axes in the dot_general output: lhs free, then rhs free
        if k == 0:
            op_pos = list(range(len(f_op)))
            x_pos = list(range(len(f_op), len(f_op) + len(f_x)))
        else:
            x_pos = list(range(len(f_x)))
            op_pos = list(range(len(f_x), len(f_x) + len(f_op)))
        x_shape = eqn.invars[1 - k].aval.shape
        n_tok = int(math.prod(x_shape[d] for d in f_x))
        out_shape = eqn.outvars[0].aval.shape
        if lf == [rows] and sorted(lcs) == sorted(cols):
            # normal: grad-output along the rows (d_out), activation along the columns (d_in)
            x_c = [c_x[lcs.index(a)] for a in cols]
            prep = LinearPrep(swap=False, tracked=k, x_perm=tuple(f_x + x_c),
                              x_shape=(n_tok, int(math.prod(x_shape[d] for d in x_c))),
                              g_perm=tuple(x_pos + op_pos), g_shape=(n_tok, leaf_shape[rows]))
        elif lcs == [rows] and sorted(lf) == sorted(cols):
            # transposed use: the activation runs along the rows, the grad-output along the columns
            g_c = [op_pos[lf.index(a)] for a in cols]
            prep = LinearPrep(swap=True, tracked=k, x_perm=tuple(f_x + c_x), x_shape=(n_tok, leaf_shape[rows]),
                              g_perm=tuple(x_pos + g_c), g_shape=(n_tok, int(math.prod(out_shape[p] for p in g_c))))
        else:
            return False
        self._canon(track.leaf, canon)
        site = self._new_site(track.leaf, "linear", eqn, ctx, out_shape, eqn.outvars[0].aval.dtype)
        site.prep = prep
        action.out_site = site.id
        return True

    def _embedding(self, eqn, use, ctx: _Ctx, action: _Action) -> bool:
        k, track = use
        leaf_shape = tuple(self.leaf_avals[track.leaf].shape)
        if len(leaf_shape) != 2 or _axis_map(leaf_shape, track.ops) != [0, 1]:
            return False
        dn = eqn.params["dimension_numbers"]
        idx_shape = eqn.invars[1].aval.shape
        out_shape = eqn.outvars[0].aval.shape
        ok = (
            tuple(dn.collapsed_slice_dims) == (0,)
            and tuple(dn.start_index_map) == (0,)
            and tuple(dn.offset_dims) == (len(out_shape) - 1,)
            and not tuple(getattr(dn, "operand_batching_dims", ()))
            and tuple(eqn.params["slice_sizes"]) == (1, leaf_shape[1])
            and len(idx_shape) >= 1 and idx_shape[-1] == 1
            and tuple(out_shape) == tuple(idx_shape[:-1]) + (leaf_shape[1],)
        )
        if not ok:
            return False
        if self._canon(track.leaf, (0, 1)) != (0, 1):
            return False
        n_tok = int(math.prod(idx_shape[:-1]))
        mode = str(eqn.params.get("mode", ""))
        site = self._new_site(track.leaf, "embedding", eqn, ctx, out_shape, eqn.outvars[0].aval.dtype)
        site.prep = EmbeddingPrep(n_tok=n_tok, dim=leaf_shape[1], num=leaf_shape[0], clip="CLIP" in mode.upper())
        action.out_site = site.id
        return True

    def _scale_bias(self, eqn, use, ctx: _Ctx, action: _Action) -> bool:
        k, track = use
        leaf_shape = tuple(self.leaf_avals[track.leaf].shape)
        if len(leaf_shape) != 1:
            return False
        amap = _axis_map(leaf_shape, track.ops)
        if amap is None or amap.count(0) != 1:
            return False
        pos = amap.index(0)
        op_shape = eqn.invars[k].aval.shape
        out_shape = eqn.outvars[0].aval.shape
        if len(op_shape) != len(out_shape) or out_shape[pos] != leaf_shape[0]:
            return False
        d = leaf_shape[0]
        n_tok = int(math.prod(out_shape)) // d
        kind = "scale" if eqn.primitive.name == "mul" else "bias"
        site = self._new_site(track.leaf, kind, eqn, ctx, out_shape, eqn.outvars[0].aval.dtype)
        site.prep = ElementwisePrep(pos=pos, n_tok=n_tok, d=d, other=1 - k, out_shape=tuple(out_shape),
                                    scale=kind == "scale")
        action.out_site = site.id
        return True

    # ------------------------------------------------------------------- scan
    def _scan(self, eqn, i: int, uses, ctx: _Ctx, action: _Action) -> list:
        p = eqn.params
        nc = p["num_consts"]
        body = p["jaxpr"].jaxpr
        n_out = len(eqn.outvars)
        key = ctx.path + (i,)
        self.scans.setdefault(key, (self._tick(), int(p["length"]), bool(p["reverse"])))
        if all(k < nc for k, _ in uses):
            frames = ctx.frames + (("scan", key, int(p["length"]), bool(p["reverse"])),)
            n_before = len(self.sites)
            inner = {body.invars[k]: t for k, t in uses}
            child, outs = self.walk(body, inner, _Ctx(key, frames, ctx.marker))
            if all(t is None for t in outs):
                if not child.empty():
                    action.child = child
                    action.scan_sites = tuple(range(n_before, len(self.sites)))
                return [None] * n_out
            # the body hands a view of the leaf out of the scan: undo and take the use whole
            del self.sites[n_before:]
        for k, track in uses:
            self._dense(eqn, k, track, ctx, action, "a leaf carried or scanned over by lax.scan (not a closed-over "
                                                    "constant of its body)")
        return [None] * n_out


# ----------------------------------------------------------------------- the plan


@dataclass
class CapturePlan:
    """Everything static about capturing one loss for one parameter and batch shape.

    Attributes:
        closed_jaxpr: the per-example jaxpr (inputs: param leaves, then batch leaves with a batch axis of 1).
        scope: per-equation actions of the transformed evaluation.
        sites: every use of a selected leaf.
        params: ParamInfo of the selected leaves, in forward order of first use, by group.
        leaf_index: ParamInfo name -> flatten index of the leaf.
        steps: number of step slots per group.
        mode: how loop steps were found: ``"scan"``, ``"marker"``, ``"count"`` or ``"none"``.
        n_param_leaves: number of leaves of params (the jaxpr's first inputs).
        batch_axes: flattened batch axes (int or None per batch leaf).
    """

    closed_jaxpr: Any
    scope: _Scope
    sites: list
    params: list
    leaf_index: dict
    steps: dict
    mode: str
    n_param_leaves: int
    batch_axes: tuple
    canon: dict

    def sites_of(self, name: str) -> list:
        leaf = self.leaf_index[name]
        return [s for s in self.sites if s.leaf == leaf]

    def coverage(self) -> Coverage:
        """What this capture covers, in the backends' shared :class:`sdi_core.Coverage` form.

        Every use found in the jaxpr counts, one per step slot it covers (a site inside the loop's
        ``lax.scan`` covers all its iterations).  ``steps_with_grad`` counts step slots with a use: a
        ``stop_gradient`` prefix still has its uses (the jaxpr cannot say that no gradient arrives; its
        features are zero).
        """
        cov = Coverage(groups={p.name: p.group for p in self.params})
        names = {leaf: name for name, leaf in self.leaf_index.items()}
        for site in self.sites:
            if site.leaf not in names:
                continue
            stack = site.stack
            steps = range(site.step_offset, site.step_offset + stack[0]) if site.step_axis else (site.step,)
            for st in steps:
                cov.add(names[site.leaf], st, site.kind)
        cov.steps_run = dict(self.steps)
        cov.steps_with_grad = {g: len({st for p, per in cov.uses.items() if cov.groups[p] == g for st in per})
                               for g in self.steps}
        return cov

    def describe(self) -> str:
        """A short human-readable account of the capture (sites per parameter and kind)."""
        lines = [f"loop steps found by {self.mode!r}: {self.steps}"]
        for p in self.params:
            kinds: dict = {}
            for s in self.sites_of(p.name):
                kinds[s.kind] = kinds.get(s.kind, 0) + 1
            lines.append(f"  {p.group:8s} {p.name} {p.shape}: " + ", ".join(f"{n} {k}" for k, n in kinds.items()))
        return "\n".join(lines)


def _example_struct(leaf, axis):
    """ShapeDtypeStruct of one example's leaf (batch axis kept, size 1)."""
    shape = tuple(np.shape(leaf))
    dtype = jax.dtypes.canonicalize_dtype(leaf.dtype if hasattr(leaf, "dtype") else jnp.result_type(leaf))
    if axis is None:
        return jax.ShapeDtypeStruct(shape, dtype)
    return jax.ShapeDtypeStruct(shape[:axis] + (1,) + shape[axis + 1:], dtype)


def flat_batch_axes(batch, batch_axes) -> tuple:
    """Batch axis (int or None) of every leaf of ``batch``, from a ``vmap``-style ``in_axes`` prefix."""
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    if batch_axes is None or isinstance(batch_axes, int):
        axes = [batch_axes] * len(leaves)
    else:
        try:
            axes = jax.tree_util.tree_leaves(
                jax.tree_util.tree_map(lambda ax, sub: [ax] * len(jax.tree_util.tree_leaves(sub)), batch_axes, batch,
                                       is_leaf=lambda x: x is None),
                is_leaf=lambda x: isinstance(x, list))
            axes = [a for group in axes for a in group]
        except Exception as exc:  # noqa: BLE001
            raise SDIError(
                f"batch_axes={batch_axes!r} is not a prefix of the batch's structure ({exc}). Pass 0 (every leaf "
                "has a leading example axis) or a pytree prefix of ints/None like jax.vmap's in_axes."
            ) from None
    out = []
    for leaf, ax in zip(leaves, axes):
        if ax is None:
            out.append(None)
            continue
        nd = np.ndim(leaf)
        if not isinstance(ax, (int, np.integer)) or not -nd <= ax < nd:
            raise SDIError(f"batch_axes: axis {ax!r} is out of range for a batch leaf of shape {np.shape(leaf)}.")
        out.append(int(ax) % nd)
    return tuple(out)


def batch_size(batch, axes: tuple) -> int:
    leaves = jax.tree_util.tree_leaves(batch)
    sizes = {int(np.shape(x)[a]) for x, a in zip(leaves, axes) if a is not None}
    if not sizes:
        raise SDIError("The batch has no leaf with an example axis; pass batch_axes to say which axis holds examples.")
    if len(sizes) > 1:
        raise SDIError(f"Batch leaves disagree on the number of examples along their batch axes: {sorted(sizes)}.")
    return sizes.pop()


def build_plan(
    loss_fn: Callable,
    params,
    batch,
    groups: Mapping[str, Sequence[int]],
    *,
    batch_axes=0,
    fallback: str = "dense",
    steps: int | None = None,
    order: str = "forward",
) -> CapturePlan:
    """Trace ``loss_fn`` for one example and locate every use of the selected leaves.

    Args:
        loss_fn: ``loss_fn(params, batch) -> [B]`` per-example losses.
        params, batch: example inputs (arrays or ShapeDtypeStructs; only shapes are read).
        groups: group name -> flatten indices of the selected leaves (``"loop"``
            gets one slot per loop step, other groups one slot).
        batch_axes: example axis of the batch leaves (``vmap`` ``in_axes`` style).
        fallback: ``"dense"`` (exact per-example gradient of a use that is not
            a linear/embedding/scale/bias use) or ``"error"``.
        steps: expected number of loop steps (checked; needed when a
            Python-unrolled body uses a leaf more than once per step).
        order: layout order of the parameters within a group: ``"forward"``
            (order of first use in the forward pass, which is definition order
            for models written top to bottom and does not depend on how a
            pytree sorts its keys) or ``"selection"`` (the order the
            selectors return the leaves in).

    Raises:
        SDIError: for losses of the wrong shape, unused leaves, ambiguous steps.
    """
    if fallback not in ("dense", "error"):
        raise SDIError(f"fallback={fallback!r}: expected 'dense' or 'error'.")
    if order not in ("forward", "selection"):
        raise SDIError(f"order={order!r}: expected 'forward' or 'selection'.")
    names = leaf_names(params)
    p_leaves, p_def = jax.tree_util.tree_flatten(params)
    b_leaves, b_def = jax.tree_util.tree_flatten(batch)
    axes = flat_batch_axes(batch, batch_axes)
    n_ex = batch_size(batch, axes)

    out = jax.eval_shape(loss_fn, params, batch)
    if not hasattr(out, "shape") or tuple(out.shape) != (n_ex,):
        got = tuple(out.shape) if hasattr(out, "shape") else type(out).__name__
        raise SDIError(
            f"loss_fn(params, batch) returned shape {got}; it must return one loss per example, shape (B,) = "
            f"({n_ex},). Return per-example losses (e.g. mean over tokens with axis=-1), not their batch mean."
        )
    if not _is_float(out.dtype):
        raise SDIError(f"loss_fn returned dtype {out.dtype}; per-example losses must be floating point.")

    leaf_group: dict[int, str] = {}
    for g, idx in groups.items():
        for i in idx:
            if i in leaf_group:
                raise SDIError(
                    f"Leaf {names[i]!r} is selected by both the {leaf_group[i]!r} and the {g!r} selectors; "
                    "select each leaf in one group."
                )
            leaf_group[i] = g
            dt = getattr(p_leaves[i], "dtype", None)
            if dt is None or not _is_float(dt):
                raise SDIError(f"Selected leaf {names[i]!r} has dtype {dt}; only floating-point leaves have gradients.")

    ex_structs = [_example_struct(x, a) for x, a in zip(b_leaves, axes)]

    def per_example(p_flat, b_flat):
        return loss_fn(p_def.unflatten(p_flat), b_def.unflatten(b_flat))

    p_structs = [_example_struct(x, None) for x in p_leaves]
    closed = jax.make_jaxpr(per_example)(p_structs, ex_structs)
    jaxpr = closed.jaxpr
    leaf_avals = [v.aval for v in jaxpr.invars[: len(p_leaves)]]
    walker = _Walker(leaf_avals, fallback, names)
    tracked = {jaxpr.invars[i]: _Track(i) for i in leaf_group}
    scope, _ = walker.walk(jaxpr, tracked, _Ctx())
    sites = walker.sites

    used = {s.leaf for s in sites}
    unused = [names[i] for i in sorted(leaf_group) if i not in used]
    if unused:
        raise SDIError(
            f"Selected leaves never used by loss_fn: {unused}. Remove them from the selector, or check that "
            "loss_fn reads them from its params argument (not from a closed-over copy)."
        )

    mode, n_steps = _resolve_steps(sites, leaf_group, walker, names, steps)

    # parameter infos: canonical shapes; layout order within a group: first use in the forward pass, or selection
    first_use: dict[int, int] = {}
    for s in sorted(sites, key=lambda s: s.order):
        first_use.setdefault(s.leaf, s.order)
    selection = {i: k for k, i in enumerate(i for idx in groups.values() for i in idx)}
    rank = first_use if order == "forward" else selection
    infos, leaf_index, canon = [], {}, {}
    for i in sorted(leaf_group, key=lambda i: rank[i]):
        shape = tuple(leaf_avals[i].shape)
        c = walker.canon.get(i, tuple(range(len(shape))))
        canon[i] = c
        infos.append(ParamInfo(names[i], tuple(shape[a] for a in c), leaf_group[i]))
        leaf_index[names[i]] = i
    group_steps = {g: (n_steps if g == "loop" else 1) for g in groups}
    return CapturePlan(closed, scope, sites, infos, leaf_index, group_steps, mode, len(p_leaves), axes, canon)


def _resolve_steps(sites, leaf_group, walker: _Walker, names, expected: int | None) -> tuple[str, int]:
    """Assign a loop step to every site of the ``loop`` group; returns (mode, number of steps)."""
    loop_sites = sorted((s for s in sites if leaf_group[s.leaf] == "loop"), key=lambda s: s.order)
    for s in sites:
        s.step, s.step_axis = 0, False
    if not loop_sites:
        return "none", 1
    outer = {s.id: (s.frames[0] if s.frames else None) for s in loop_sites}
    kinds = {f[0] if f else None for f in outer.values()}
    if len(kinds) > 1:
        where = {}
        for s in loop_sites:
            f = outer[s.id]
            where.setdefault("a lax.scan" if f and f[0] == "scan" else "a loop_step call" if f else
                             "no scan or loop_step", []).append(names[s.leaf])
        desc = "; ".join(f"{k}: {sorted(set(v))[:3]}" for k, v in where.items())
        raise SDIError(
            f"The loop leaves are used in different kinds of step boundaries ({desc}), so the loop steps are "
            "ambiguous. Run every loop step inside one lax.scan, or mark the body with @sdi_jax.loop_step at every "
            "call, and keep loop leaves out of the prelude and coda."
        )
    kind = kinds.pop()
    if kind == "scan":
        keys = sorted({outer[s.id][1] for s in loop_sites}, key=lambda k: walker.scans[k][0])
        offset, offsets = 0, {}
        for k in keys:
            offsets[k] = offset
            offset += walker.scans[k][1]
        for s in loop_sites:
            f = outer[s.id]
            s.step_axis = True
            s.step_offset = offsets[f[1]]
            s.scan_order = walker.scans[f[1]][0]
        n = offset
        mode = "scan"
    elif kind == "marker":
        keys = [k for k in walker.markers]
        pos = {k: j for j, k in enumerate(keys)}
        for s in loop_sites:
            s.step = pos[outer[s.id][1]]
        n = len(keys)
        mode = "marker"
    else:
        counts: dict[int, list] = {}
        for s in loop_sites:
            counts.setdefault(s.leaf, []).append(s)
        sizes = {names[leaf]: len(v) for leaf, v in counts.items()}
        if len(set(sizes.values())) > 1:
            raise SDIError(
                "The loop leaves are used different numbers of times "
                f"({', '.join(f'{k}: {v}' for k, v in list(sizes.items())[:6])}), so the loop steps cannot be "
                "counted. Mark the loop body with @sdi_jax.loop_step (or run it with lax.scan), and select only the "
                "leaves of the loop body."
            )
        per_leaf = next(iter(sizes.values()))
        if expected is not None:
            if per_leaf % expected:
                raise SDIError(
                    f"Each loop leaf is used {per_leaf} times, which is not a multiple of steps={expected}. Mark the "
                    "body with @sdi_jax.loop_step or pass the number of steps the model runs."
                )
            per_step = per_leaf // expected
        else:
            per_step = 1
        for leaf_sites in counts.values():
            for j, s in enumerate(leaf_sites):
                s.step = j // per_step
        n = per_leaf // per_step
        mode = "count"
    if expected is not None and n != expected:
        raise SDIError(
            f"Found {n} loop steps ({mode}), but steps={expected} was given. Check the loop count the loss runs "
            "(tau), or the step marks."
        )
    return mode, n


# --------------------------------------------------------------- the evaluation


def _bind(eqn_or_prim, invals, params=None, eqn=None):
    prim = eqn_or_prim
    bind_params = prim.get_bind_params(params)
    subfuns = ()
    if isinstance(bind_params, tuple):  # older JAX: (subfuns, params)
        subfuns, bind_params = bind_params
    if eqn is not None:
        with eqn.ctx.manager:
            ans = prim.bind(*subfuns, *invals, **bind_params)
    else:
        ans = prim.bind(*subfuns, *invals, **bind_params)
    return list(ans) if prim.multiple_results else [ans]


def _apply_ops(ops, x):
    for prim, params in ops:
        x = _bind(prim, [x], params)[0]
    return x


def _prep_activation(site: Site, invals):
    return site.prep.activation(invals)


def _run(jaxpr, consts, args, scope: _Scope, plan_sites, pert: dict, acts: dict):
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for i, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        action = scope.actions.get(i)
        if action is None:
            outs = _bind(eqn.primitive, invals, eqn.params, eqn)
        elif action.child is not None and eqn.primitive.name == "scan":
            outs = _run_scan(eqn, invals, action, plan_sites, pert, acts)
        elif action.child is not None:
            sub, sub_consts = _sub_jaxpr(eqn)
            outs = _run(sub, sub_consts, invals, action.child, plan_sites, pert, acts)
        else:
            for sid in action.dense:
                site = plan_sites[sid]
                invals[site.operand] = invals[site.operand] + _apply_ops(site.ops, pert[sid]).astype(
                    invals[site.operand].dtype)
            outs = _bind(eqn.primitive, invals, eqn.params, eqn)
            if action.out_site is not None:
                sid = action.out_site
                site = plan_sites[sid]
                a = _prep_activation(site, invals)
                if a is not None:
                    acts[sid] = a
                outs[0] = outs[0] + pert[sid]
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _run_scan(eqn, invals, action: _Action, plan_sites, pert: dict, acts: dict):
    p = eqn.params
    nc, ncar = p["num_consts"], p["num_carry"]
    closed = p["jaxpr"]
    consts, init, xs = invals[:nc], invals[nc:nc + ncar], invals[nc + ncar:]
    inner_ids = action.scan_sites
    inner_pert = {sid: pert[sid] for sid in inner_ids}

    def body(carry, x):
        xs_i, pert_i = x
        inner_acts: dict = {}
        outs = _run(closed.jaxpr, list(closed.consts), list(consts) + list(carry) + list(xs_i), action.child,
                    plan_sites, pert_i, inner_acts)
        return outs[:ncar], (outs[ncar:], inner_acts)

    carry, (ys, stacked) = lax.scan(body, list(init), (list(xs), inner_pert), length=p["length"],
                                    reverse=p["reverse"], unroll=p["unroll"])
    acts.update(stacked)
    return list(carry) + list(ys)


def zero_perturbations(plan: CapturePlan) -> dict:
    """Zeros of every site's perturbation, with the enclosing scans' lengths as leading axes."""
    return {s.id: jnp.zeros(s.stack + s.pert_shape, s.pert_dtype) for s in plan.sites}


def run_capture(plan: CapturePlan, params, batch):
    """Per-example losses, grad-outputs and activations of every site (pure, jittable).

    Returns:
        ``(loss [B], grads {site: [B, *stack, *pert_shape]}, acts {site: [B, *stack, ...]})``.
    """
    p_leaves = jax.tree_util.tree_leaves(params)
    b_leaves = jax.tree_util.tree_leaves(batch)
    closed = plan.closed_jaxpr
    axes = plan.batch_axes
    mapped = [x for x, a in zip(b_leaves, axes) if a is not None]
    fixed = {j: x for j, (x, a) in enumerate(zip(b_leaves, axes)) if a is None}
    mapped_axes = [a for a in axes if a is not None]

    def one(ex_mapped):
        it = iter(ex_mapped)
        ex = []
        for j, a in enumerate(axes):
            ex.append(fixed[j] if a is None else jnp.expand_dims(next(it), a))

        def loss_of(pert):
            acts: dict = {}
            outs = _run(closed.jaxpr, list(closed.consts), list(p_leaves) + ex, plan.scope, plan.sites, pert, acts)
            return jnp.reshape(outs[0], ()), acts

        (loss, acts), grads = jax.value_and_grad(loss_of, has_aux=True)(zero_perturbations(plan))
        return loss, grads, acts

    return jax.vmap(one, in_axes=(mapped_axes,))(mapped)


# ------------------------------------------------------------ factors of the sites


def _grad_factor(site: Site, g):
    """Grad-output ``[B, *stack, *out]`` -> ``[B, *stack, N, d]`` (factor kinds) or canonical dense."""
    return site.prep.grad(g, g.ndim - len(site.pert_shape))


def site_arrays(plan: CapturePlan, site: Site, grads: dict, acts: dict):
    """The factors of one site, step axis explicit.

    Returns:
        ``(steps, kind, activation, grad_output)`` where ``steps`` is a tuple
        of the step slots covered, and the arrays are ``[B, S, N, d]`` (ids
        ``[B, S, N]``; ``dense``: ``[B, S, *canonical shape]``; activation None
        for bias and dense).  For ``linear`` uses the pair is already in the
        canonical frame (activation along the columns).
    """
    g = grads[site.id]
    a = acts.get(site.id)
    stack = site.stack
    b = g.shape[0]
    canon = plan.canon[site.leaf]
    if site.kind == "dense":
        g = jnp.transpose(g, tuple(range(1 + len(stack))) + tuple(1 + len(stack) + c for c in canon))
    else:
        g = _grad_factor(site, g)
    # step axis: the outermost scan for loop sites in scan mode; every other scan axis folds into tokens
    if site.step_axis:
        length, reverse = stack[0], site.frames[0][3]
        steps = tuple(site.step_offset + j for j in range(length))
        if reverse:
            g = jnp.flip(g, axis=1)
            a = None if a is None else jnp.flip(a, axis=1)
        fold = stack[1:]
    else:
        steps = (site.step,)
        g = jnp.expand_dims(g, 1)
        a = None if a is None else jnp.expand_dims(a, 1)
        fold = stack
    s_len = len(steps)
    if fold:
        if site.kind == "dense":
            g = jnp.sum(g, axis=tuple(range(2, 2 + len(fold))))
        else:
            tail = g.shape[2 + len(fold):]
            g = jnp.reshape(g, (b, s_len, -1) + tail[1:])
            if a is not None:
                a_tail = a.shape[2 + len(fold):]
                a = jnp.reshape(a, (b, s_len, -1) + a_tail[1:])
    kind = site.kind
    if kind == "linear" and site.prep.swap:
        a, g = g, a
    return steps, kind, a, g
