"""``sdi_jax.Attributor``: per-step features of a pure JAX loss, one jitted call per batch.

::

    attr = sdi_jax.Attributor(loss_fn, loop=lambda p: p["block"], sketch=sdi_core.TensorSketch(4096, seed=0))
    train = attr.featurize(train_batches, checkpoints=[sdi_core.Checkpoint(params_k, eta=1e-3), ...])
    query = attr.featurize(query_batches, checkpoints=[...])
    res = sdi_core.influence(train, query)

Per batch, one jitted function runs the captured loss (see
:mod:`sdi_jax.capture`), turns every use's factors into features with the
core's pure :func:`sdi_core.use_features`, and adds them per parameter and
step.  It is traced once per parameter/batch shape; checkpoints and batches of
the same shape reuse the compiled function.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdi_core.factors import FactorUse, SDIError
from sdi_core.features import Checkpoint, CheckpointInfo, Features
from sdi_core.sketch import use_features
from sdi_core.specs import Exact, SketchPlan, TensorSketch

from .capture import CapturePlan, batch_size, build_plan, flat_batch_axes, leaf_names, run_capture, select_leaves, \
    site_arrays

__all__ = ["Attributor"]


def _struct_key(tree) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (treedef, tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x).__name__))) for x in leaves))


def _tree_diff(a, b) -> str:
    """A sentence naming how two params pytrees differ (structure, then the first leaf shape)."""
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    if ta != tb:
        na, nb = set(leaf_names(a)), set(leaf_names(b))
        only_a, only_b = sorted(na - nb)[:4], sorted(nb - na)[:4]
        if only_a or only_b:
            return f"leaves only in the first: {only_a}, only in this one: {only_b}"
        return f"the tree structures differ ({ta} vs {tb})"
    for name, x, y in zip(leaf_names(a), la, lb):
        if np.shape(x) != np.shape(y) or str(getattr(x, "dtype", "")) != str(getattr(y, "dtype", "")):
            return f"leaf {name!r} is {np.shape(x)} {getattr(x, 'dtype', '')} vs {np.shape(y)} {getattr(y, 'dtype', '')}"
    return "they differ"


def params_fingerprint(params) -> str:
    """A short content hash of a params pytree (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for name, leaf in zip(leaf_names(params), jax.tree_util.tree_leaves(params)):
        arr = np.asarray(leaf)
        h.update(f"{name}|{arr.shape}|{arr.dtype}|".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


class Attributor:
    """Step-decomposed features of the examples of a pure JAX loss.

    Args:
        loss_fn: ``loss_fn(params, batch) -> [B]``, pure, one loss per example
            (examples must not interact: each row's loss depends on its own
            inputs only).
        loop: selector of the looped (weight-tied) leaves,
            ``lambda params: params["block"]``; it must return a sub-pytree of
            params.  Their uses are split by loop step: one ``lax.scan`` /
            ``fori_loop`` iteration, one call of a :func:`sdi_jax.loop_step`
            body, or, with neither, the k-th use of every leaf.  None selects
            no loop group.
        sketch: :class:`sdi_core.TensorSketch` or :class:`sdi_core.Exact`.
        extra: further groups, one slot each: ``{"prelude": lambda p: {...},
            "coda": lambda p: ...}``.
        steps: the number of loop steps the loss runs, checked against what
            the capture finds (and used to group uses when a Python-unrolled
            body uses a leaf more than once per step).
        batch_axes: which axis of each batch leaf holds the examples, in the
            style of ``jax.vmap``'s ``in_axes`` (default 0; None for leaves
            shared by all examples).
        fallback: ``"dense"`` (a use that is not linear, embedding, scale or
            bias is taken as its exact per-example gradient) or ``"error"``.
        order: parameter order within a group's features: ``"forward"``
            (first use in the forward pass; for models written top to bottom
            this is definition order, as in PyTorch's ``named_parameters``)
            or ``"selection"`` (the order the selector returns the leaves in).
        jit: jit the per-batch featurisation (default True).
        progress: tqdm bar over checkpoints x batches in :meth:`featurize`.
        check_rows: on the first batch of every shape, compare the losses of
            the examples run one at a time (as the capture runs them) with
            ``loss_fn`` on the whole batch, and raise if they differ (examples
            that interact make per-example gradients meaningless).  Costs one
            jitted forward pass per batch shape.

    Parameter names are dotted pytree paths (``block.mlp.fc1.weight``);
    shapes are canonical (a kernel stored ``(d_in, d_out)`` and used as
    ``x @ W`` is reported ``(d_out, d_in)``), so features match PyTorch's.
    The library never changes ``jax.config``: enable float64 yourself if
    you want float64 features.
    """

    def __init__(
        self,
        loss_fn: Callable,
        loop: Callable | None = None,
        *,
        sketch: TensorSketch | Exact,
        extra: Mapping[str, Callable] | None = None,
        steps: int | None = None,
        batch_axes: Any = 0,
        fallback: str = "dense",
        order: str = "forward",
        jit: bool = True,
        progress: bool = True,
        check_rows: bool = True,
    ) -> None:
        if not callable(loss_fn):
            raise SDIError(f"loss_fn must be callable as loss_fn(params, batch) -> [B], got {type(loss_fn).__name__}.")
        if not isinstance(sketch, (TensorSketch, Exact)):
            raise SDIError(
                "sketch must be sdi_core.TensorSketch(dim=..., seed=...) or sdi_core.Exact(), "
                f"got {type(sketch).__name__}."
            )
        selectors: dict[str, Callable] = {}
        if loop is not None:
            if not callable(loop):
                raise SDIError("loop must be a selector such as `lambda params: params['block']`.")
            selectors["loop"] = loop
        for name, sel in dict(extra or {}).items():
            if name == "loop":
                raise SDIError("extra={'loop': ...}: the loop group is given by the `loop` argument.")
            if not isinstance(name, str) or not name or not callable(sel):
                raise SDIError(f"extra must map group names to selectors; got {name!r}: {type(sel).__name__}.")
            selectors[name] = sel
        if not selectors:
            raise SDIError("Select something to attribute through: pass loop=... and/or extra={group: selector}.")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0):
            raise SDIError(f"steps={steps!r}: the number of loop steps must be a positive int (or None).")
        if fallback not in ("dense", "error"):
            raise SDIError(f"fallback={fallback!r}: expected 'dense' or 'error'.")
        if order not in ("forward", "selection"):
            raise SDIError(f"order={order!r}: expected 'forward' or 'selection'.")
        self.order = order
        self.loss_fn = loss_fn
        self.selectors = selectors
        self.sketch = sketch
        self.steps = None if steps is None else int(steps)
        self.batch_axes = batch_axes
        self.fallback = fallback
        self.jit = bool(jit)
        self.progress = bool(progress)
        self.check_rows = bool(check_rows)
        self._rows_checked: set = set()
        self._loss_jit = None
        self._plans: dict = {}
        self._fns: dict = {}
        self._sketch_plans: dict = {}

    # ---------------------------------------------------------------- planning
    def capture_plan(self, params, batch) -> CapturePlan:
        """The static capture of ``loss_fn`` for this params and batch shape (cached)."""
        key = (_struct_key(params), _struct_key(batch))
        plan = self._plans.get(key)
        if plan is None:
            groups = {g: select_leaves(params, sel, f"{g!r}") for g, sel in self.selectors.items()}
            plan = build_plan(self.loss_fn, params, batch, groups, batch_axes=self.batch_axes,
                              fallback=self.fallback, steps=self.steps, order=self.order)
            self._plans[key] = plan
        return plan

    def sketch_plan(self, params, batch) -> SketchPlan:
        """The :class:`sdi_core.SketchPlan` (parameters, canonical shapes, feature layout)."""
        cap = self.capture_plan(params, batch)
        key = tuple((p.name, p.shape, p.group) for p in cap.params)
        sp = self._sketch_plans.get(key)
        if sp is None:
            sp = SketchPlan(self.sketch, cap.params)
            self._sketch_plans[key] = sp
        return sp

    def _fn(self, params, batch, kind: str):
        cap = self.capture_plan(params, batch)
        sp = self.sketch_plan(params, batch)
        key = (id(cap), kind)
        fn = self._fns.get(key)
        if fn is None:
            if kind == "features":
                fn = _make_features_fn(cap, sp, getattr(self.sketch, "route", "auto"))
            else:
                fn = lambda p, b: run_capture(cap, p, b)  # noqa: E731
            if self.jit:
                fn = jax.jit(fn)
            self._fns[key] = fn
        return cap, sp, fn

    # --------------------------------------------------------------- one batch
    def featurize_batch(self, params, batch) -> dict[str, Any]:
        """Features of one batch at one set of params: ``{group: [B, S_g, D_g]}`` (jax arrays).

        Raises SDIError naming the parameter and step when a feature is not finite.
        """
        cap, sp, fn = self._fn(params, batch, "features")
        out, loss = fn(params, batch)
        if self.check_rows and id(cap) not in self._rows_checked:
            self._check_rows(params, batch, loss)
            self._rows_checked.add(id(cap))
        _check_finite(out, sp, cap)
        return out

    def _check_rows(self, params, batch, loss) -> None:
        """The losses of examples run one at a time must be loss_fn's: rows must be independent."""
        if self._loss_jit is None:
            self._loss_jit = jax.jit(self.loss_fn) if self.jit else self.loss_fn
        want = np.asarray(self._loss_jit(params, batch), dtype=np.float64)
        got = np.asarray(loss, dtype=np.float64)
        eps = float(jnp.finfo(jnp.result_type(loss)).eps)
        scale = max(float(np.abs(want).max(initial=0.0)), 1.0)
        bad = np.abs(got - want) > 1e3 * eps * scale
        if bad.any():
            b = int(np.argmax(bad))
            raise SDIError(
                f"loss_fn's loss for example {b} is {want[b]:.6g} in the batch but {got[b]:.6g} when the example runs "
                "alone: the examples of a batch interact (a batch mean or sum inside the model, batch norm, a "
                "predicate over the whole batch). Per-example gradients need independent rows; compute every "
                "example's loss from its own inputs only (or pass check_rows=False if the difference is intended)."
            )

    def factors(self, params, batch) -> tuple[np.ndarray, list[FactorUse]]:
        """Per-example losses ``[B]`` and the factor stream of one batch (NumPy arrays, forward order).

        One :class:`sdi_core.FactorUse` per use and loop step, in forward order
        (step-major inside a scan), in the canonical frame: linear uses carry
        ``activation [B, N, d_in]`` and ``grad_output [B, N, d_out]``; uses
        taken exactly (``kind="dense"``) carry the per-example gradient
        ``[B, *canonical shape]`` as grad_output.
        """
        cap, sp, fn = self._fn(params, batch, "capture")
        loss, grads, acts = fn(params, batch)
        info = {p.name: p for p in cap.params}
        names = leaf_names(params)
        rows = []
        for site in cap.sites:
            steps, kind, a, g = site_arrays(cap, site, grads, acts)
            for j, s in enumerate(steps):
                key = (site.scan_order, s, site.order) if site.step_axis else (site.order, 0, 0)
                rows.append((key, site, s, kind, None if a is None else np.asarray(a[:, j]), np.asarray(g[:, j])))
        rows.sort(key=lambda r: r[0])
        uses = []
        for i, (_, site, s, kind, a, g) in enumerate(rows):
            name = names[site.leaf]
            if kind == "dense":
                g = g.reshape((g.shape[0],) + info[name].shape)
            uses.append(FactorUse(name, int(s), kind, a, g, use_index=i, extra={"primitive": site.primitive}))
        return np.asarray(loss), uses

    # ----------------------------------------------------------- many batches
    def featurize(
        self,
        batches,
        checkpoints: Sequence[Checkpoint],
        *,
        example_ids=None,
        progress: bool | None = None,
    ) -> Features:
        """Per-step features of every example at every checkpoint.

        Args:
            batches: an iterable of batches (pytrees whose leaves have the
                example axis given by ``batch_axes``), or a single batch
                given as a Mapping.  Iterated once per checkpoint.
            checkpoints: :class:`sdi_core.Checkpoint` objects whose ``source``
                is a params pytree (``eta`` defaults to 1.0; the id to
                ``name`` or a content hash of the params).  A bare pytree
                is taken as ``Checkpoint(pytree)``.
            example_ids: optional ``[N]`` ints; default ``0 .. N-1``.
            progress: override the Attributor's ``progress``.

        Returns:
            :class:`sdi_core.Features` with one ``{group: [N, S_g, D_g]}``
            block of jax arrays per checkpoint.
        """
        if isinstance(batches, Mapping):
            batches = [batches]
        batches = list(batches)
        if not batches:
            raise SDIError("featurize needs at least one batch.")
        ckpts = _as_checkpoints(checkpoints)
        first = ckpts[0].source
        first_key = _struct_key(first)
        for k, c in enumerate(ckpts[1:], start=1):
            if _struct_key(c.source) != first_key:
                raise SDIError(
                    f"Checkpoint {k}'s params pytree differs from checkpoint 0's: {_tree_diff(first, c.source)}. "
                    "Every checkpoint must have the same structure, leaf shapes and dtypes (the same model)."
                )
        sizes = [batch_size(b, flat_batch_axes(b, self.batch_axes)) for b in batches]
        n = sum(sizes)
        if example_ids is None:
            ids = np.arange(n, dtype=np.int64)
        else:
            ids = np.asarray(example_ids)
            if ids.shape != (n,):
                raise SDIError(f"example_ids has shape {ids.shape}; the batches hold {n} examples, expected ({n},).")
        show = self.progress if progress is None else bool(progress)
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ckpts) * len(batches), desc="sdi_jax featurize", unit="batch")
        data, infos, layout, steps = [], [], None, None
        try:
            for ck in ckpts:
                parts: dict[str, list] = {}
                for batch in batches:
                    cap = self.capture_plan(ck.source, batch)
                    sp = self.sketch_plan(ck.source, batch)
                    if layout is None:
                        layout, steps = sp.layout, dict(cap.steps)
                    elif sp.layout.diff(layout) is not None or dict(cap.steps) != steps:
                        raise SDIError(
                            f"Batches give different captures ({sp.layout.diff(layout) or 'steps differ'}); keep "
                            "the loop count and the model the same across batches."
                        )
                    out = self.featurize_batch(ck.source, batch)
                    for g, arr in out.items():
                        parts.setdefault(g, []).append(arr)
                    if bar is not None:
                        bar.update(1)
                data.append({g: (v[0] if len(v) == 1 else jnp.concatenate(v, axis=0)) for g, v in parts.items()})
                infos.append(CheckpointInfo(ck.name or params_fingerprint(ck.source), 1.0 if ck.eta is None else ck.eta,
                                            ck.step))
        finally:
            if bar is not None:
                bar.close()
        return Features(data=data, layout=layout, checkpoints=tuple(infos), steps=steps, example_ids=ids,
                        meta={"backend": "sdi_jax"})


def _as_checkpoints(checkpoints) -> list[Checkpoint]:
    if isinstance(checkpoints, Checkpoint):
        checkpoints = [checkpoints]
    if isinstance(checkpoints, Mapping) or not isinstance(checkpoints, Iterable):
        raise SDIError(
            "checkpoints must be a list of sdi_core.Checkpoint(params, eta=...) (a params pytree per checkpoint); "
            f"got {type(checkpoints).__name__}. Wrap a single params pytree as [sdi_core.Checkpoint(params)]."
        )
    out = [c if isinstance(c, Checkpoint) else Checkpoint(c) for c in checkpoints]
    if not out:
        raise SDIError("featurize needs at least one checkpoint.")
    for k, c in enumerate(out):
        if isinstance(c.source, (str, bytes)) or hasattr(c.source, "__fspath__"):
            raise SDIError(
                f"Checkpoint {k} has source {c.source!r}; sdi_jax takes the params pytree itself. Load it first "
                "(e.g. with orbax or pickle) and pass Checkpoint(params, eta=...)."
            )
        if not jax.tree_util.tree_leaves(c.source):
            raise SDIError(f"Checkpoint {k}'s source has no array leaves; pass the params pytree.")
    return out


def _blocked_use_features(name, kind, a, g, spec, route, row_block):
    """:func:`sdi_core.use_features` of ``rows`` independent rows, a block of rows at a time.

    An outer-product use hashed exactly forms every row's ``[d_out, d_in]``
    gradient before hashing it; a ``lax.map`` over blocks of rows keeps that
    working set in cache instead of materialising all rows at once (on a 2-core
    CPU this is the difference between ~1.8x and ~1.2x of a forward+backward
    for the benchmark transformer).
    """
    rows = g.shape[0]
    per_row = math.prod(spec.param.matrix_shape or (spec.param.numel,))
    block = max(1, min(rows, row_block // max(per_row, 1)))
    if kind not in ("linear", "embedding") or block >= rows:
        return use_features(FactorUse(name, 0, kind, a, g), spec, route=route)
    pad = (-rows) % block

    def blocks(x):
        if pad:
            x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)], axis=0)
        return jnp.reshape(x, (-1, block) + x.shape[1:])

    def one(ag):
        return use_features(FactorUse(name, 0, kind, ag[0], ag[1]), spec, route=route)

    out = jax.lax.map(one, (blocks(a), blocks(g)))
    return jnp.reshape(out, (-1, out.shape[-1]))[:rows]


def _make_features_fn(cap: CapturePlan, sp: SketchPlan, route: str, row_block: int = 1 << 20):
    """The pure per-batch featurisation: params, batch -> {group: [B, S_g, D_g]}.

    ``row_block``: rows of an outer-product use are sketched in blocks of about
    ``row_block / (d_out * d_in)`` rows (see :func:`_blocked_use_features`).
    """
    leaf_to_name = {v: k for k, v in cap.leaf_index.items()}

    def features(params, batch):
        loss, grads, acts = run_capture(cap, params, batch)
        # group the sites that can share one use_features call: same parameter, kind and factor shapes
        buckets: dict = {}
        for site in cap.sites:
            steps, kind, a, g = site_arrays(cap, site, grads, acts)
            name = leaf_to_name[site.leaf]
            key = (name, kind, None if a is None else (a.shape[2:], str(a.dtype)), (g.shape[2:], str(g.dtype)))
            buckets.setdefault(key, []).append((steps, a, g))
        per_param: dict = {}
        for (name, kind, _, _), items in buckets.items():
            steps = [s for st, _, _ in items for s in st]
            a = None if items[0][1] is None else _cat([x[1] for x in items])
            g = _cat([x[2] for x in items])
            b, s_tot = g.shape[0], g.shape[1]
            a_flat = None if a is None else jnp.reshape(a, (b * s_tot,) + a.shape[2:])
            g_flat = jnp.reshape(g, (b * s_tot,) + g.shape[2:])
            feats = _blocked_use_features(name, kind, a_flat, g_flat, sp.spec(name), route, row_block)
            feats = jnp.reshape(feats, (b, s_tot, feats.shape[-1]))
            per_param.setdefault(name, []).append((steps, feats))
        out = {}
        for grp in sp.layout.groups:
            s_g = cap.steps[grp.name]
            blocks = []
            for pname, (lo, hi) in zip(grp.params, grp.offsets):
                acc = None
                for steps, feats in per_param.get(pname, []):
                    if acc is None and list(steps) == list(range(s_g)):
                        acc = feats
                        continue
                    if acc is None:
                        acc = jnp.zeros((feats.shape[0], s_g, hi - lo), feats.dtype)
                    acc = acc.at[:, jnp.asarray(steps)].add(feats.astype(acc.dtype))
                blocks.append(acc)
            dt = jnp.result_type(*[x.dtype for x in blocks])
            blocks = [x.astype(dt) for x in blocks]
            out[grp.name] = blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=-1)
        return out, loss

    return features


def _cat(arrs):
    return arrs[0] if len(arrs) == 1 else jnp.concatenate(arrs, axis=1)


def _check_finite(out: Mapping[str, Any], sp: SketchPlan, cap: CapturePlan) -> None:
    ok = jnp.stack([jnp.all(jnp.isfinite(a)) for a in out.values()])
    if bool(jnp.all(ok)):
        return
    for grp in sp.layout.groups:
        arr = np.asarray(out[grp.name])
        for pname, (lo, hi) in zip(grp.params, grp.offsets):
            bad = ~np.isfinite(arr[:, :, lo:hi]).all(axis=(0, 2))
            if bad.any():
                step = int(np.argmax(bad))
                raise SDIError(
                    f"Non-finite (NaN or inf) gradient factors for parameter {pname!r} at step {step} of group "
                    f"{grp.name!r}. Check the loss and inputs of this batch (the checkpoint may have diverged, or an "
                    "example has no finite loss)."
                )
    raise SDIError("Non-finite features in this batch; check the loss and inputs.")
