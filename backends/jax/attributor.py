"""``sdi_jax.Attributor``: per-step features of a pure JAX loss, one jitted call per batch.

::

    attr = sdi_jax.Attributor(loss_fn, loop=lambda p: p["block"], sketch=sdi_core.TensorSketch(4096, seed=0))
    train = attr.featurize(train_batches, checkpoints=[sdi_core.Checkpoint(params_k, eta=1e-3), ...])
    query = attr.featurize(query_batches, checkpoints=[...])
    res = sdi_core.influence(train, query)

Per batch, one jitted function runs the captured loss (see
:mod:`sdi_jax.capture`) and hands every site's stacked factors
(:class:`sdi_core.StackedUse`, ``[B, S, T, d]`` with its steps) to the core's
:class:`sdi_core.SketchEngine` in its pure ``init`` / ``update`` /
``finalize`` form.  It is traced once per parameter/batch shape; checkpoints
and batches of the same shape reuse the compiled function.  With
``TensorSketch(route="auto")`` the engine times the routes of each linear
use shape while the function is traced (see :mod:`sdi_core.engine`).
"""

from __future__ import annotations

import warnings

from collections.abc import Mapping
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdi_core import driver
from sdi_core.engine import SketchEngine, check_features_finite
from sdi_core.factors import FactorUse, SDIError, StackedUse
from sdi_core.features import Checkpoint, CheckpointInfo, Features
from sdi_core.specs import Exact, SketchPlan, TensorSketch
from sdi_core.weights import checkpoint_id

from .capture import CapturePlan, build_plan, leaf_names, run_capture, select_leaves, site_arrays

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


def named_leaves(params) -> dict:
    """``{dotted path: leaf}`` of a params pytree (what :func:`sdi_core.checkpoint_id` hashes)."""
    return dict(zip(leaf_names(params), jax.tree_util.tree_leaves(params)))


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
        sketch: :class:`sdi_core.TensorSketch` (default ``dim=4096, seed=0``, as
            in sdi_torch) or :class:`sdi_core.Exact`.
        groups: further groups, one slot each: ``{"prelude": lambda p: {...},
            "coda": lambda p: ...}``.
        extra: deprecated name of ``groups`` (a DeprecationWarning; removed
            in the next release).
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
            jitted forward pass per batch shape.  None (the default, as in
            sdi_torch): on.
        params: the model's current weights (a params pytree), the JAX
            counterpart of a torch model's own parameters: ``featurize`` with
            ``checkpoints=None`` uses them with ``eta = 1``.

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
        sketch: TensorSketch | Exact | None = None,
        groups: Mapping[str, Callable] | None = None,
        steps: int | None = None,
        batch_axes: Any = 0,
        fallback: str = "dense",
        order: str = "forward",
        jit: bool = True,
        progress: bool = True,
        check_rows: bool | None = None,
        params: Any = None,
        extra: Mapping[str, Callable] | None = None,
    ) -> None:
        if extra is not None:
            warnings.warn("sdi_jax.Attributor(extra=...) is deprecated and will be removed in the next release; "
                          "pass groups=... (the name sdi_torch uses).", DeprecationWarning, stacklevel=2)
            if groups is not None:
                raise SDIError("Pass the side groups once: groups=... (extra= is its deprecated name).")
            groups = extra
        sketch = TensorSketch(dim=4096, seed=0) if sketch is None else sketch
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
        for name, sel in dict(groups or {}).items():
            if name == "loop":
                raise SDIError("groups={'loop': ...}: the loop group is given by the `loop` argument.")
            if not isinstance(name, str) or not name or not callable(sel):
                raise SDIError(f"groups must map group names to selectors; got {name!r}: {type(sel).__name__}.")
            selectors[name] = sel
        if not selectors:
            raise SDIError("Select something to attribute through: pass loop=... and/or groups={group: selector}.")
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
        self.check_rows = True if check_rows is None else bool(check_rows)
        self.params = params
        self._rows_checked: set = set()
        self._loss_jit = None
        self._plans: dict = {}
        self._fns: dict = {}
        self._sketch_plans: dict = {}
        self._engines: dict = {}

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

    def engine(self, params, batch) -> SketchEngine:
        """The :class:`sdi_core.SketchEngine` of this params and batch structure (its route choices persist)."""
        sp = self.sketch_plan(params, batch)
        eng = self._engines.get(id(sp))
        if eng is None:
            eng = self._engines[id(sp)] = SketchEngine(sp)
        return eng

    def _fn(self, params, batch, kind: str, summed: bool = False):
        cap = self.capture_plan(params, batch)
        sp = self.sketch_plan(params, batch)
        key = (id(cap), kind, bool(summed))
        fn = self._fns.get(key)
        if fn is None:
            if kind == "features":
                fn = _capture_and_sketch(cap, self.engine(params, batch), bool(summed))
            else:
                fn = lambda p, b: run_capture(cap, p, b)  # noqa: E731
            if self.jit:
                fn = jax.jit(fn)
            self._fns[key] = fn
        return cap, sp, fn

    # --------------------------------------------------------------- one batch
    def featurize_batch(self, params, batch, *, summed: bool = False) -> dict[str, Any]:
        """Features of one batch at one set of params: ``{group: [B, S_g, D_g]}`` (jax arrays).

        With ``summed=True`` every group has one slot, the sum over its steps
        (per-example gradients hashed exactly are summed before hashing).

        Raises SDIError naming the parameter and step when a feature is not finite.
        """
        cap, sp, fn = self._fn(params, batch, "features", summed)
        out, loss = fn(params, batch)
        if self.check_rows and id(cap) not in self._rows_checked:
            self._check_rows(params, batch, loss)
            self._rows_checked.add(id(cap))
        check_features_finite(out, sp.layout)
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
        checkpoints: Sequence[Checkpoint] | Checkpoint | None = None,
        *,
        example_ids=None,
        progress: bool | None = None,
        summed: bool = False,
    ) -> Features:
        """Per-step features of every example at every checkpoint.

        Args:
            batches: an iterable of batches (pytrees whose leaves have the
                example axis given by ``batch_axes``), or a single batch
                given as a Mapping.  Iterated once per checkpoint.
            checkpoints: :class:`sdi_core.Checkpoint` objects whose ``source``
                is a params pytree (``eta`` defaults to 1.0; the id to
                ``name`` or :func:`sdi_core.checkpoint_id` of the params,
                the same id sdi_torch gives the same weights).  A bare
                pytree is taken as ``Checkpoint(pytree)``.  None: the
                Attributor's ``params`` with ``eta = 1`` (as sdi_torch uses
                the model's current weights).
            example_ids: optional ``[N]`` ints; default ``0 .. N-1``.
            progress: override the Attributor's ``progress``.
            summed: features summed over steps (``[N, 1, D_g]``, ``Features.summed``).

        Returns:
            :class:`sdi_core.Features` with one ``{group: [N, S_g, D_g]}``
            block of jax arrays per checkpoint; ``meta["routes"]`` holds the
            outer-product routes chosen.
        """
        if checkpoints is None:
            if self.params is None:
                raise SDIError("featurize(checkpoints=None) uses the Attributor's params, and none were given: pass "
                               "checkpoints=[sdi_core.Checkpoint(params, eta=...)] or Attributor(..., params=params).")
            checkpoints = [Checkpoint(self.params)]
        ckpts = _as_checkpoints(checkpoints)
        first_key = _struct_key(ckpts[0].source)
        for k, c in enumerate(ckpts[1:], start=1):
            if _struct_key(c.source) != first_key:
                raise SDIError(
                    f"Checkpoint {k}'s params pytree differs from checkpoint 0's: {_tree_diff(ckpts[0].source, c.source)}. "
                    "Every checkpoint must have the same structure, leaf shapes and dtypes (the same model)."
                )
        show = self.progress if progress is None else bool(progress)
        return driver.featurize(_Session(self, ckpts[0].source), batches, ckpts, example_ids=example_ids,
                                summed=summed, progress=show, desc="sdi_jax featurize")


class _Session:
    """The driver's session: nothing to install or restore (pure functions); checkpoints are params pytrees."""

    def __init__(self, attr: Attributor, first) -> None:
        self.attr = attr
        self.first = first
        self.params = None
        self._engines: list = []
        self._coverage = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.params = None

    def load(self, ck: Checkpoint) -> CheckpointInfo:
        self.params = ck.source
        return CheckpointInfo(ck.name or checkpoint_id(named_leaves(ck.source)), 1.0 if ck.eta is None else ck.eta,
                              ck.step)

    def run(self, batch, *, summed: bool) -> driver.BatchFeatures:
        attr = self.attr
        cap = attr.capture_plan(self.params, batch)
        out = attr.featurize_batch(self.params, batch, summed=summed)
        engine = attr.engine(self.params, batch)
        if engine not in self._engines:
            self._engines.append(engine)
        cov = cap.coverage()
        self._coverage = cov if self._coverage is None else self._coverage.merge(cov)
        return driver.BatchFeatures(out, dict(cap.steps), attr.sketch_plan(self.params, batch).layout)

    def meta(self) -> dict:
        routes = {}
        for engine in self._engines:
            routes.update(engine.routes())
        return {"backend": "jax", "routes": routes, "coverage": self._coverage}


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


def _capture_and_sketch(cap: CapturePlan, engine: SketchEngine, summed: bool):
    """The pure per-batch featurisation: params, batch -> ({group: [B, S_g, D_g]}, loss [B])."""
    leaf_to_name = {v: k for k, v in cap.leaf_index.items()}

    def features(params, batch):
        loss, grads, acts = run_capture(cap, params, batch)
        uses = []
        for site in cap.sites:
            steps, kind, a, g = site_arrays(cap, site, grads, acts)
            uses.append(StackedUse(leaf_to_name[site.leaf], kind, a, g, steps))
        state = engine.update(engine.init(int(loss.shape[0]), dict(cap.steps), summed=summed), uses)
        return engine.finalize(state, check_finite=False), loss

    return features
