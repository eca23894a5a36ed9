"""The exact baseline: untie the loop body and take per-example gradients with ``vmap(grad)``.

Independent of :mod:`sdi_jax.capture` (no jaxpr is inspected): the loss is
written once more with one copy of the body's weights per loop step,
``untied_loss_fn(params, loop_copies, batch) -> [B]`` where ``loop_copies[s]``
has the structure of ``loop(params)`` and is used at step ``s`` only.  The
gradient with respect to ``loop_copies[s]`` is then the per-step gradient
``phi_s`` by definition, and ``jax.vmap(jax.grad(...))`` over single examples
makes it per example.  Everything is materialised, so this is for small
models and tests.

:func:`looped_untied_loss` is the untied form of the canonical
:mod:`sdi_jax.models` transformer.
"""

from __future__ import annotations

import warnings

from collections.abc import Mapping
from functools import partial
from typing import Callable, Collection, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdi_core import driver
from sdi_core.factors import ParamInfo, SDIError
from sdi_core.features import Checkpoint, Features
from sdi_core.specs import Exact, SketchPlan

from .attributor import _as_checkpoints, _Session
from .capture import flat_batch_axes, leaf_names, select_leaves

__all__ = ["untied_per_step_gradients", "untied_baseline", "exact_features", "looped_untied_loss"]


def _is_transposed(transposed) -> Callable[[str], bool]:
    if callable(transposed):
        return transposed
    names = set(transposed or ())
    return lambda name: name in names


@partial(jax.jit, static_argnums=(0, 1, 2))
def _untied_grads(untied_loss_fn, b_def, axes, params, copies, mapped, fixed):
    """Per-example gradients w.r.t. params and the loop copies (jitted once per loss and shapes)."""

    def one(ex_mapped):
        it = iter(ex_mapped)
        ex = [x if a is None else jnp.expand_dims(next(it), a) for x, a in zip(fixed, axes)]
        ex = b_def.unflatten(ex)

        def loss(p, c):
            return jnp.reshape(untied_loss_fn(p, c, ex), ())

        return jax.grad(loss, argnums=(0, 1))(params, copies)

    return jax.vmap(one, in_axes=([a for a in axes if a is not None],))(mapped)


def untied_per_step_gradients(
    untied_loss_fn: Callable,
    params,
    batch,
    *,
    loop: Callable,
    tau: int,
    extra: Mapping[str, Callable] | None = None,
    transposed: Collection[str] | Callable[[str], bool] = (),
    batch_axes=0,
) -> dict[str, np.ndarray]:
    """Exact per-example, per-step gradients ``{name: [B, S_g, *canonical shape]}`` (NumPy).

    Args:
        untied_loss_fn: ``(params, loop_copies, batch) -> [B]``, using
            ``loop_copies[s]`` (structure of ``loop(params)``) at loop step
            ``s`` and never the loop leaves of ``params``.
        loop: selector of the loop leaves (as for :class:`sdi_jax.Attributor`).
        tau: number of loop steps (``len(loop_copies)``).
        extra: further single-slot groups, ``{group: selector}``.
        transposed: names (or a predicate on names) of 2-D leaves stored
            ``(d_in, d_out)``; their gradients are transposed to the canonical
            ``(d_out, d_in)``.
        batch_axes: example axis of the batch leaves (``vmap`` style).
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, np.integer)) or tau <= 0:
        raise SDIError(f"tau={tau!r}: the number of loop steps must be a positive int.")
    is_t = _is_transposed(transposed)
    names = leaf_names(params)
    loop_idx = select_leaves(params, loop, "'loop'")
    extra_idx = {g: select_leaves(params, sel, repr(g)) for g, sel in dict(extra or {}).items()}
    copies = [loop(params)] * int(tau)
    axes = flat_batch_axes(batch, batch_axes)
    b_leaves, b_def = jax.tree_util.tree_flatten(batch)
    mapped = [x for x, a in zip(b_leaves, axes) if a is not None]
    fixed = [None if a is not None else x for x, a in zip(b_leaves, axes)]
    g_params, g_copies = _untied_grads(untied_loss_fn, b_def, axes, params, copies, mapped, fixed)
    g_leaves = jax.tree_util.tree_leaves(g_params)
    out: dict[str, np.ndarray] = {}

    def canon(name, g):  # g: [B, S, *stored]
        g = np.asarray(g)
        if g.ndim == 4 and is_t(name):
            g = np.swapaxes(g, -1, -2)
        return g

    per_step = [jax.tree_util.tree_leaves(c) for c in g_copies]
    for j, i in enumerate(loop_idx):
        out[names[i]] = canon(names[i], np.stack([np.asarray(step[j]) for step in per_step], axis=1))
    for idx in extra_idx.values():
        for i in idx:
            out[names[i]] = canon(names[i], np.asarray(g_leaves[i])[:, None])
    return out


def untied_baseline(
    untied_loss_fn: Callable,
    loop: Callable,
    batches,
    *,
    groups: Mapping[str, Callable] | None = None,
    checkpoints: Sequence[Checkpoint] | Checkpoint | None = None,
    tau: int,
    transposed: Collection[str] | Callable[[str], bool] = (),
    params: Sequence[ParamInfo] | None = None,
    batch_axes=0,
    example_ids=None,
    summed: bool = False,
) -> Features:
    """:class:`sdi_core.Features` under :class:`sdi_core.Exact` from untied ``vmap(grad)`` gradients.

    The same name and shared arguments (``loop``, ``groups``, ``checkpoints``,
    ``summed``) as :func:`sdi_torch.untied_baseline`.

    Args:
        untied_loss_fn: ``(params, copies, batch) -> [B]`` with one copy of the
            loop leaves per step (see :func:`untied_per_step_gradients`).
        loop: selector of the looped leaves, ``lambda p: p["block"]``.
        batches: iterable of batches (or one batch as a Mapping).
        groups: further single-slot groups, ``{group: selector}``.
        checkpoints: :class:`sdi_core.Checkpoint` objects of params pytrees.
            Required: a pure JAX loss has no weights of its own (unlike a torch
            model, whose current weights ``None`` means).
        tau: loop steps of the untied loss.
        params: the layout's parameters (names, canonical shapes, groups,
            order); default: every selected leaf, groups in the conventional
            order and leaves in selection order.
        Others: as :func:`untied_per_step_gradients` and
            :meth:`sdi_jax.Attributor.featurize`.
        summed: features summed over steps.

    Returns:
        Features comparable with an Attributor's ``Exact()`` features of the
        tied loss (same checkpoint ids: ``name`` or :func:`sdi_core.checkpoint_id`).
    """
    if checkpoints is None:
        raise SDIError("untied_baseline: pass checkpoints=[sdi_core.Checkpoint(params, eta=...)]; a JAX loss has no "
                       "weights of its own.")
    session = _UntiedSession(untied_loss_fn, _as_checkpoints(checkpoints), loop=loop, tau=tau, extra=groups,
                             transposed=transposed, params=params, batch_axes=batch_axes)
    return driver.featurize(session, batches, session.ckpts, example_ids=example_ids, summed=summed, progress=False)


def exact_features(untied_loss_fn: Callable, batches, checkpoints: Sequence[Checkpoint], *, loop: Callable, tau: int,
                   extra: Mapping[str, Callable] | None = None, **kwargs) -> Features:
    """Deprecated name of :func:`untied_baseline` (a DeprecationWarning; removed in the next release).

    ``extra`` is :func:`untied_baseline`'s ``groups``.
    """
    warnings.warn("sdi_jax.baseline.exact_features is deprecated and will be removed in the next release; use "
                  "sdi_jax.untied_baseline(untied_loss_fn, loop, batches, checkpoints=..., groups=..., tau=...), "
                  "the name sdi_torch uses.", DeprecationWarning, stacklevel=2)
    return untied_baseline(untied_loss_fn, loop, batches, groups=extra, checkpoints=checkpoints, tau=tau, **kwargs)


class _UntiedSession(_Session):
    """The driver's session for the untied baseline: per-step gradients flattened in the Exact layout."""

    def __init__(self, untied_loss_fn, ckpts, *, loop, tau, extra, transposed, params, batch_axes):
        super().__init__(None, ckpts[0].source)
        self.ckpts = ckpts
        self.fn, self.loop, self.tau, self.extra = untied_loss_fn, loop, tau, extra
        self.transposed, self.param_infos, self.batch_axes = transposed, params, batch_axes
        self.plan: SketchPlan | None = None

    def _plan(self, grads) -> SketchPlan:
        if self.plan is None:
            infos = self.param_infos
            if infos is None:
                src, names = self.first, leaf_names(self.first)
                groups = {names[i]: "loop" for i in select_leaves(src, self.loop, "'loop'")}
                for g, sel in dict(self.extra or {}).items():
                    groups.update({names[i]: g for i in select_leaves(src, sel, repr(g))})
                infos = [ParamInfo(n, grads[n].shape[2:], g) for n, g in groups.items()]
            missing = [p.name for p in infos if p.name not in grads]
            if missing:
                raise SDIError(f"exact_features: parameters {missing} are not selected by loop/extra.")
            self.plan = SketchPlan(Exact(), infos)
        return self.plan

    def run(self, batch, *, summed: bool) -> driver.BatchFeatures:
        grads = untied_per_step_gradients(self.fn, self.params, batch, loop=self.loop, tau=self.tau, extra=self.extra,
                                          transposed=self.transposed, batch_axes=self.batch_axes)
        plan = self._plan(grads)
        n = next(iter(grads.values())).shape[0]
        data = {}
        for grp in plan.layout.groups:
            parts = []
            for name in grp.params:
                g = grads[name]
                want = plan.params[name].shape
                if tuple(g.shape[2:]) != tuple(want):
                    raise SDIError(f"exact_features: gradient of {name!r} has canonical shape {g.shape[2:]}, the "
                                   f"layout says {want}; check `transposed`.")
                parts.append(g.reshape(n, g.shape[1], -1))
            flat = np.concatenate(parts, axis=2)
            data[grp.name] = flat.sum(axis=1, keepdims=True) if summed else flat
        steps = {g.name: (int(self.tau) if g.name == "loop" else 1) for g in plan.layout.groups}
        return driver.BatchFeatures(data, steps, plan.layout)

    def meta(self) -> dict:
        return {"backend": "sdi_jax.baseline"}


def looped_untied_loss(config) -> Callable:
    """Untied canonical looped transformer: ``loss(params, blocks, batch) -> [B]``.

    ``blocks[s]`` replaces ``params["block"]`` at loop step ``s`` (``len(blocks)``
    steps are run); everything else is :mod:`sdi_jax.models`' architecture
    (embeddings, prelude, early exit by ``batch["n_steps"]``, input
    injection, coda, head, per-example cross-entropy).
    """
    from . import models

    def loss(params, blocks, batch):
        tokens = jnp.asarray(batch["tokens"])
        n_steps = batch.get("n_steps")
        T = tokens.shape[-1]
        e = params["tok_emb"]["weight"][tokens] + params["pos_emb"]["weight"][:T]
        for i in range(config.n_prelude):
            e = models.block_apply(params["prelude"][str(i)], e, None, config)
        h = jnp.zeros_like(e) if config.input_injection else e
        for s, bp in enumerate(blocks):
            out = models.block_apply(bp, h, e if config.input_injection else None, config)
            h = out if n_steps is None else jnp.where((jnp.asarray(n_steps) > s)[:, None, None], out, h)
        for i in range(config.n_coda):
            h = models.block_apply(params["coda"][str(i)], h, None, config)
        p = params["ln_f"]
        mu = h.mean(-1, keepdims=True)
        var = ((h - mu) ** 2).mean(-1, keepdims=True)
        f = (h - mu) * jax.lax.rsqrt(var + config.ln_eps) * p["weight"] + p["bias"]
        logits = f @ params["tok_emb"]["weight"].T if config.tie_embeddings else f @ params["head"]["weight"]
        return models.per_example_cross_entropy(logits, batch["targets"])

    return loss
