"""The capture session: install the capture on a model, run batches through it, restore everything.

:class:`FactorCapture` switches the parameters' ``requires_grad`` off, hooks the loop modules (a step is
one call), puts the capture into ``torch.utils.checkpoint``'s recomputation, and runs each batch's
forward and backward pass under the :class:`~sdi_torch.capture.BatchCapture` mode; on exit, even on
error, all of it is undone.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.utils.checkpoint
from torch import nn

from sdi_core import FactorUse, SDIError

from . import example_axis as ex
from .capture import BatchCapture, _Mode, _storage_key, _tensors_deep
from .selection import LOOP, Selection

__all__ = ["FactorCapture", "capture_factors"]


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
