"""A small looped (weight-tied) transformer in NumPy, with a hand-written backward pass.

This is the float64 ground truth every backend is checked against, and it is
meant to be read in one sitting.  It imports NumPy and SciPy only.

Architecture (pre-LayerNorm GPT, one body block applied ``tau`` times)::

    e  = tok_emb[tokens] + pos_emb[:T]
    e' = prelude blocks applied to e            (n_prelude blocks, untied)
    h  = e'            (or 0 with input injection)
    for s in 0 .. tau-1:                        (the loop; one shared block)
        u = h + e'     (input injection)  or  u = h
        h = Block(u)   for examples still running (s < n_steps[b]), else h is frozen
    h  = coda blocks applied to h               (n_coda blocks, untied)
    logits = LN_f(h) @ head.weight^T            (or @ tok_emb.weight^T when tied)

    Block(u):  x = u + Attn(LN1(u));  y = x + MLP(LN2(x))
    Attn: causal multi-head softmax attention, q/k/v/o linear with bias,
          scores scaled by 1/sqrt(d_head).
    MLP:  fc2(gelu(fc1(.))), exact erf GELU (torch ``F.gelu`` default,
          ``jax.nn.gelu(approximate=False)``).

Parameter names are a contract shared by every backend (see
:func:`param_shapes`).  Shapes are canonical: linear weights ``(d_out, d_in)``,
embeddings ``(num, dim)``, everything else ``(d,)``.

Losses are *per example*: the mean cross-entropy over that example's target
positions (``targets == -100`` is ignored; an example without targets has loss
0).  The backward pass differentiates each row's own loss (rows independent,
not the batch mean), and records the two factors of every use of every
parameter (:class:`~sdi_core.factors.FactorUse`).  Untying the loop body (a
separate weight copy ``w^(s)`` per step) is available through
``block_overrides={s: {"block.attn.q.weight": array, ...}}``; it is how the
tests check per-step gradients by finite differences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
from scipy.special import erf

from ..factors import FactorUse, ParamInfo, SDIError

__all__ = [
    "LoopedConfig",
    "IGNORE_INDEX",
    "param_shapes",
    "param_kinds",
    "param_groups",
    "param_infos",
    "group_steps",
    "init_weights",
    "gpt2_init_weights",
    "forward",
    "per_example_loss",
    "loss_and_factors",
    "factors_to_gradients",
    "per_step_gradients",
    "full_gradients",
]

IGNORE_INDEX = -100

# Parameters of one block, relative to its prefix, in definition (= forward) order.
_BLOCK_PARAMS = (
    "ln1.weight", "ln1.bias",
    "attn.q.weight", "attn.q.bias",
    "attn.k.weight", "attn.k.bias",
    "attn.v.weight", "attn.v.bias",
    "attn.o.weight", "attn.o.bias",
    "ln2.weight", "ln2.bias",
    "mlp.fc1.weight", "mlp.fc1.bias",
    "mlp.fc2.weight", "mlp.fc2.bias",
)  # fmt: skip


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class LoopedConfig:
    """Shape of a looped transformer.

    Attributes:
        vocab_size: number of tokens ``V``.
        d_model: residual width ``d``.
        n_heads: attention heads; must divide ``d_model``.
        d_mlp: hidden width of the MLP; defaults to ``4 * d_model``.
        tau: number of loop steps at training time (queries may use another).
        max_len: longest sequence (rows of ``pos_emb``).
        n_prelude, n_coda: untied blocks before and after the loop.
        tie_embeddings: logits use ``tok_emb.weight`` (no ``head.weight``).
        input_injection: the loop starts from ``h = 0`` and every step reads
            ``h + e'``, with ``e'`` the prelude output.
        ln_eps: LayerNorm epsilon.
    """

    vocab_size: int
    d_model: int
    n_heads: int
    d_mlp: int | None = None
    tau: int = 1
    max_len: int = 16
    n_prelude: int = 0
    n_coda: int = 0
    tie_embeddings: bool = False
    input_injection: bool = False
    ln_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "tau", "max_len"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("n_prelude", "n_coda"):
            _check_int(name, getattr(self, name), minimum=0)
        if self.d_mlp is None:
            object.__setattr__(self, "d_mlp", 4 * self.d_model)
        _check_int("d_mlp", self.d_mlp, minimum=1)
        if self.d_model % self.n_heads:
            raise SDIError(
                f"LoopedConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                f"choose n_heads among the divisors of d_model."
            )
        if not (isinstance(self.ln_eps, (int, float)) and self.ln_eps > 0):
            raise SDIError(f"LoopedConfig: ln_eps must be a positive float, got {self.ln_eps!r}.")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def block_prefixes(self) -> tuple[str, ...]:
        """Prefixes of all blocks in forward order: prelude.i, block, coda.i."""
        return (
            tuple(f"prelude.{i}" for i in range(self.n_prelude))
            + ("block",)
            + tuple(f"coda.{i}" for i in range(self.n_coda))
        )


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SDIError(f"LoopedConfig: {name} must be an int >= {minimum}, got {value!r}.")


def _resolve_tau(config: LoopedConfig, tau) -> int:
    if tau is None:
        return config.tau
    if isinstance(tau, bool) or not isinstance(tau, (int, np.integer)) or tau < 0:
        raise SDIError(f"tau must be a non-negative int (or None for config.tau), got {tau!r}.")
    return int(tau)


# --------------------------------------------------------------------- parameter table


def _block_shapes(config: LoopedConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    d, m = config.d_model, config.d_mlp
    local = {
        "ln1.weight": (d,), "ln1.bias": (d,),
        "attn.q.weight": (d, d), "attn.q.bias": (d,),
        "attn.k.weight": (d, d), "attn.k.bias": (d,),
        "attn.v.weight": (d, d), "attn.v.bias": (d,),
        "attn.o.weight": (d, d), "attn.o.bias": (d,),
        "ln2.weight": (d,), "ln2.bias": (d,),
        "mlp.fc1.weight": (m, d), "mlp.fc1.bias": (m,),
        "mlp.fc2.weight": (d, m), "mlp.fc2.bias": (d,),
    }  # fmt: skip
    return {f"{prefix}.{k}": local[k] for k in _BLOCK_PARAMS}


def param_shapes(config: LoopedConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every parameter, in definition order."""
    V, d = config.vocab_size, config.d_model
    shapes: dict[str, tuple[int, ...]] = {"tok_emb.weight": (V, d), "pos_emb.weight": (config.max_len, d)}
    for prefix in config.block_prefixes():
        shapes.update(_block_shapes(config, prefix))
    shapes["ln_f.weight"] = (d,)
    shapes["ln_f.bias"] = (d,)
    if not config.tie_embeddings:
        shapes["head.weight"] = (V, d)
    return shapes


def param_kinds(config: LoopedConfig) -> dict[str, str]:
    """Name -> how the parameter is used: "linear", "bias", "scale" or "embedding".

    ``tok_emb.weight`` is an "embedding" (when tied it also has one "linear" use).
    """
    kinds = {}
    for name in param_shapes(config):
        if name in ("tok_emb.weight", "pos_emb.weight"):
            kinds[name] = "embedding"
        elif name.endswith(".bias"):
            kinds[name] = "bias"
        elif ".ln" in name or name.startswith("ln"):
            kinds[name] = "scale"
        else:
            kinds[name] = "linear"
    return kinds


def param_groups(config: LoopedConfig) -> dict[str, str]:
    """Name -> slot group: "prelude" (embeddings, prelude blocks), "loop" (block.*), "coda"."""
    groups = {}
    for name in param_shapes(config):
        if name.startswith("block."):
            groups[name] = "loop"
        elif name.startswith(("tok_emb.", "pos_emb.", "prelude.")):
            groups[name] = "prelude"
        else:
            groups[name] = "coda"
    return groups


def param_infos(config: LoopedConfig, groups: Iterable[str] | None = None) -> list[ParamInfo]:
    """ParamInfo of every parameter (definition order), optionally only those in ``groups``.

    Args:
        groups: names of the groups to keep, e.g. ``("loop",)``; None keeps all.
    """
    table = param_groups(config)
    if groups is not None:
        groups = (groups,) if isinstance(groups, str) else tuple(groups)
        unknown = set(groups) - {"prelude", "loop", "coda"}
        if unknown:
            raise SDIError(
                f"param_infos: unknown group(s) {sorted(unknown)}; the groups are 'prelude', 'loop', 'coda'."
            )
    return [
        ParamInfo(name, shape, table[name])
        for name, shape in param_shapes(config).items()
        if groups is None or table[name] in groups
    ]


def group_steps(config: LoopedConfig, tau=None) -> dict[str, int]:
    """Number of step slots of each group: ``tau`` for "loop", 1 for "prelude" and "coda"."""
    return {"prelude": 1, "loop": _resolve_tau(config, tau), "coda": 1}


# ---------------------------------------------------------------------------- init


def init_weights(config: LoopedConfig, seed: int = 0, scale: float = 1.0) -> dict[str, np.ndarray]:
    """Deterministic float64 weights, every one of them nonzero and non-trivial.

    Linear weights are normal with std ``scale / sqrt(d_in)``; embeddings std
    ``0.5 * scale``; LayerNorm weights ``1 + 0.1 N(0, 1)``; all biases
    ``0.1 N(0, 1)``.  Biases and LayerNorm weights are deliberately not 0/1 so
    every parameter has a nonzero gradient in tests.
    """
    rng = np.random.default_rng(seed)
    kinds = param_kinds(config)
    weights = {}
    for name, shape in param_shapes(config).items():
        kind = kinds[name]
        if kind == "embedding":
            w = 0.5 * scale * rng.standard_normal(shape)
        elif kind == "linear":
            w = scale / math.sqrt(shape[1]) * rng.standard_normal(shape)
        elif kind == "scale":
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            w = 0.1 * rng.standard_normal(shape)
        weights[name] = w
    return weights


def gpt2_init_weights(config: LoopedConfig, seed: int = 0, std: float = 0.02) -> dict[str, np.ndarray]:
    """GPT-2 style initial weights for training: normal(0, ``std``) matrices and embeddings, zero
    biases, unit LayerNorm scales (float64, canonical shapes, from a NumPy generator and ``seed``).

    The demo trains from these in the NumPy and JAX backends (``sdi_torch.models.LoopedGPT``
    initialises the same way with torch's generator); :func:`init_weights` is for tests.
    """
    rng = np.random.default_rng(seed)
    kinds = param_kinds(config)
    weights = {}
    for name, shape in param_shapes(config).items():
        kind = kinds[name]
        if kind in ("embedding", "linear"):
            weights[name] = std * rng.standard_normal(shape)
        elif kind == "scale":
            weights[name] = np.ones(shape)
        else:
            weights[name] = np.zeros(shape)
    return weights


# ------------------------------------------------------------------ input checking


def _check_weights(weights: Mapping[str, np.ndarray], config: LoopedConfig) -> dict[str, np.ndarray]:
    shapes = param_shapes(config)
    missing = [n for n in shapes if n not in weights]
    extra = [n for n in weights if n not in shapes]
    if missing or extra:
        raise SDIError(
            f"Weights do not match the config: missing {missing}, unexpected {extra}. "
            f"Build them with init_weights(config) or check tie_embeddings/n_prelude/n_coda."
        )
    out = {}
    for name, shape in shapes.items():
        w = np.asarray(weights[name], dtype=np.float64)
        if w.shape != shape:
            raise SDIError(f"Weight {name!r} has shape {w.shape}; the config expects {shape} (canonical orientation).")
        out[name] = w
    return out


def _check_overrides(overrides, config: LoopedConfig, tau: int) -> dict[int, dict[str, np.ndarray]]:
    if not overrides:
        return {}
    shapes = param_shapes(config)
    out = {}
    for step, table in overrides.items():
        if not (isinstance(step, (int, np.integer)) and 0 <= step < tau):
            raise SDIError(f"block_overrides: step {step!r} is not a loop step in range({tau}).")
        out[int(step)] = {}
        for name, w in table.items():
            if not name.startswith("block."):
                raise SDIError(f"block_overrides: {name!r} is not a loop-body parameter (names start with 'block.').")
            w = np.asarray(w, dtype=np.float64)
            if name not in shapes or w.shape != shapes[name]:
                raise SDIError(f"block_overrides: {name!r} with shape {w.shape} does not match {shapes.get(name)}.")
            out[int(step)][name] = w
    return out


def _check_batch(batch: Mapping, config: LoopedConfig, tau: int, need_targets: bool):
    if "tokens" not in batch:
        raise SDIError(f"The batch needs a 'tokens' entry (int [B, T]); got keys {sorted(batch)}.")
    tokens = np.asarray(batch["tokens"])
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise SDIError(f"batch['tokens'] must be an int array [B, T], got dtype {tokens.dtype} shape {tokens.shape}.")
    B, T = tokens.shape
    if T > config.max_len:
        raise SDIError(f"Sequence length {T} exceeds config.max_len={config.max_len}.")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= config.vocab_size):
        raise SDIError(f"Token ids must lie in [0, {config.vocab_size}); got [{tokens.min()}, {tokens.max()}].")
    n_steps = batch.get("n_steps")
    if n_steps is None:
        n_steps = np.full(B, tau, dtype=np.int64)
    else:
        n_steps = np.asarray(n_steps)
        if n_steps.shape != (B,) or not np.issubdtype(n_steps.dtype, np.integer) or (n_steps < 0).any():
            raise SDIError(f"batch['n_steps'] must be non-negative ints of shape ({B},), got {n_steps!r}.")
    targets = None
    if need_targets:
        if "targets" not in batch:
            raise SDIError("The batch needs a 'targets' entry (int [B, T], -100 = ignored) to compute a loss.")
        targets = np.asarray(batch["targets"])
        if targets.shape != (B, T) or not np.issubdtype(targets.dtype, np.integer):
            raise SDIError(f"batch['targets'] must be an int array of shape {(B, T)}, got {targets.shape}.")
        bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= config.vocab_size))
        if bad.any():
            raise SDIError(f"Targets must be in [0, {config.vocab_size}) or {IGNORE_INDEX} (ignored).")
    return tokens, targets, n_steps


# ------------------------------------------------------------------------ the tape


class _Tape:
    """Records every parameter use during forward; backward fills in the grad-outputs."""

    def __init__(self) -> None:
        self.uses: list[FactorUse] = []

    def record(self, param: str, step: int, kind: str, activation) -> int:
        self.uses.append(FactorUse(param, step, kind, activation, None, use_index=len(self.uses)))
        return len(self.uses) - 1

    def grad(self, index: int, grad_output: np.ndarray) -> None:
        self.uses[index].grad_output = grad_output


# ------------------------------------------------------------------------- layers
# Each layer has a forward that returns (output, cache) and a backward that takes
# d(output), writes its parameters' grad-outputs to the tape, and returns d(input).


def _linear_fwd(x, W, b, name: str, step: int, tape: _Tape):
    uses = (tape.record(f"{name}.weight", step, "linear", x), tape.record(f"{name}.bias", step, "bias", None))
    return x @ W.T + b, (W, uses)


def _linear_bwd(dy, cache, tape: _Tape):
    W, (iw, ib) = cache
    tape.grad(iw, dy)
    tape.grad(ib, dy)
    return dy @ W


def _layer_norm_fwd(x, w, b, eps: float, name: str, step: int, tape: _Tape):
    mu = x.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (x - mu) * rstd
    uses = (tape.record(f"{name}.weight", step, "scale", xhat), tape.record(f"{name}.bias", step, "bias", None))
    return xhat * w + b, (xhat, rstd, w, uses)


def _layer_norm_bwd(dy, cache, tape: _Tape):
    xhat, rstd, w, (iw, ib) = cache
    tape.grad(iw, dy)
    tape.grad(ib, dy)
    dxhat = dy * w
    return rstd * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))


def _gelu(x):
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _gelu_grad(x):
    return 0.5 * (1.0 + erf(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _attention_fwd(a, W, prefix: str, step: int, n_heads: int, tape: _Tape):
    B, T, d = a.shape
    dh = d // n_heads
    q, cq = _linear_fwd(a, W["attn.q.weight"], W["attn.q.bias"], f"{prefix}.attn.q", step, tape)
    k, ck = _linear_fwd(a, W["attn.k.weight"], W["attn.k.bias"], f"{prefix}.attn.k", step, tape)
    v, cv = _linear_fwd(a, W["attn.v.weight"], W["attn.v.bias"], f"{prefix}.attn.v", step, tape)
    split = lambda t: t.reshape(B, T, n_heads, dh).transpose(0, 2, 1, 3)  # [B, H, T, dh]
    q, k, v = split(q), split(k), split(v)
    scale = 1.0 / math.sqrt(dh)
    scores = q @ k.transpose(0, 1, 3, 2) * scale  # [B, H, T, T]
    causal = np.tril(np.ones((T, T), dtype=bool))
    scores = np.where(causal, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ctx = (p @ v).transpose(0, 2, 1, 3).reshape(B, T, d)
    out, co = _linear_fwd(ctx, W["attn.o.weight"], W["attn.o.bias"], f"{prefix}.attn.o", step, tape)
    return out, (q, k, v, p, scale, cq, ck, cv, co)


def _attention_bwd(dout, cache, tape: _Tape):
    q, k, v, p, scale, cq, ck, cv, co = cache
    B, H, T, dh = q.shape
    dctx = _linear_bwd(dout, co, tape).reshape(B, T, H, dh).transpose(0, 2, 1, 3)
    dp = dctx @ v.transpose(0, 1, 3, 2)
    dv = p.transpose(0, 1, 3, 2) @ dctx
    dscores = p * (dp - (dp * p).sum(-1, keepdims=True))  # softmax backward; masked entries have p = 0
    dq = dscores @ k * scale
    dk = dscores.transpose(0, 1, 3, 2) @ q * scale
    merge = lambda t: t.transpose(0, 2, 1, 3).reshape(B, T, H * dh)
    # Backward order does not matter: the tape keeps forward order.
    return _linear_bwd(merge(dq), cq, tape) + _linear_bwd(merge(dk), ck, tape) + _linear_bwd(merge(dv), cv, tape)


def _block_fwd(u, W, prefix: str, step: int, config: LoopedConfig, tape: _Tape):
    """Pre-LN block: x = u + Attn(LN1(u)); y = x + MLP(LN2(x)).  W maps local names to arrays."""
    eps = config.ln_eps
    a, c_ln1 = _layer_norm_fwd(u, W["ln1.weight"], W["ln1.bias"], eps, f"{prefix}.ln1", step, tape)
    attn, c_attn = _attention_fwd(a, W, prefix, step, config.n_heads, tape)
    x = u + attn
    m, c_ln2 = _layer_norm_fwd(x, W["ln2.weight"], W["ln2.bias"], eps, f"{prefix}.ln2", step, tape)
    z, c_fc1 = _linear_fwd(m, W["mlp.fc1.weight"], W["mlp.fc1.bias"], f"{prefix}.mlp.fc1", step, tape)
    y, c_fc2 = _linear_fwd(_gelu(z), W["mlp.fc2.weight"], W["mlp.fc2.bias"], f"{prefix}.mlp.fc2", step, tape)
    return x + y, (c_ln1, c_attn, c_ln2, z, c_fc1, c_fc2)


def _block_bwd(dy, cache, tape: _Tape):
    c_ln1, c_attn, c_ln2, z, c_fc1, c_fc2 = cache
    dz = _linear_bwd(_linear_bwd(dy, c_fc2, tape) * _gelu_grad(z), c_fc1, tape)
    dx = dy + _layer_norm_bwd(dz, c_ln2, tape)
    return dx + _layer_norm_bwd(_attention_bwd(dx, c_attn, tape), c_ln1, tape)


# ------------------------------------------------------------------- whole model


def _block_weights(weights, prefix: str, override: Mapping[str, np.ndarray] | None = None):
    W = {k: weights[f"{prefix}.{k}"] for k in _BLOCK_PARAMS}
    for name, w in (override or {}).items():
        W[name[len(prefix) + 1 :]] = w
    return W


def _forward(weights, config: LoopedConfig, tokens, n_steps, tau: int, overrides, tape: _Tape):
    """Logits and everything the backward pass needs."""
    B, T = tokens.shape
    positions = np.broadcast_to(np.arange(T), (B, T)).copy()
    i_tok = tape.record("tok_emb.weight", 0, "embedding", tokens)
    i_pos = tape.record("pos_emb.weight", 0, "embedding", positions)
    e = weights["tok_emb.weight"][tokens] + weights["pos_emb.weight"][positions]

    prelude = []
    for i in range(config.n_prelude):
        e, c = _block_fwd(e, _block_weights(weights, f"prelude.{i}"), f"prelude.{i}", 0, config, tape)
        prelude.append(c)

    h = np.zeros_like(e) if config.input_injection else e
    loop = []
    for s in range(tau):
        u = h + e if config.input_injection else h
        out, c = _block_fwd(u, _block_weights(weights, "block", overrides.get(s)), "block", s, config, tape)
        running = (s < n_steps)[:, None, None]  # early exit: finished examples keep their state
        h = np.where(running, out, h)
        loop.append((c, running))

    coda = []
    for i in range(config.n_coda):
        h, c = _block_fwd(h, _block_weights(weights, f"coda.{i}"), f"coda.{i}", 0, config, tape)
        coda.append(c)

    f, c_lnf = _layer_norm_fwd(h, weights["ln_f.weight"], weights["ln_f.bias"], config.ln_eps, "ln_f", 0, tape)
    head = "tok_emb.weight" if config.tie_embeddings else "head.weight"
    i_head = tape.record(head, 0, "linear", f)
    head_w = weights[head]
    return f @ head_w.T, (i_tok, i_pos, prelude, loop, coda, c_lnf, i_head, head_w)


def _backward(dlogits, cache, config: LoopedConfig, tape: _Tape) -> None:
    """Backpropagate d(per-example loss)/d(logits), filling the tape's grad-outputs."""
    i_tok, i_pos, prelude, loop, coda, c_lnf, i_head, head_w = cache
    tape.grad(i_head, dlogits)
    dh = _layer_norm_bwd(dlogits @ head_w, c_lnf, tape)
    for c in reversed(coda):
        dh = _block_bwd(dh, c, tape)

    de = np.zeros_like(dh)
    for c, running in reversed(loop):
        du = _block_bwd(np.where(running, dh, 0.0), c, tape)  # finished rows: zero gradient
        dh = np.where(running, 0.0, dh) + du  # u = h (+ e'): the previous state gets du
        if config.input_injection:
            de += du  # ... and so does e'
    if not config.input_injection:
        de = dh  # the loop started from h = e'

    for c in reversed(prelude):
        de = _block_bwd(de, c, tape)
    tape.grad(i_tok, de)
    tape.grad(i_pos, de)


def _cross_entropy(logits, targets):
    """Per-example mean NLL over non-ignored positions, and d(loss_b)/d(logits)."""
    mask = targets != IGNORE_INDEX
    safe = np.where(mask, targets, 0)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, safe[..., None], -1)[..., 0]
    count = mask.sum(-1)
    denom = np.maximum(count, 1)
    loss = np.where(mask, nll, 0.0).sum(-1) / denom
    dlogits = np.exp(logp)
    np.put_along_axis(dlogits, safe[..., None], np.take_along_axis(dlogits, safe[..., None], -1) - 1.0, -1)
    dlogits *= (mask / denom[:, None])[..., None]
    return loss, dlogits


# --------------------------------------------------------------------- public API


def forward(weights, config: LoopedConfig, batch, tau=None, block_overrides=None) -> np.ndarray:
    """Logits ``[B, T, V]`` (float64).

    Args:
        weights: name -> canonical array (see :func:`param_shapes`).
        batch: ``{"tokens": int [B, T], "n_steps": optional int [B]}``; example
            ``b`` runs ``min(n_steps[b], tau)`` loop steps.
        tau: loop steps for this call (None: ``config.tau``).
        block_overrides: ``{step: {"block.<name>": array}}`` replaces the loop
            body's weights at the given steps only (untied body).
    """
    tau = _resolve_tau(config, tau)
    tokens, _, n_steps = _check_batch(batch, config, tau, need_targets=False)
    weights = _check_weights(weights, config)
    overrides = _check_overrides(block_overrides, config, tau)
    return _forward(weights, config, tokens, n_steps, tau, overrides, _Tape())[0]


def per_example_loss(weights, config: LoopedConfig, batch, tau=None, block_overrides=None) -> np.ndarray:
    """Per-example loss ``[B]``: mean cross-entropy over each example's target positions."""
    tau = _resolve_tau(config, tau)
    tokens, targets, n_steps = _check_batch(batch, config, tau, need_targets=True)
    weights = _check_weights(weights, config)
    overrides = _check_overrides(block_overrides, config, tau)
    logits = _forward(weights, config, tokens, n_steps, tau, overrides, _Tape())[0]
    return _cross_entropy(logits, targets)[0]


def _select(config: LoopedConfig, select) -> list[str]:
    names = list(param_shapes(config))
    if select is None:
        return names
    wanted = [s.name if isinstance(s, ParamInfo) else s for s in ([select] if isinstance(select, str) else select)]
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise SDIError(f"select: unknown parameter(s) {unknown}; this model has {names}.")
    return [n for n in names if n in wanted]


def loss_and_factors(
    weights, config: LoopedConfig, batch, tau=None, select=None, block_overrides=None
) -> tuple[np.ndarray, list[FactorUse]]:
    """Per-example losses ``[B]`` and the factors of every use of the selected parameters.

    One :class:`FactorUse` per use, in forward order; ``use_index`` numbers the
    *returned* uses ``0, 1, ...``.  ``step`` is the loop step (``0 .. tau-1``)
    for ``block.*`` parameters and 0 for the others.  Grad-outputs are
    gradients of each example's own loss (rows independent).  Examples that
    exited early have zero grad-output rows at the steps they skipped.

    Args:
        select: parameter names (or ParamInfo) to emit; None emits all.
    """
    tau = _resolve_tau(config, tau)
    tokens, targets, n_steps = _check_batch(batch, config, tau, need_targets=True)
    weights = _check_weights(weights, config)
    overrides = _check_overrides(block_overrides, config, tau)
    keep = set(_select(config, select))
    tape = _Tape()
    logits, cache = _forward(weights, config, tokens, n_steps, tau, overrides, tape)
    loss, dlogits = _cross_entropy(logits, targets)
    _backward(dlogits, cache, config, tape)
    uses = [u for u in tape.uses if u.param in keep]
    for i, u in enumerate(uses):
        u.use_index = i
    return loss, uses


def factors_to_gradients(
    uses: Iterable[FactorUse], infos: Iterable[ParamInfo], batch_size: int, steps: Mapping[str, int]
) -> dict[str, np.ndarray]:
    """Materialise per-example, per-step gradients ``[B, S_group, *shape]`` from factor uses.

    Args:
        uses: factor uses (any order); uses of parameters not in ``infos`` are ignored.
        infos: the parameters to materialise (canonical shapes and groups).
        steps: number of step slots per group, e.g. ``group_steps(config, tau)``.
    """
    from .brute_force import per_step_gradients as _materialise

    infos = list(infos)
    names = {p.name for p in infos}
    return _materialise([u for u in uses if u.param in names], infos, batch_size, steps)


def per_step_gradients(
    weights, config: LoopedConfig, batch, tau=None, select=None, block_overrides=None
) -> dict[str, np.ndarray]:
    """Exact per-example, per-step gradients, name -> ``[B, S_g, *shape]``.

    ``S_g`` is ``tau`` for ``block.*`` parameters and 1 for prelude/coda ones.
    """
    tau = _resolve_tau(config, tau)
    _, uses = loss_and_factors(weights, config, batch, tau, select, block_overrides)
    names = set(_select(config, select))
    infos = [p for p in param_infos(config) if p.name in names]
    B = np.asarray(batch["tokens"]).shape[0]
    return factors_to_gradients(uses, infos, B, group_steps(config, tau))


def full_gradients(
    weights, config: LoopedConfig, batch, tau=None, select=None, block_overrides=None
) -> dict[str, np.ndarray]:
    """Exact per-example gradients of the per-example loss, name -> ``[B, *shape]``."""
    per_step = per_step_gradients(weights, config, batch, tau, select, block_overrides)
    return {n: g.sum(1) for n, g in per_step.items()}
