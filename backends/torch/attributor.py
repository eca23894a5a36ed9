"""``sdi_torch.Attributor``: per-step features of any looped PyTorch model."""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from sdi_core import Checkpoint, CheckpointInfo, Exact, Features, SDIError, SketchEngine, SketchPlan, TensorSketch
from sdi_core import driver
from sdi_core.weights import checkpoint_id

from .capture import FactorCapture
from .selection import Selection, resolve_selection

__all__ = ["Attributor", "ModelSession", "load_checkpoint"]


class Attributor:
    """Step-decomposed features of a looped PyTorch model, one batch at a time.

    Example::

        attr = sdi_torch.Attributor(model, loop=model.block, loss_fn=per_example_loss,
                                    sketch=sdi_core.TensorSketch(dim=4096, seed=0),
                                    groups={"prelude": [model.tok_emb], "coda": [model.head]})
        train = attr.featurize(train_batches, checkpoints=ckpts)   # sdi_core.Features
        query = attr.featurize(query_batches, checkpoints=ckpts)
        res = sdi_core.influence(train, query)   # res.trajectory [N_train, N_query, S_query]

    Args:
        model: any ``nn.Module``.
        loop: what the loop steps are made of.

            - a module (``model.block``), or a list of modules: a step is one
              call of that module, and every use of one of its parameters
              inside that call belongs to that step, however many times the
              body uses it.  Several modules must be called equally often
              (e.g. ``[model.attn, model.mlp]`` called once per step each).
            - parameters (or dotted names) only: the ``k``-th use of each
              parameter is step ``k``; all of them must be used equally often.
            - a mix, e.g. ``[model.body, model.proj]``: parameters outside the
              called module(s) (a weight the body borrows from another module
              through ``F.linear``) belong to the step of the call they are
              used in; a listed module that is never called only lends its
              parameters.  A loop parameter used outside every loop call is
              an error (its step would be ambiguous).

            The loop parameters form the group ``"loop"`` with one slot per step.
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``: per-example losses
            (not their mean).  Rows must be independent (no batch norm in
            train mode).
        sketch: :class:`sdi_core.TensorSketch` (default ``dim=4096, seed=0``) or
            :class:`sdi_core.Exact`.
        groups: parameters used outside the loop, each group one extra slot
            (step 0), e.g. ``{"prelude": [model.tok_emb, model.pos_emb],
            "coda": [model.ln_f, model.head]}`` (modules, parameters or dotted
            names).  A tied embedding/unembedding goes in one group; both its
            uses land in that group's slot.
        steps: the number of loop steps: every batch's loop axis is padded
            to this many (default: the most steps any batch ran).  Same name
            and place as in sdi_jax; ``featurize(steps=)`` is deprecated.
        train_mode: featurise in train mode (dropout on).  Default False: a
            model in train mode is switched to eval mode for featurisation,
            with a warning, and switched back afterwards.
        batch_size: callable ``batch -> B`` (or an int), used only when a use
            does not depend on the batch (e.g. ``pos_emb(arange(T))``) and
            the leading size of the first tensor in the batch is not ``B``.
        progress: show tqdm progress bars over checkpoints and batches.
        fast_path: sketch with the engine's native torch kernels (default);
            False uses its portable array-API kernels (same features to
            rounding; for testing).
        check_rows: on the first batch of every shape in each
            :meth:`featurize` call, featurise its first and last example on
            their own and compare them with their rows of the batch run; a
            mismatch (a mis-tracked example axis, batch norm in train mode, a
            batch-level reduction) raises an error naming the example.  Costs
            one forward + backward of two examples per batch shape.  A batch
            is split by slicing axis 0 of every tensor with one row per
            example; other leaves are passed to both runs unchanged.  Default
            (None): on, except with ``train_mode=True``, where dropout makes
            the two runs differ by chance.
        fallback: what to do with a use of a selected parameter that has no
            factor form (an ``einsum`` that is no linear map, ``F.batch_norm``
            with its affine weight, ``x / w``, any other torch function):
            ``"dense"`` (default) takes its exact per-example gradient with
            ``torch.func`` (a ``vmap`` of a ``vjp`` over that call; costs one
            more pass through the call, and ``B x numel`` memory for that
            parameter); ``"error"`` refuses, naming the parameter and the op.

    Attributes:
        selection: the resolved parameters (``.infos``: ``ParamInfo`` list).
        plan: the :class:`sdi_core.SketchPlan` (layout and sketch specs).
        engine: the :class:`sdi_core.SketchEngine` the uses are streamed to
            (it keeps the workspace and the route choices between calls).

    Canonical shapes are the stored shapes (``nn.Linear``: ``(d_out, d_in)``).
    The batch's tensors hold one example per index of axis 0; inside the
    model the examples may lie on any axis, which the capture follows by
    provenance (:mod:`sdi_torch.example_axis`), never by size.  See
    :mod:`sdi_torch.capture` for the uses it factors (others: ``fallback``);
    ``Features.meta["coverage"]`` says what was captured.  The capture
    holds a reference to each use's input until its gradient arrives, as
    autograd does for a weight that requires grad, so featurisation needs
    about the memory of one forward + backward pass.
    Nothing is left behind on the model: hooks are removed and parameters,
    ``requires_grad`` flags, ``.grad`` and train/eval mode are restored on
    exit, even on error.
    """

    def __init__(
        self,
        model: nn.Module,
        loop: Any,
        loss_fn: Callable,
        sketch: TensorSketch | Exact | None = None,
        *,
        groups: Mapping[str, Any] | None = None,
        steps: int | None = None,
        train_mode: bool = False,
        batch_size: Callable | int | None = None,
        progress: bool = True,
        fast_path: bool = True,
        check_rows: bool | None = None,
        fallback: str = "dense",
    ) -> None:
        if not callable(loss_fn):
            raise SDIError(f"loss_fn must be callable as loss_fn(model, batch) -> Tensor[B], got {type(loss_fn).__name__}.")
        self.model = model
        self.loss_fn = loss_fn
        self.sketch = TensorSketch(dim=4096, seed=0) if sketch is None else sketch
        self.selection: Selection = resolve_selection(model, loop, groups)
        self.plan = SketchPlan(self.sketch, self.selection.infos)
        self.train_mode = bool(train_mode)
        self.batch_size = batch_size
        self.progress = progress
        self.fast = bool(fast_path)
        if fallback not in ("dense", "error"):
            raise SDIError(f"fallback must be 'dense' or 'error', got {fallback!r}.")
        self.fallback = fallback
        self.check_rows = (not self.train_mode) if check_rows is None else bool(check_rows)
        self.steps = _check_steps(steps)
        self.engine = SketchEngine(self.plan, method="auto" if self.fast else "portable")
        self._weights_id = None

    def __repr__(self) -> str:
        return f"Attributor({type(self.model).__name__}, {self.plan!r})"

    @property
    def params(self):
        """The selected parameters as ``sdi_core.ParamInfo`` (layout order)."""
        return list(self.selection.infos)

    # ------------------------------------------------------------------ featurize
    def featurize(
        self,
        batches: Iterable,
        checkpoints: Sequence[Checkpoint] | Checkpoint | None = None,
        *,
        steps: int | None = None,
        example_ids: Sequence[int] | None = None,
        progress: bool | None = None,
        summed: bool = False,
    ) -> Features:
        """Per-step features of every example of ``batches`` at every checkpoint.

        Args:
            batches: an iterable of batches (anything ``loss_fn`` accepts),
                or one batch given as a mapping; re-iterated once per
                checkpoint (an iterator is materialised into a list when
                there are several checkpoints).
            checkpoints: :class:`sdi_core.Checkpoint` list; ``source`` is a
                path (``torch.load(weights_only=True)``; a dict holding
                ``"state_dict"`` or ``"model"`` plus optional ``"lr"`` and
                ``"step"``, whose ``lr`` is the default ``eta``) or a
                ``state_dict``.  None: the current weights with ``eta = 1``.
                Weights are loaded into the model and restored afterwards.
                An unnamed checkpoint's id is :func:`sdi_core.checkpoint_id`
                of its weights (the same id sdi_jax gives the same weights).
            steps: deprecated (a DeprecationWarning; removed in the next
                release): pass ``steps`` to the Attributor instead.
            example_ids: optional integer ids, one per example (default: none).
            progress: override the Attributor's ``progress``.
            summed: return features summed over steps (``[N, 1, D_g]``,
                ``Features.summed``): the train side of the query-step
                trajectory and TracIn.  Per-example gradients hashed exactly
                are summed over the steps first and hashed once.

        Returns:
            :class:`sdi_core.Features`: per checkpoint, ``{group: [N, S_g, D_g]}``
            torch tensors (float32, or float64 for float64 models);
            ``meta["routes"]`` holds the outer-product route of each
            TensorSketched linear parameter (see :class:`sdi_core.SketchEngine`).

        Raises:
            SDIError: a loss of the wrong shape, NaN/inf losses or gradients
                (naming the batch and the parameter), checkpoint keys that do
                not match the model, a loop selection never used or used
                unevenly, an operation the capture does not understand.
        """
        ckpts = _checkpoint_list(checkpoints)
        if not self.train_mode and any(m.training for m in self.model.modules()):
            warnings.warn(
                "The model is in train mode; featurising in eval mode (dropout off) and restoring train mode "
                "afterwards. Pass train_mode=True to featurise in train mode.",
                stacklevel=2,
            )
        show = self.progress if progress is None else progress
        if steps is not None:
            warnings.warn("Attributor.featurize(steps=...) is deprecated and will be removed in the next release; "
                          "pass steps=... to the Attributor (as in sdi_jax).", DeprecationWarning, stacklevel=2)
        return self._featurize(batches, ckpts, steps=steps, example_ids=example_ids, summed=summed, progress=show)

    def _featurize(self, batches, ckpts, *, steps, example_ids, summed, progress) -> Features:
        """:meth:`featurize` after its checks; ``steps`` None: the Attributor's own."""
        steps = self.steps if steps is None else _check_steps(steps)
        return driver.featurize(_CaptureSession(self, restore=ckpts is not None), batches, ckpts, steps=steps,
                                example_ids=example_ids, summed=summed, progress=progress, desc="sdi_torch batches",
                                default_ids=False)

    def _current_weights_id(self) -> str:
        """The id of the current weights, recomputed only when a tensor was replaced or updated in place."""
        state = self.model.state_dict(keep_vars=True)
        key = tuple((k, v.data_ptr(), v._version, tuple(v.shape), v.dtype) for k, v in state.items())
        if self._weights_id is None or self._weights_id[0] != key:
            self._weights_id = (key, checkpoint_id(state))
        return self._weights_id[1]


class ModelSession:
    """A model's weights and train/eval modes held for one featurize call (the driver's session, see
    :mod:`sdi_core.driver`): modes switched to eval unless ``train_mode``, weights saved when checkpoints
    will overwrite them, and both restored on exit, even on error.  Subclasses define :meth:`run`.
    """

    backend = "torch"

    def __init__(self, model: nn.Module, *, restore: bool, train_mode: bool = False,
                 current_id: Callable[[], str] | None = None) -> None:
        self.model = model
        self.restore = restore
        self.train_mode = train_mode
        self.current_id = current_id or (lambda: checkpoint_id(model.state_dict()))
        self._modes: dict = {}
        self._original = None

    def __enter__(self):
        self._modes = {m: m.training for m in self.model.modules()}
        if not self.train_mode:
            self.model.eval()
        if self.restore:
            self._original = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return self

    def __exit__(self, *exc) -> None:
        if self._original is not None:
            self.model.load_state_dict(self._original)
            self._original = None
        for m, flag in self._modes.items():
            m.training = flag

    def load(self, checkpoint: Checkpoint | None) -> CheckpointInfo:
        if checkpoint is None:
            return CheckpointInfo(self.current_id(), 1.0, None)
        return load_checkpoint(self.model, checkpoint)

    def run(self, batch, *, summed: bool) -> driver.BatchFeatures:
        raise NotImplementedError

    def meta(self) -> dict:
        return {"backend": self.backend}


class _CaptureSession(ModelSession):
    """The Attributor's session: the factor capture installed, uses streamed into the engine."""

    def __init__(self, attr: Attributor, *, restore: bool) -> None:
        super().__init__(attr.model, restore=restore, train_mode=attr.train_mode, current_id=attr._current_weights_id)
        self.attr = attr
        self._capture: FactorCapture | None = None
        self._rows_checked: set = set()
        self._coverage = None

    def __enter__(self):
        super().__enter__()
        try:
            self._capture = FactorCapture(self.model, self.attr.selection, batch_size=self.attr.batch_size,
                                          fallback=self.attr.fallback).__enter__()
        except BaseException:
            super().__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.attr.engine.release()
            if self._capture is not None:
                self._capture.__exit__(*exc)
        finally:
            self._capture = None
            super().__exit__(*exc)

    def run(self, batch, *, summed: bool) -> driver.BatchFeatures:
        data, steps, n = self._features(batch, summed)
        if self.attr.check_rows and n > 1:
            key = _shape_signature(batch)
            if key not in self._rows_checked:
                self._check_rows(batch, data, steps, n, summed)
                self._rows_checked.add(key)
        return driver.BatchFeatures(data, steps, self.attr.plan.layout)

    def _features(self, batch, summed: bool):
        engine = self.attr.engine
        box: dict = {}

        def on_loss(loss, steps):
            if not bool(torch.isfinite(loss).all()):
                bad = torch.nonzero(~torch.isfinite(loss)).flatten().tolist()
                raise SDIError(
                    f"the loss is NaN or inf for examples {bad[:10]} (positions in the batch). Check those inputs "
                    "and the checkpoint's weights."
                )
            box["state"] = engine.init(int(loss.shape[0]), steps, summed=summed)
            box["n"] = int(loss.shape[0])

        def on_use(use):
            box["state"] = engine.update(box["state"], use)

        res = self._capture.run(self.attr.loss_fn, batch, on_use, on_loss)
        cov = res["coverage"]
        self._coverage = cov if self._coverage is None else self._coverage.merge(cov)
        return engine.finalize(box["state"]), res["steps"], box["n"]

    def _check_rows(self, batch, data, steps, n, summed) -> None:
        """The first and last example featurised alone must equal their rows of the batch run."""
        for i in (0, n - 1):
            one = _example(batch, i, n)
            got, got_steps, m = self._features(one, summed)
            if m != 1:
                raise SDIError(
                    f"check_rows: the batch sliced to its example {i} (axis 0 of every tensor with {n} rows) gave "
                    f"{m} losses, not 1, so the batch cannot be split into examples that way. Pass "
                    "check_rows=False to the Attributor."
                )
            for g, full in data.items():
                row, alone = full[i], got[g][0]
                s = min(row.shape[0], alone.shape[0])
                extra = max(float(row[s:].abs().max(initial=0.0)) if row.shape[0] > s else 0.0,
                            float(alone[s:].abs().max(initial=0.0)) if alone.shape[0] > s else 0.0)
                diff = (row[:s].double() - alone[:s].double()).abs()
                scale = max(float(row.abs().max()), float(alone.abs().max()), 1e-30)
                tol = 1e-8 if row.dtype == torch.float64 else 1e-3
                err = max(float(diff.max()) if diff.numel() else 0.0, extra) / scale
                if err > tol:
                    step = int(diff.amax(-1).argmax()) if diff.numel() else s
                    raise SDIError(
                        f"check_rows: example {i} of a batch of {n} featurised on its own differs from its row of "
                        f"the batch run (group {g!r}, step slot {step}: relative difference {err:.3g}). The "
                        "examples of the batch interact, so per-example gradients are not what the batch run "
                        "computes. Likely causes: 1. batch norm (or another layer using batch statistics) in train "
                        "mode; 2. a batch-level reduction in the model or loss_fn (a mean over the batch, a "
                        "normalisation by a batch-wide token count); 3. the example axis mis-tracked by sdi_torch "
                        "(please report the model). Fix the model or loss so every example is computed from its "
                        "own inputs, or pass check_rows=False to skip this check."
                    )

    def meta(self) -> dict:
        cov = self._coverage
        if cov is not None and cov.unused:
            warnings.warn(
                f"Selected parameter(s) {cov.unused[:8]}{' ...' if len(cov.unused) > 8 else ''} are never used "
                "with gradients enabled in the forward pass; their features are zero. Leave them out of the "
                "selection (select parameters or submodules instead of the whole module) if that is not meant. "
                "Features.meta['coverage'].describe() shows what was captured.",
                stacklevel=4,
            )
        return {"backend": self.backend, "routes": self.attr.engine.routes(), "coverage": cov}


def _shape_signature(batch) -> tuple:
    """The shapes (and dtypes) of a batch's tensors, in a fixed order: batches alike get one row check."""
    from torch.utils._pytree import tree_flatten

    leaves, spec = tree_flatten(batch)
    return (str(spec),) + tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
                                for x in leaves)


def _example(batch, i: int, n: int):
    """Example ``i`` of ``batch`` as a batch of one: ``[i:i+1]`` of every tensor with ``n`` rows."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda x: x[i:i + 1] if isinstance(x, torch.Tensor) and x.ndim >= 1 and x.shape[0] == n else x,
                    batch)


def _check_steps(steps):
    if steps is None:
        return None
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0:
        raise SDIError(f"steps={steps!r}: the number of loop steps must be a positive int (or None).")
    return int(steps)


def _checkpoint_list(checkpoints) -> list[Checkpoint] | None:
    if checkpoints is None:
        return None
    if isinstance(checkpoints, Checkpoint):
        return [checkpoints]
    out = list(checkpoints)
    if not out:
        raise SDIError("checkpoints is empty; pass None for the current weights or a list of sdi_core.Checkpoint.")
    for c in out:
        if not isinstance(c, Checkpoint):
            raise SDIError(
                f"checkpoints must be sdi_core.Checkpoint(source, eta=...) objects, got {type(c).__name__}."
            )
    return out


def load_checkpoint(model: nn.Module, ckpt: Checkpoint) -> CheckpointInfo:
    """Load ``ckpt`` into ``model`` and return its identity and eta (see :meth:`Attributor.featurize`)."""
    src = ckpt.source
    path = None
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.exists(path):
            raise SDIError(f"Checkpoint file {path!r} does not exist.")
        try:
            src = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise SDIError(
                f"Checkpoint {path!r} could not be loaded with torch.load(weights_only=True): {exc}. Save a "
                "state_dict (or a dict of tensors and numbers) with torch.save."
            ) from None
    if not isinstance(src, Mapping):
        raise SDIError(
            f"Checkpoint source must be a path or a state_dict (a mapping of names to tensors), got {type(src).__name__}."
        )
    lr = src.get("lr") if not isinstance(src.get("lr"), torch.Tensor) else float(src["lr"])
    if ckpt.eta is None and lr is not None and not (
            isinstance(lr, (int, float)) and not isinstance(lr, bool) and 0 < lr < float("inf")):  # NaN fails too
        raise SDIError(
            f"Checkpoint {ckpt.name or path or '(state_dict)'} records lr={lr!r}, which is not a finite positive "
            "number and cannot be TracIn's eta. Pass the learning rate explicitly (Checkpoint(..., eta=...)) or "
            "fix the checkpoint."
        )
    step = src.get("step")
    state = src
    for key in ("state_dict", "model"):
        if isinstance(src.get(key), Mapping):
            state = src[key]
            break
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise SDIError(
            f"Checkpoint {ckpt.name or path or '(state_dict)'} does not match the model: missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}. Save it with model.state_dict() of this architecture "
            "(strip prefixes such as 'module.' from DataParallel)."
        )
    for k, v in expected.items():
        got = state[k]
        if isinstance(got, torch.Tensor) and tuple(got.shape) != tuple(v.shape):
            raise SDIError(f"Checkpoint tensor {k!r} has shape {tuple(got.shape)}, the model expects {tuple(v.shape)}.")
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    eta = ckpt.eta
    if eta is None:
        eta = float(lr) if isinstance(lr, (int, float)) and lr > 0 else 1.0
    # A file is identified by the weights it holds now (an overwritten file gets a new id), never by its path.
    ck_id = ckpt.name or checkpoint_id(state)
    if ckpt.step is not None:
        step = ckpt.step
    elif isinstance(step, torch.Tensor):
        step = int(step)
    return CheckpointInfo(ck_id, float(eta), None if step is None else int(step))
