"""The canonical looped transformer in JAX: pure functions over a nested-dict pytree.

Same architecture, parameter names and loss as the NumPy reference
:mod:`sdi_core.reference.looped_transformer`.

Parameters are a nested dict keyed by the dotted names split on ``"."``:
``params["block"]["attn"]["q"]["weight"]`` is ``block.attn.q.weight`` and
``params["prelude"]["0"]["ln1"]["bias"]`` is ``prelude.0.ln1.bias`` (string
keys for block indices).

Orientation (the one difference from the other backends):

- **linear weights are stored ``(d_in, d_out)``** and applied as ``x @ W``
  (the flax/JAX convention), i.e. the *transpose* of the canonical
  ``(d_out, d_in)`` of the reference and of PyTorch.  This holds for
  ``*.attn.{q,k,v,o}.weight``, ``*.mlp.fc{1,2}.weight`` and ``head.weight``.
- embeddings are ``(num, dim)`` as everywhere; the tied unembedding is
  ``h @ tok_emb.weight.T``.
- biases and LayerNorm parameters are ``(d,)``.

:func:`params_from_numpy` and :func:`params_to_numpy` convert from and to the
canonical NumPy dict (transposing linear kernels).  Nothing here touches
``jax.config``; enable float64 in your application (or test fixture) if you
need it.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sdi_core.factors import SDIError
from sdi_core.reference.looped_transformer import IGNORE_INDEX, LoopedConfig, init_weights, param_shapes

__all__ = [
    "LoopedConfig",
    "init_params",
    "params_from_numpy",
    "params_to_numpy",
    "is_linear_weight",
    "block_apply",
    "forward",
    "forward_scan",
    "per_example_cross_entropy",
    "per_example_loss",
]

_LINEAR_LAYERS = ("q", "k", "v", "o", "fc1", "fc2", "head")


def is_linear_weight(name: str) -> bool:
    """True for the dotted names of linear kernels (stored ``(d_in, d_out)`` in JAX)."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in _LINEAR_LAYERS


# ------------------------------------------------------------------ conversions


def params_from_numpy(weights: Mapping[str, np.ndarray], config: LoopedConfig, dtype=None) -> dict:
    """Canonical NumPy dict -> nested params pytree (linear kernels transposed to ``(d_in, d_out)``).

    Args:
        dtype: array dtype; None gives JAX's default float (float64 only when x64 is enabled).
    """
    shapes = param_shapes(config)
    missing = [n for n in shapes if n not in weights]
    extra = [n for n in weights if n not in shapes]
    if missing or extra:
        raise SDIError(f"params_from_numpy: weights do not match the config: missing {missing}, unexpected {extra}.")
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64 if dtype is None else dtype)
    params: dict = {}
    for name, shape in shapes.items():
        w = np.asarray(weights[name])
        if w.shape != shape:
            raise SDIError(f"params_from_numpy: {name!r} has shape {w.shape}, expected canonical {shape}.")
        node = params
        *path, leaf = name.split(".")
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = jnp.asarray(w.T if is_linear_weight(name) else w, dtype=dtype)
    return params


def init_params(config: LoopedConfig, seed: int = 0, dtype=None) -> dict:
    """The reference's :func:`init_weights` as a JAX params pytree (same numbers in every backend)."""
    return params_from_numpy(init_weights(config, seed), config, dtype)


def params_to_numpy(params: Mapping, config: LoopedConfig | None = None) -> dict[str, np.ndarray]:
    """Nested params (or a gradient pytree of the same structure) -> canonical dotted-name NumPy dict.

    Linear kernels are transposed back to ``(d_out, d_in)`` (their last two axes, so a
    per-example gradient pytree ``[B, d_in, d_out]`` becomes ``[B, d_out, d_in]``).  With ``config``,
    the names are checked and returned in the reference's definition order.
    """
    flat: dict[str, np.ndarray] = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, Mapping):
                walk(value, name)
            else:
                w = np.asarray(value)
                flat[name] = np.swapaxes(w, -1, -2) if is_linear_weight(name) else w

    walk(params, "")
    if config is None:
        return flat
    shapes = param_shapes(config)
    if set(flat) != set(shapes):
        raise SDIError(
            f"params_to_numpy: the pytree does not match the config: missing {sorted(set(shapes) - set(flat))}, "
            f"unexpected {sorted(set(flat) - set(shapes))}."
        )
    return {n: flat[n] for n in shapes}


# ------------------------------------------------------------------------ layers


def _linear(p, x):
    return x @ p["weight"] + p["bias"]


def _layer_norm(p, x, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * p["weight"] + p["bias"]


def _attention(p, a, n_heads):
    B, T, d = a.shape
    dh = d // n_heads
    q, k, v = (_linear(p[n], a).reshape(B, T, n_heads, dh).transpose(0, 2, 1, 3) for n in ("q", "k", "v"))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh)  # a Python float: float32 stays float32 under x64
    causal = np.tril(np.ones((T, T), dtype=bool))
    probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    return _linear(p["o"], (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, d))


def block_apply(block_params, h, e, config: LoopedConfig):
    """One pre-LN block on ``h + e`` (``e`` is the injected input, or None): the loop body.

    ``x = u + Attn(LN1(u)); y = x + MLP(LN2(x))`` with ``u = h (+ e)``.
    """
    p = block_params
    u = h if e is None else h + e
    x = u + _attention(p["attn"], _layer_norm(p["ln1"], u, config.ln_eps), config.n_heads)
    m = _layer_norm(p["ln2"], x, config.ln_eps)
    return x + _linear(p["mlp"]["fc2"], jax.nn.gelu(_linear(p["mlp"]["fc1"], m), approximate=False))


# ------------------------------------------------------------------------ model


def _resolve_tau(config: LoopedConfig, tau) -> int:
    tau = config.tau if tau is None else tau
    if isinstance(tau, bool) or not isinstance(tau, (int, np.integer)) or tau < 0:
        raise SDIError(f"tau must be a non-negative Python int (or None for config.tau), got {tau!r}.")
    return int(tau)


def _read_in(params, config: LoopedConfig, tokens):
    """Embeddings and prelude: ``e'``, and the loop's initial state."""
    T = tokens.shape[-1]
    if T > config.max_len:
        raise SDIError(f"Sequence length {T} exceeds config.max_len={config.max_len}.")
    e = params["tok_emb"]["weight"][tokens] + params["pos_emb"]["weight"][:T]
    for i in range(config.n_prelude):
        e = block_apply(params["prelude"][str(i)], e, None, config)
    h = jnp.zeros_like(e) if config.input_injection else e
    return e, h


def _read_out(params, config: LoopedConfig, h):
    """Coda blocks, final LayerNorm and (tied) unembedding."""
    for i in range(config.n_coda):
        h = block_apply(params["coda"][str(i)], h, None, config)
    f = _layer_norm(params["ln_f"], h, config.ln_eps)
    return f @ params["tok_emb"]["weight"].T if config.tie_embeddings else f @ params["head"]["weight"]


def _loop_step(params, config: LoopedConfig, e, n_steps, h, s):
    out = block_apply(params["block"], h, e if config.input_injection else None, config)
    if n_steps is None:
        return out
    return jnp.where((n_steps > s)[:, None, None], out, h)  # early exit: finished examples keep h


def forward(params, config: LoopedConfig, batch: Mapping, tau=None):
    """Logits ``[B, T, V]`` with the loop unrolled in Python (one body call per step).

    ``batch``: ``{"tokens": int [B, T], "n_steps": optional int [B]}``; example
    ``b`` runs ``min(n_steps[b], tau)`` steps.  ``tau`` must be a Python int.
    """
    tau = _resolve_tau(config, tau)
    n_steps = batch.get("n_steps")
    e, h = _read_in(params, config, jnp.asarray(batch["tokens"]))
    for s in range(tau):
        h = _loop_step(params, config, e, n_steps, h, s)
    return _read_out(params, config, h)


def forward_scan(params, config: LoopedConfig, batch: Mapping, tau=None):
    """Same as :func:`forward`, the loop as ``jax.lax.scan`` over steps (body weights closed over)."""
    tau = _resolve_tau(config, tau)
    n_steps = batch.get("n_steps")
    e, h = _read_in(params, config, jnp.asarray(batch["tokens"]))

    def step(h, s):
        return _loop_step(params, config, e, n_steps, h, s), None

    h, _ = jax.lax.scan(step, h, jnp.arange(tau))
    return _read_out(params, config, h)


def per_example_cross_entropy(logits, targets):
    """``[B, T, V]`` logits, ``[B, T]`` targets (-100 ignored) -> ``[B]`` mean NLL (0 without targets)."""
    targets = jnp.asarray(targets)
    mask = targets != IGNORE_INDEX
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(mask, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(mask, nll, 0.0).sum(-1) / jnp.maximum(mask.sum(-1), 1)


def per_example_loss(params, batch: Mapping, config: LoopedConfig, tau=None, scan: bool = False):
    """Per-example loss ``[B]``: mean cross-entropy over each example's non-ignored targets."""
    logits = (forward_scan if scan else forward)(params, config, batch, tau)
    return per_example_cross_entropy(logits, batch["targets"])

