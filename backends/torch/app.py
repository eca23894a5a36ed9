"""The ``torch`` backend of the ``sdi`` application (entry point ``sdi.backends: torch``).

Importing this module imports no torch: every function imports it when it
runs, so ``sdi --help`` can list the backend without loading the framework.
The model is :class:`sdi_torch.models.LoopedGPT`, trained by
:func:`sdi_torch.train.train` and featurised by :class:`sdi_torch.Attributor`.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any, Mapping, Sequence

import numpy as np

from sdi_core.app.backends import Backend, TrainedModel
from sdi_core.factors import SDIError

__all__ = ["BACKEND", "side_groups"]


def build_model(config, seed: int = 0):
    """A :class:`~sdi_torch.models.LoopedGPT` with seeded initial weights (the caller's RNG is left alone)."""
    import torch

    from .models import LoopedGPT

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LoopedGPT(config)


def train(model, data: Mapping[str, np.ndarray], config, *, out_dir=None, eval_data=None, task=None,
          progress: bool = False) -> TrainedModel:
    """:func:`sdi_torch.train.train`; checkpoints are the ``.pt`` files (eta = the recorded lr)."""
    from .train import train as torch_train

    result = torch_train(model, {"tokens": data["tokens"], "targets": data["targets"]}, config, out_dir=out_dir,
                         eval_data=eval_data, task=task, progress=progress)
    return TrainedModel(model, [c.checkpoint(eta=None) for c in result.checkpoints], result.losses, result.evals)


def logits(model, tokens: np.ndarray, tau: int | None = None, batch_size: int = 512) -> np.ndarray:
    """Logits ``[N, T, V]`` as float32 NumPy (no autograd)."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for lo in range(0, len(tokens), batch_size):
            t = torch.as_tensor(np.asarray(tokens[lo:lo + batch_size]), device=device)
            out.append(model(t, tau=tau).float().cpu().numpy())
    return np.concatenate(out)


def side_groups(model, groups: Sequence[str] = ("prelude", "coda")) -> dict:
    """The demo model's parameters outside the loop, as ``Attributor(groups=...)`` (only those named)."""
    table = {"prelude": [model.tok_emb, model.pos_emb, *model.prelude],
             "coda": [*model.coda, model.ln_f] + ([] if model.config.tie_embeddings else [model.head])}
    return {g: table[g] for g in groups if g in table}


def featurize(model, sketch, data: Mapping[str, np.ndarray], checkpoints, *,
              groups: Sequence[str] = ("prelude", "loop", "coda"), tau: int | None = None, example_ids=None,
              batch_size: int = 64, progress: bool = False):
    """Features of ``data`` through :class:`sdi_torch.Attributor` (NumPy arrays)."""
    import torch

    from .attributor import Attributor
    from .models import per_example_loss

    if "loop" not in groups:
        raise SDIError("the torch backend attributes through the loop: include 'loop' in the groups.")
    device = next(model.parameters()).device
    loss = per_example_loss if tau is None else (lambda m, b: per_example_loss(m, b, tau=tau))
    attr = Attributor(model, loop=model.block, loss_fn=loss, sketch=sketch, groups=side_groups(model, groups),
                      progress=progress)
    tokens, targets = np.asarray(data["tokens"]), np.asarray(data["targets"])
    batches = [{"tokens": torch.as_tensor(tokens[lo:lo + batch_size], device=device),
                "targets": torch.as_tensor(targets[lo:lo + batch_size], device=device)}
               for lo in range(0, len(tokens), batch_size)]
    return attr.featurize(batches, checkpoints, example_ids=example_ids).to_numpy()


def load_checkpoint(path):
    """``(LoopedConfig, canonical NumPy weights)`` of a ``.pt`` file written by :func:`sdi_torch.train.train`."""
    from .train import load_model

    model, _ = load_model(path)
    return model.config, model.to_numpy()


def store_featurizer(config, checkpoints, sketch, data, *, groups=("loop",), tau=None, summed=False,
                     device: str = "cpu", dtype: str = "float32", progress: bool = False):
    """``featurize_fn`` running ``sdi_torch.models.LoopedGPT`` under ``sdi_torch.Attributor`` on canonical
    weights (``sdi featurize --backend torch``): row ranges of ``data`` -> Features."""
    try:
        import torch
    except ImportError as exc:
        raise SDIError(f"--backend torch needs PyTorch ({exc}); pip install 'sdi[torch]'.") from None
    from sdi_core.app.cli_store import as_checkpoints, example_ids, rows
    from sdi_core.reference.looped_transformer import group_steps, param_groups

    from . import models
    from .attributor import Attributor

    if "loop" not in groups:
        raise SDIError("--backend torch attributes through the loop: include 'loop' in --groups.")
    tdtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    model = models.LoopedGPT.from_numpy(config, checkpoints[0][0], dtype=tdtype).to(device).eval()
    table = param_groups(config)
    names = [n for n, _ in model.named_parameters()]
    extra = {g: [n for n in names if table.get(n) == g] for g in groups if g != "loop"}
    steps = group_steps(config, tau)["loop"]

    def loss_fn(m, batch):
        return models.per_example_loss(m, batch, tau=tau)

    attr = Attributor(model, loop=model.block, loss_fn=loss_fn, sketch=sketch, steps=steps,
                      groups={g: v for g, v in extra.items() if v}, progress=progress)
    ckpts = as_checkpoints(checkpoints, lambda w: {k: torch.as_tensor(v, dtype=tdtype, device=device)
                                                   for k, v in w.items()})

    def featurize_rows(ranges):
        batches = [{k: torch.as_tensor(v, device=device) for k, v in rows(data, a, b).items()} for a, b in ranges]
        return attr.featurize(batches, ckpts, example_ids=example_ids(data, ranges), summed=summed)

    return featurize_rows


def check_device(device: str) -> None:
    """Refuse a ``--device`` that torch cannot parse or use, before any work."""
    import torch

    try:
        torch.empty(1, device=torch.device(device))
    except (RuntimeError, ValueError, TypeError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SDIError(f"--device {device!r} cannot be used ({first}); pass e.g. --device cpu or --device cuda:0.") from None


@contextlib.contextmanager
def threads(n: int | None):
    """``torch.set_num_threads(n)`` while the block runs (the demo's models are too small to gain from more)."""
    import torch

    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def distributed() -> Any:
    """:mod:`sdi_torch.distributed` (process group, store writing and scoring across torchrun ranks)."""
    return importlib.import_module("sdi_torch.distributed")


BACKEND = Backend(
    name="torch",
    description="PyTorch: sdi_torch.models.LoopedGPT, AdamW training, sdi_torch.Attributor (the default)",
    build_model=build_model,
    train=train,
    logits=logits,
    featurize=featurize,
    load_checkpoint=load_checkpoint,
    conformance="sdi_torch.conformance:backend",
    store_featurizer=store_featurizer,
    check_device=check_device,
    threads=threads,
    distributed=distributed,
)
