"""The exact untied baseline: ground truth that shares no code with the capture.

The loop body is untied: during its ``s``-th call, the loop module(s) read a
separate copy ``w^(s)`` of every loop parameter (a reparametrisation of the
model for the duration of the call), and per-example gradients with respect to
all copies are taken with ``torch.func.vmap(torch.func.grad(...))``.  The
gradient with respect to ``w^(s)`` is the per-step gradient ``phi_s``; there
is no hook, no factor and no sketch anywhere on this path.

It is slow (a full per-example gradient per step) and meant for tests and
small models.  It needs ``loop`` given as module(s), control flow that does
not depend on the data (so every example runs the same number of loop calls),
and batches whose tensors have the examples on their leading axis.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module  # what torch.func.functional_call uses
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from sdi_core import Checkpoint, Exact, Features, SDIError, SketchPlan, driver

from .attributor import ModelSession, _checkpoint_list
from .selection import LOOP, Selection, resolve_selection

__all__ = ["untied_gradients", "untied_baseline"]


def _count_calls(model: nn.Module, modules: Sequence[nn.Module], loss_fn: Callable, batch) -> int:
    calls = {m: 0 for m in modules}
    depth = {m: 0 for m in modules}

    def pre(m, args):
        if depth[m] == 0:
            calls[m] += 1
        depth[m] += 1

    def post(m, args, out):
        depth[m] -= 1

    handles = []
    try:
        for m in modules:
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post, always_call=True))
        with torch.no_grad():
            loss_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
    counts = {c for c in calls.values() if c > 0}  # uncalled modules only lend weights to the body
    if len(counts) != 1:
        raise SDIError(
            f"untied_baseline: the loop modules must be called (equally often); call counts {list(calls.values())}."
        )
    return counts.pop()


def untied_gradients(model: nn.Module, loop: Any, loss_fn: Callable, batch, *, groups=None, chunk_size=None,
                     selection: Selection | None = None) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Exact per-example, per-step gradients of one batch by untying the loop.

    Args:
        model, loop, loss_fn, groups: as for :class:`sdi_torch.Attributor`
            (``loop`` must contain at least one module).
        batch: a pytree of tensors with the examples on the leading axis
            (NumPy arrays are converted to tensors).
        chunk_size: examples per vectorised chunk (``torch.func.vmap``).

    Returns:
        ``(grads, steps)``: ``grads[name]`` is ``[B, S_g, *shape]`` for every
        selected parameter, ``steps`` is ``{group: S_g}``.
    """
    sel = selection or resolve_selection(model, loop, groups)
    if sel.loop_by_uses:
        raise SDIError("untied_baseline needs the loop as module(s) (a step = one call); got parameters only.")
    modules = sel.loop_modules
    leaves, spec = tree_flatten(batch)
    leaves = [torch.as_tensor(x) if isinstance(x, np.ndarray) else x for x in leaves]
    batch = tree_unflatten(leaves, spec)
    tau = _count_calls(model, modules, loss_fn, batch)
    loop_names = sel.names_in(LOOP)
    other_names = [p.name for p in sel.infos if p.group != LOOP]
    base = {n: p.detach() for n, p in sel.params.items()}
    step_params = [{n: base[n].clone() for n in loop_names} for _ in range(tau)]
    group_params = {n: base[n] for n in other_names}

    def loss_one(group_params, step_params, example):
        one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, example)
        counters = {m: 0 for m in modules}
        originals = {}

        def untied(m, orig):
            depth = [0]

            def forward(*args, **kwargs):
                if depth[0]:
                    return orig(*args, **kwargs)
                s = counters[m]
                counters[m] += 1
                depth[0] += 1
                try:
                    with _reparametrize_module(model, step_params[s], tie_weights=True):
                        return orig(*args, **kwargs)
                finally:
                    depth[0] -= 1

            return forward

        try:
            for m in modules:
                originals[m] = m.forward
                m.forward = untied(m, m.forward)
            with _reparametrize_module(model, group_params, tie_weights=True):
                loss = loss_fn(model, one)
        finally:
            for m in originals:
                del m.forward  # the instance attribute; the class's forward shows through again
        if loss.shape != (1,):
            raise SDIError(f"untied_baseline: loss_fn returned shape {tuple(loss.shape)} for one example, expected (1,).")
        return loss[0]

    in_dims = tree_map(lambda t: 0 if isinstance(t, torch.Tensor) else None, batch)
    grad_fn = torch.func.grad(loss_one, argnums=(0, 1))
    g_groups, g_steps = torch.func.vmap(grad_fn, in_dims=(None, None, in_dims), chunk_size=chunk_size)(
        group_params, step_params, batch
    )
    grads = {n: g_groups[n].unsqueeze(1) for n in other_names}
    for n in loop_names:
        grads[n] = torch.stack([g_steps[s][n] for s in range(tau)], 1) if tau else None
    steps = {g: 1 for g in sel.groups}
    if LOOP in steps:
        steps[LOOP] = tau
    return grads, steps


class _UntiedSession(ModelSession):
    """The driver's session for the untied baseline: per-step gradients flattened in the Exact layout."""

    def __init__(self, model, loop, loss_fn, sel: Selection, plan: SketchPlan, *, restore: bool, chunk_size):
        super().__init__(model, restore=restore)
        self.loop, self.loss_fn, self.sel, self.plan, self.chunk_size = loop, loss_fn, sel, plan, chunk_size

    def run(self, batch, *, summed: bool) -> driver.BatchFeatures:
        grads, steps = untied_gradients(self.model, self.loop, self.loss_fn, batch, chunk_size=self.chunk_size,
                                        selection=self.sel)
        data = {}
        for g in self.plan.layout.groups:
            flat = torch.cat([grads[n].reshape(grads[n].shape[0], grads[n].shape[1], -1) for n in g.params], 2)
            data[g.name] = (flat.sum(1, keepdim=True) if summed else flat).detach()
        return driver.BatchFeatures(data, steps, self.plan.layout)

    def meta(self) -> dict:
        return {"backend": self.backend, "baseline": "untied"}


def untied_baseline(
    model: nn.Module,
    loop: Any,
    loss_fn: Callable,
    batches: Iterable,
    *,
    groups: Mapping[str, Any] | None = None,
    checkpoints: Sequence[Checkpoint] | Checkpoint | None = None,
    chunk_size: int | None = None,
    summed: bool = False,
) -> Features:
    """Exact per-step features (``sdi_core.Exact`` layout) from untied per-example gradients.

    Same arguments and checkpoint handling as :meth:`sdi_torch.Attributor.featurize`
    (weights restored afterwards, eval mode during the computation, the same
    checkpoint ids).

    Returns:
        :class:`sdi_core.Features` whose per-checkpoint arrays are
        ``{group: [N, S_g, numel_g]}``, the flattened per-step gradients
        (summed over steps with ``summed=True``).
    """
    sel = resolve_selection(model, loop, groups)
    plan = SketchPlan(Exact(), sel.infos)
    ckpts = _checkpoint_list(checkpoints)
    session = _UntiedSession(model, loop, loss_fn, sel, plan, restore=ckpts is not None, chunk_size=chunk_size)
    return driver.featurize(session, batches, ckpts, summed=summed, progress=False, default_ids=False)
