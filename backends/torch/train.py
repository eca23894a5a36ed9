"""Train a looped model and save checkpoints that SDI can attribute through.

:func:`train` is a plain loop: AdamW (or SGD), linear warm-up then cosine
decay to ``min_lr_ratio * lr``, gradient clipping, a tqdm progress bar, and
``n_checkpoints`` checkpoints spread evenly over the run.  Each checkpoint is
a ``torch.save`` file holding

- ``"state_dict"``: the model weights,
- ``"step"``: the optimiser step the weights were taken after,
- ``"lr"``: the learning rate in force at that step (TracIn's ``eta_k``),
- ``"config"``: the model's :class:`~sdi_core.reference.looped_transformer.LoopedConfig`
  as a plain dict (so :func:`load_model` rebuilds the model),

plus ``"train_config"`` (this module's :class:`TrainConfig` as a dict).  Every
value is a tensor, number, string, bool or dict of those, so the files load
with ``torch.load(path, weights_only=True)``.

The learning rate never decays to zero (``min_lr_ratio > 0``) because a
checkpoint's ``eta`` must be positive.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from sdi_core.factors import SDIError
from sdi_core.features import Checkpoint
from sdi_core.app.training import OPTIMIZERS, SCHEDULES, BatchOrder, TrainConfig, checkpoint_steps, learning_rate
from sdi_core.reference.looped_transformer import LoopedConfig

__all__ = [
    "TrainConfig",
    "TrainResult",
    "SavedCheckpoint",
    "train",
    "evaluate",
    "learning_rate",
    "load_model",
    "load_checkpoint",
    "save_checkpoint",
    "checkpoint_steps",
]



@dataclass(frozen=True)
class SavedCheckpoint:
    """Where a checkpoint was written and what it records."""

    path: Path
    step: int
    lr: float

    def checkpoint(self, eta: float | None = None) -> Checkpoint:
        """An :class:`sdi_core.Checkpoint` of this file (``eta`` defaults to the recorded ``lr``).

        Unnamed, so that its id is a hash of the weights the file holds when it is loaded: a file
        overwritten between featurising the train and the query side is not mistaken for the same
        checkpoint.
        """
        return Checkpoint(str(self.path), eta=self.lr if eta is None else eta, step=self.step)


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        checkpoints: the saved checkpoints, in step order.
        losses: ``[steps]`` mean training loss of each step's batch.
        lrs: ``[steps]`` learning rate used at each step.
        evals: ``(step, loss, accuracy)`` on ``eval_data`` at each evaluation.
        seconds: wall time of the loop (evaluations and saving included).
    """

    checkpoints: list[SavedCheckpoint]
    losses: np.ndarray
    lrs: np.ndarray
    evals: list[tuple[int, float, float]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final_accuracy(self) -> float:
        """Accuracy of the last evaluation (NaN when there was none)."""
        return self.evals[-1][2] if self.evals else float("nan")

    def sdi_checkpoints(self) -> list[Checkpoint]:
        """The checkpoints as :class:`sdi_core.Checkpoint` objects (eta = recorded lr)."""
        return [c.checkpoint() for c in self.checkpoints]


def _as_batch(data: Any, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """TaskData or a mapping with ``tokens``/``targets`` (optional ``n_steps``, ``example_weight``) -> tensors."""
    weight = None
    if hasattr(data, "tokens") and hasattr(data, "targets"):
        arrays = {"tokens": data.tokens, "targets": data.targets}
    elif isinstance(data, Mapping) and "tokens" in data and "targets" in data:
        arrays = {k: data[k] for k in ("tokens", "targets", "n_steps") if k in data}
        weight = data.get("example_weight")
    else:
        raise SDIError(
            f"train data must be sdi_core.app.tasks.TaskData or a dict with 'tokens' and 'targets' "
            f"([N, T] int arrays); got {type(data).__name__}."
        )
    out = {}
    for k, v in arrays.items():
        t = torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v)
        if t.dtype not in (torch.int64, torch.int32):
            raise SDIError(f"train data {k!r} must be integer token ids, got dtype {t.dtype}.")
        out[k] = t.to(device=device, dtype=torch.int64)
    if out["tokens"].ndim != 2 or out["tokens"].shape != out["targets"].shape:
        raise SDIError(
            f"train data: tokens and targets must both be [N, T]; got {tuple(out['tokens'].shape)} "
            f"and {tuple(out['targets'].shape)}."
        )
    if out["tokens"].shape[0] == 0:
        raise SDIError("train data is empty: pass at least one example.")
    if weight is not None:
        w = torch.as_tensor(np.asarray(weight, dtype=np.float64), device=device)
        if w.shape != out["tokens"].shape[:1] or not bool(torch.all(torch.isfinite(w) & (w >= 0))):
            raise SDIError(f"train data 'example_weight' must be [N] = [{out['tokens'].shape[0]}] finite "
                           f"non-negative numbers, got shape {tuple(w.shape)}.")
        if not bool(w.any()):
            raise SDIError("train data 'example_weight' is zero everywhere: nothing would be trained on.")
        out["example_weight"] = w
    return out


def _default_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    from .models import per_example_loss

    return per_example_loss(model, batch)


def _model_config_dict(model: torch.nn.Module) -> dict | None:
    cfg = getattr(model, "config", None)
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, step: int, lr: float, **extra: Any) -> Path:
    """Write ``{"state_dict", "step", "lr", "config", **extra}`` to ``path`` with ``torch.save``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {"state_dict": state, "step": int(step), "lr": float(lr), "config": _model_config_dict(model)}
    payload.update(extra)
    torch.save(payload, path)
    return path


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """Rebuild the looped model saved by :func:`train` (``sdi_torch.load_checkpoint`` instead loads a
    checkpoint into a model you already have).

    Returns:
        ``(model, info)``: a :class:`sdi_torch.models.LoopedGPT` in eval mode
        holding the checkpoint's weights (cast to ``dtype`` when given), and
        the file's other entries (``step``, ``lr``, ``config``, ...).
    """
    from .models import LoopedGPT

    path = Path(path)
    if not path.is_file():
        raise SDIError(f"Checkpoint {str(path)!r} does not exist; pass a file written by sdi_torch.train.")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or "state_dict" not in payload or not payload.get("config"):
        raise SDIError(
            f"{str(path)!r} is not an sdi_torch.train checkpoint (needs 'state_dict' and 'config' entries)."
        )
    config = LoopedConfig(**payload["config"])
    model = LoopedGPT(config)
    model.load_state_dict(payload["state_dict"])
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    info = {k: v for k, v in payload.items() if k != "state_dict"}
    return model, info


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """Deprecated name of :func:`load_model` (a DeprecationWarning; removed in the next release).

    ``sdi_torch.load_checkpoint(model, checkpoint)`` is the one function of that name.
    """
    import warnings

    warnings.warn("sdi_torch.train.load_checkpoint is deprecated and will be removed in the next release; use "
                  "sdi_torch.train.load_model(path) (it rebuilds the model). sdi_torch.load_checkpoint(model, "
                  "checkpoint) loads a checkpoint into an existing model.", DeprecationWarning, stacklevel=2)
    return load_model(path, dtype)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: Any,
    task: Any = None,
    loss_fn: Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
    batch_size: int = 512,
    tau: int | None = None,
) -> tuple[float, float]:
    """Mean per-example loss and accuracy of ``model`` on ``data``.

    Accuracy is ``task.accuracy(data, logits)`` (every answer position right)
    when ``task`` is given, else the fraction of examples whose every target
    position is predicted right by argmax.  ``tau`` overrides the loop count
    (for models whose ``forward`` takes ``tau=``).
    """
    batch = _as_batch(data, device=_device(model))
    was_training = model.training
    model.eval()
    losses, logits_all = [], []
    n = batch["tokens"].shape[0]
    for lo in range(0, n, batch_size):
        b = {k: v[lo : lo + batch_size] for k, v in batch.items()}
        kwargs = {} if tau is None else {"tau": tau}
        logits = model(b["tokens"], b.get("n_steps"), **kwargs)
        if loss_fn is None:
            from .models import per_example_cross_entropy

            losses.append(per_example_cross_entropy(logits, b["targets"]))
        else:
            losses.append(loss_fn(model, b))
        logits_all.append(logits.float().cpu())
    model.train(was_training)
    logits = torch.cat(logits_all).numpy()
    loss = float(torch.cat(losses).float().mean())
    if task is not None:
        acc = float(task.accuracy(data, logits))
    else:
        targets = batch["targets"].cpu().numpy()
        pred = logits.argmax(-1)
        mask = targets != -100
        acc = float(np.mean(np.all((pred == targets) | ~mask, axis=1)))
    return loss, acc


def _device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def train(
    model: torch.nn.Module,
    data: Any,
    config: TrainConfig | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    eval_data: Any = None,
    task: Any = None,
    loss_fn: Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
    progress: bool = True,
    checkpoint_prefix: str = "ckpt",
    on_eval: Callable[[int, float, float], None] | None = None,
    start_step: int = 0,
) -> TrainResult:
    """Train ``model`` in place on ``data`` and save checkpoints.

    Args:
        model: a ``torch.nn.Module`` (typically :class:`sdi_torch.models.LoopedGPT`),
            trained in its current dtype and device.
        data: the training set: :class:`sdi_core.app.tasks.TaskData` or a dict of
            ``tokens``/``targets`` int arrays ``[N, T]`` (optional ``n_steps [N]``, and
            ``example_weight [N]``: each example's loss is multiplied by it, so weight 0
            leaves an example out while keeping the batch order of the full run).
        config: :class:`TrainConfig` (defaults if None).
        out_dir: folder for the checkpoint files ``{prefix}_{step:06d}.pt``;
            None keeps no files (``result.checkpoints`` is then empty).
        eval_data: held-out data, evaluated every ``config.eval_every`` steps
            and at the end (loss and accuracy, shown on the progress bar).
        task: the :class:`sdi_core.app.tasks.Task`, used for accuracy when given.
        loss_fn: ``loss_fn(model, batch) -> [B]`` per-example losses; defaults to
            :func:`sdi_torch.models.per_example_loss`.  The step minimises their mean.
        progress: show a tqdm progress bar.
        checkpoint_prefix: file name prefix of the checkpoints.
        on_eval: called as ``on_eval(step, loss, accuracy)`` after each evaluation.
        start_step: the step ``model``'s weights were taken after (0: a fresh
            model).  Training resumes at ``start_step + 1`` with the learning
            rate and batch order an uninterrupted run of ``config`` would have
            there (fresh optimiser moments); ``losses``/``lrs`` stay zero for
            the skipped steps.

    Returns:
        :class:`TrainResult` (checkpoints, per-step losses and learning rates,
        evaluations, wall time).
    """
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise SDIError(f"train(config=...) takes sdi_torch.train.TrainConfig, got {type(config).__name__}.")
    if not isinstance(model, torch.nn.Module):
        raise SDIError(f"train(model=...) takes a torch.nn.Module, got {type(model).__name__}.")
    loss_fn = _default_loss if loss_fn is None else loss_fn
    device = _device(model)
    batch_all = _as_batch(data, device=device)
    n = batch_all["tokens"].shape[0]
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise SDIError("train: the model has no trainable parameters.")
    if config.optimizer == "adamw":
        # No weight decay on biases, LayerNorm scales and other 1-D parameters (the usual GPT recipe).
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr,
            betas=config.betas,
        )
    else:
        opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    save_at = set(checkpoint_steps(config.steps, config.n_checkpoints)) if out_dir is not None else set()
    batches = BatchOrder(n, config.batch_size, config.seed)
    losses = np.zeros(config.steps)
    lrs = np.zeros(config.steps)
    evals: list[tuple[int, float, float]] = []
    saved: list[SavedCheckpoint] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, desc="training", unit="step", leave=False, dynamic_ncols=True)
    if isinstance(start_step, bool) or not isinstance(start_step, (int, np.integer)) or not 0 <= start_step < config.steps:
        raise SDIError(f"train(start_step={start_step!r}): must be an integer in [0, steps={config.steps}).")

    next_batch = batches.next

    for _ in range(start_step):  # the batches an uninterrupted run would have drawn before resuming
        next_batch()
    if bar is not None and start_step:
        bar.update(start_step)
    t0 = time.perf_counter()
    model.train()
    try:
        for step in range(start_step + 1, config.steps + 1):
            idx = torch.as_tensor(next_batch(), device=device)
            batch = {k: v[idx] for k, v in batch_all.items()}
            lr = learning_rate(step, config)
            for g in opt.param_groups:
                g["lr"] = lr
            losses_b = loss_fn(model, batch)
            if "example_weight" in batch:
                # Weighted examples keep the batch order and size of the unweighted run: an example of
                # weight 0 is left out of the gradient and nothing else changes (leave-k-out retraining).
                losses_b = losses_b * batch["example_weight"].to(losses_b.dtype)
            loss = losses_b.mean()
            if not torch.isfinite(loss):
                raise SDIError(
                    f"train: the loss became {float(loss.detach())} at step {step}; lower the learning rate "
                    f"(lr={config.lr}) or keep gradient clipping on."
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            losses[step - 1] = float(loss.detach())
            lrs[step - 1] = lr
            if eval_data is not None and (step == config.steps or (config.eval_every and step % config.eval_every == 0)):
                ev_loss, ev_acc = evaluate(model, eval_data, task=task)
                model.train()
                evals.append((step, ev_loss, ev_acc))
                if on_eval is not None:
                    on_eval(step, ev_loss, ev_acc)
            if step in save_at:
                path = Path(out_dir) / f"{checkpoint_prefix}_{step:06d}.pt"
                save_checkpoint(path, model, step, lr, train_config=config.to_dict())
                saved.append(SavedCheckpoint(path, step, lr))
            if bar is not None:
                bar.update(1)
                if step % 20 == 0 or step == config.steps:
                    post = {"loss": f"{np.mean(losses[max(0, step - 20):step]):.3f}", "lr": f"{lr:.1e}"}
                    if evals:
                        post["test_acc"] = f"{evals[-1][2]:.3f}"
                    bar.set_postfix(post, refresh=False)
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    return TrainResult(saved, losses, lrs, evals, time.perf_counter() - t0)
