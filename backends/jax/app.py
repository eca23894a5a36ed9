"""The ``jax`` backend of the ``sdi`` application (entry point ``sdi.backends: jax``).

Importing this module imports no JAX: every function imports it when it
runs.  The model is the JAX looped GPT of :mod:`sdi_jax.models` (a nested
params dict), trained with Optax AdamW on the schedule and batch order every
backend shares (:mod:`sdi_core.app.training`) and featurised by
:class:`sdi_jax.Attributor`.  Checkpoints are written in the NumPy backend's
format (canonical ``.npz`` weights and a ``.json``), so ``sdi featurize
--backend numpy|torch --checkpoint`` reads them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sdi_core.app.backends import Backend, TrainedModel
from sdi_core.features import Checkpoint

__all__ = ["BACKEND", "JaxModel", "side_groups"]


@dataclass
class JaxModel:
    """The JAX model: its shape and params pytree (linear kernels ``(d_in, d_out)``)."""

    config: Any  # LoopedConfig
    params: dict
    cache: dict = field(default_factory=dict)  # attributors and jitted functions, reused across calls


def build_model(config, seed: int = 0) -> JaxModel:
    """GPT-2 style initial weights (the NumPy backend's numbers, in JAX's default float)."""
    from sdi_core.reference.looped_transformer import gpt2_init_weights

    from .models import params_from_numpy

    return JaxModel(config, params_from_numpy(gpt2_init_weights(config, seed), config, dtype="float32"))


def _lr_schedule(config):
    import jax.numpy as jnp

    from sdi_core.app.training import learning_rate

    lrs = jnp.asarray([learning_rate(s, config) for s in range(1, config.steps + 1)], dtype=jnp.float32)
    return lambda count: lrs[jnp.minimum(count, config.steps - 1)]  # optax counts updates from 0


def train(model: JaxModel, data: Mapping[str, np.ndarray], config, *, out_dir=None, eval_data=None, task=None,
          progress: bool = False) -> TrainedModel:
    """Train ``model`` in place with ``optax.adamw`` (decay on matrices only) after global-norm clipping."""
    import jax
    import jax.numpy as jnp
    import optax

    from sdi_core.app.training import BatchOrder, checkpoint_steps, evaluate_logits, learning_rate
    from sdi_core.factors import SDIError

    from .models import per_example_loss

    if config.optimizer != "adamw":
        raise SDIError(f"the jax backend trains with adamw only, got optimizer={config.optimizer!r}; pass "
                       "--optimizer adamw or use --backend torch.")
    cfg = model.config
    mask = jax.tree_util.tree_map(lambda p: p.ndim >= 2, model.params)
    opt = optax.chain(
        optax.clip_by_global_norm(config.grad_clip) if config.grad_clip else optax.identity(),
        optax.adamw(_lr_schedule(config), b1=config.betas[0], b2=config.betas[1], eps=1e-8,
                    weight_decay=config.weight_decay, mask=mask),
    )

    def mean_loss(params, batch):
        return jnp.mean(per_example_loss(params, batch, cfg, scan=True))

    @jax.jit
    def step_fn(params, state, batch):
        loss, grads = jax.value_and_grad(mean_loss)(params, batch)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    tokens, targets = np.asarray(data["tokens"]), np.asarray(data["targets"])
    order = BatchOrder(tokens.shape[0], config.batch_size, config.seed)
    params, state = model.params, opt.init(model.params)
    save_at = set(checkpoint_steps(config.steps, config.n_checkpoints)) if out_dir is not None else set()
    losses = np.zeros(config.steps)
    evals: list[tuple[int, float, float]] = []
    ckpts: list[Checkpoint] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, desc="training (jax)", unit="step", leave=False, dynamic_ncols=True)
    try:
        for step in range(1, config.steps + 1):
            idx = order.next()
            params, state, loss = step_fn(params, state, {"tokens": tokens[idx], "targets": targets[idx]})
            losses[step - 1] = float(loss)
            if not np.isfinite(losses[step - 1]):
                raise SDIError(f"train: the loss became {losses[step - 1]} at step {step}; lower the learning rate "
                               f"(lr={config.lr}).")
            model.params = params
            if eval_data is not None and (step == config.steps or (config.eval_every and step % config.eval_every == 0)):
                evals.append((step, *evaluate_logits(logits(model, eval_data.tokens), eval_data, task)))
            if step in save_at:
                lr = learning_rate(step, config)
                _save(Path(out_dir) / f"ckpt_{step:06d}.npz", model, step, lr)
                ckpts.append(Checkpoint(params, eta=lr, step=step))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return TrainedModel(model, ckpts, losses, evals)


def _save(path: Path, model: JaxModel, step: int, lr: float) -> None:
    from sdi_core.app.numpy_backend import ReferenceModel, save_checkpoint

    from .models import params_to_numpy

    save_checkpoint(path, ReferenceModel(model.config, params_to_numpy(model.params, model.config)), step, lr)


def logits(model: JaxModel, tokens: np.ndarray, tau: int | None = None, batch_size: int = 512) -> np.ndarray:
    """Logits ``[N, T, V]`` as NumPy (jitted forward, the loop as ``lax.scan``)."""
    import jax

    from .models import forward_scan

    fn = model.cache.get(("logits", tau))
    if fn is None:
        fn = model.cache[("logits", tau)] = jax.jit(lambda p, t: forward_scan(p, model.config, {"tokens": t}, tau))
    tokens = np.asarray(tokens)
    return np.concatenate([np.asarray(fn(model.params, tokens[lo:lo + batch_size]))
                           for lo in range(0, len(tokens), batch_size)])


def side_groups(config, groups: Sequence[str] = ("prelude", "coda")) -> dict:
    """Selectors of the demo model's parameters outside the loop (only the groups named)."""

    def prelude(p):
        out = {"tok_emb": p["tok_emb"], "pos_emb": p["pos_emb"]}
        if "prelude" in p:
            out["prelude"] = p["prelude"]
        return out

    def coda(p):
        out = {"ln_f": p["ln_f"]}
        if "coda" in p:
            out["coda"] = p["coda"]
        if not config.tie_embeddings:
            out["head"] = p["head"]
        return out

    table = {"prelude": prelude, "coda": coda}
    return {g: table[g] for g in groups if g in table}


def featurize(model: JaxModel, sketch, data: Mapping[str, np.ndarray], checkpoints, *,
              groups: Sequence[str] = ("prelude", "loop", "coda"), tau: int | None = None, example_ids=None,
              batch_size: int = 64, progress: bool = False):
    """Features of ``data`` through :class:`sdi_jax.Attributor` (NumPy arrays)."""
    from sdi_core.factors import SDIError

    from .attributor import Attributor
    from .models import per_example_loss

    if "loop" not in groups:
        raise SDIError("the jax backend attributes through the loop: include 'loop' in the groups.")
    cfg = model.config
    steps = cfg.tau if tau is None else tau
    key = (repr(sketch), steps, tuple(groups))
    attr = model.cache.get(key)
    if attr is None:  # one per sketch and loop count, so that its compiled functions are reused
        # check_rows off: the demo model's rows are independent (tests/test_jax_attributor.py checks it).
        attr = model.cache[key] = Attributor(
            lambda p, b: per_example_loss(p, b, cfg, tau=steps), loop=lambda p: p["block"], sketch=sketch,
            groups=side_groups(cfg, groups), steps=steps, progress=progress, check_rows=False)
    tokens, targets = np.asarray(data["tokens"]), np.asarray(data["targets"])
    batches = [{"tokens": tokens[lo:lo + batch_size], "targets": targets[lo:lo + batch_size]}
               for lo in range(0, len(tokens), batch_size)]
    ids = np.arange(len(tokens)) if example_ids is None else np.asarray(example_ids)
    return attr.featurize(batches, checkpoints, example_ids=ids).to_numpy()


def load_checkpoint(path):
    """``(LoopedConfig, canonical NumPy weights)`` of a checkpoint this backend's training wrote."""
    from sdi_core.app.numpy_backend import load_checkpoint as load

    return load(path)


BACKEND = Backend(
    name="jax",
    description="JAX: the sdi_jax.models looped GPT, Optax AdamW training, sdi_jax.Attributor",
    build_model=build_model,
    train=train,
    logits=logits,
    featurize=featurize,
    load_checkpoint=load_checkpoint,
    conformance="sdi_jax.conformance:backend",
)
