"""Canonical models: NumPy weights plus an architecture description, and their exact references.

Every backend builds these models in its own framework from
:class:`ModelSpec` (``spec.arch`` says what to build, ``spec.weights`` holds
the canonical float64 weights); the suite compares what the backend returns
with the float64 NumPy references computed here.

Two architecture families (``spec.arch["family"]``):

``"looped_transformer"``
    The NumPy reference looped transformer
    (:mod:`sdi_core.reference.looped_transformer`): pre-LN GPT blocks,
    ``n_prelude`` untied blocks, one body block applied ``tau`` times,
    ``n_coda`` untied blocks, final LayerNorm and a head (or the token
    embedding when ``tie_embeddings``).  ``spec.arch["config"]`` holds the
    keyword arguments of :class:`~sdi_core.reference.looped_transformer.LoopedConfig`.
    Batches: ``tokens`` int64 ``[B, T]``, ``targets`` int64 ``[B, T]``
    (``-100`` ignored), optionally ``n_steps`` int64 ``[B]`` (example ``b``
    runs ``min(n_steps[b], tau)`` loop steps, then keeps its state).
    Per-example loss: mean cross-entropy over the non-ignored positions.

``"looped_mlp"``
    A residual MLP on feature vectors (no token axis), keys of ``spec.arch``:
    ``d_in, d_hidden, d_mlp, n_classes, tau, body`` and ``unused_param``::

        h = x @ embed.weight^T + embed.bias                      # "prelude"
        for s in range(tau):                                      # "loop"
            body "two_layer":     h = h + fc2(tanh(fc1(h)))
                                  fc1 = block.fc1.{weight (d_mlp, d_hidden), bias}
                                  fc2 = block.fc2.{weight (d_hidden, d_mlp), bias}
            body "shared_twice":  h = h + tanh(fc(tanh(fc(h))))  # one weight, two uses per step
                                  fc = block.fc.{weight (d_hidden, d_hidden), bias}
        logits = h @ head.weight^T + head.bias                   # "coda"
        loss_b = -log_softmax(logits_b)[y_b]

    with ``fc(v) = v @ weight^T + bias``.  When ``unused_param`` is true the
    model also owns ``unused.weight (d_hidden, d_hidden)`` (registered last),
    which the forward pass never uses: selected as a group of its own, it
    tests the "selection never used" error.  Batches: ``x`` float64
    ``[B, d_in]``, ``y`` int64 ``[B]``.

    With ``tokens`` set (``seq_first_mlp``) the inputs have a token axis,
    ``x`` float64 ``[B, T, d_in]``, the body acts on every token, and the
    head reads the mean over tokens: ``logits = mean_t(h) @ head.weight^T +
    head.bias``.  With ``seq_first`` the backend must run the body on
    sequence-first activations (``h.transpose(0, 1)``, ``[T, B, d]``, before
    the loop, back after it), as PyTorch's default layers do; the factors it
    reports are the same (examples first), so a backend that finds the
    example axis from sizes fails, and with ``B == T`` it fails silently.

The canonical models (:data:`CANONICAL_MODELS`):

=====================  ====================  ==================================================
name                   family                what it exercises
=====================  ====================  ==================================================
``looped_transformer``  looped_transformer   every use kind (embedding, linear, bias, LayerNorm
                                             scale), three groups, attention
``looped_mlp``          looped_mlp           uses without a token axis (``[B, d]`` factors)
``prelude_coda_tied``   looped_transformer   untied prelude and coda blocks, a tied
                                             embedding/unembedding, input injection
``early_exit``          looped_transformer   ``n_steps`` per example: steps whose output
                                             never reaches some examples' loss
``weight_used_twice``   looped_mlp           one weight used twice in every step
``seq_first_mlp``       looped_mlp           a token axis and a sequence-first body ``[T, B, d]``
=====================  ====================  ==================================================

Every parameter of a model is selected (``spec.params``, in definition order,
each with its group), so every group and every use kind is checked.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

import numpy as np

from sdi_core import FactorUse, ParamInfo, SDIError
from sdi_core.reference import looped_transformer as lt

__all__ = [
    "CANONICAL_MODELS",
    "ModelSpec",
    "get_model",
    "mlp_param_shapes",
    "mlp_loss_and_factors",
]

CANONICAL_MODELS = ("looped_transformer", "looped_mlp", "prelude_coda_tied", "early_exit", "weight_used_twice",
                    "seq_first_mlp")

_SEQ_LEN = 5
# Early-exit loop counts, cycled over the batch.  Every half of a 4-row batch
# leaves some step that no example of that half reaches.
_EARLY_EXIT_STEPS = (2, 0, 3, 1)


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """One canonical model: what to build, its weights, and what to attribute through.

    Attributes:
        name: canonical model name (a key of :data:`CANONICAL_MODELS`).
        arch: architecture description, ``{"family": ..., ...}`` (see the module docstring).
        weights: canonical float64 weights ``{name: array}`` (linear weights
            ``(d_out, d_in)``, embeddings ``(num, dim)``), definition order.
        params: the selected parameters (every parameter of the model), with groups.
        steps: number of step slots per group, e.g. ``{"prelude": 1, "loop": 3, "coda": 1}``.
        description: one line saying what the model exercises.
    """

    name: str
    arch: Mapping[str, Any]
    weights: Mapping[str, np.ndarray]
    params: tuple[ParamInfo, ...]
    steps: Mapping[str, int]
    description: str = ""

    # ------------------------------------------------------------- data
    @property
    def family(self) -> str:
        return self.arch["family"]

    @property
    def tau(self) -> int:
        return int(self.steps["loop"])

    def config(self) -> lt.LoopedConfig:
        """The :class:`LoopedConfig` of a ``looped_transformer``-family model."""
        if self.family != "looped_transformer":
            raise SDIError(f"Model {self.name!r} is a {self.family!r}, not a looped_transformer.")
        return lt.LoopedConfig(**self.arch["config"])

    def batch(self, size: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
        """A deterministic batch of ``size`` examples (NumPy arrays; see the module docstring)."""
        rng = np.random.default_rng([seed, _name_seed(self.name)])
        if self.family == "looped_transformer":
            cfg = self.arch["config"]
            tokens = rng.integers(0, cfg["vocab_size"], (size, _SEQ_LEN), dtype=np.int64)
            targets = rng.integers(0, cfg["vocab_size"], (size, _SEQ_LEN), dtype=np.int64)
            targets[0, :2] = lt.IGNORE_INDEX  # ignored positions must carry no gradient
            out = {"tokens": tokens, "targets": targets}
            if self.arch.get("early_exit"):
                out["n_steps"] = np.array([_EARLY_EXIT_STEPS[i % 4] for i in range(size)], dtype=np.int64)
            return out
        tokens = self.arch.get("tokens")
        x = rng.standard_normal((size, self.arch["d_in"]) if not tokens else (size, tokens, self.arch["d_in"]))
        y = rng.integers(0, self.arch["n_classes"], size, dtype=np.int64)
        return {"x": x, "y": y}

    def perturbed_weights(self, seed: int, scale: float = 0.05) -> dict[str, np.ndarray]:
        """The weights plus ``scale`` times standard normal noise: a different checkpoint."""
        rng = np.random.default_rng([seed, _name_seed(self.name), 7])
        return {k: w + scale * rng.standard_normal(w.shape) for k, w in self.weights.items()}

    def copy_weights(self) -> dict[str, np.ndarray]:
        """A deep copy of the weights (the suite hands copies to backends)."""
        return {k: np.array(w, copy=True) for k, w in self.weights.items()}

    def with_unused_parameter(self) -> "ModelSpec":
        """This (looped_mlp-family) model plus ``unused.weight``, never used by the forward pass,
        selected as a group of its own (``"unused"``, one slot)."""
        if self.family != "looped_mlp":
            raise SDIError(f"with_unused_parameter needs a looped_mlp-family model, got {self.name!r}.")
        arch = dict(self.arch, unused_param=True)
        d = arch["d_hidden"]
        weights = dict(self.copy_weights())
        weights["unused.weight"] = np.random.default_rng(5).standard_normal((d, d)) / math.sqrt(d)
        params = self.params + (ParamInfo("unused.weight", (d, d), "unused"),)
        return dataclasses.replace(self, arch=arch, weights=weights, params=params, steps=dict(self.steps, unused=1))

    def without_params(self, names) -> "ModelSpec":
        """This model with a smaller selection (every parameter except ``names``)."""
        names = set(names)
        return dataclasses.replace(self, params=tuple(p for p in self.params if p.name not in names))

    def describe(self) -> str:
        """A short description for failure messages."""
        if self.family == "looped_transformer":
            c = self.arch["config"]
            extras = [k for k in ("n_prelude", "n_coda") if c.get(k)]
            flags = [k for k in ("tie_embeddings", "input_injection") if c.get(k)]
            more = "".join(f", {k}={c[k]}" for k in extras) + "".join(f", {k}" for k in flags)
            more += ", n_steps per example" if self.arch.get("early_exit") else ""
            return (
                f"{self.name!r} (looped transformer: V={c['vocab_size']}, d={c['d_model']}, "
                f"heads={c['n_heads']}, tau={c['tau']}, T={_SEQ_LEN}{more})"
            )
        a = self.arch
        tok = f", T={a['tokens']} tokens" if a.get("tokens") else ""
        return (
            f"{self.name!r} (looped MLP, body {a['body']}: d_in={a['d_in']}, d_hidden={a['d_hidden']}, "
            f"tau={a['tau']}{', with an unused parameter unused.weight' if a.get('unused_param') else ''}"
            f"{tok}"
            f"{', sequence-first body [T, B, d]' if a.get('seq_first') else ''})"
        )

    # -------------------------------------------------------- references
    def reference_factors(self, batch, weights=None) -> tuple[np.ndarray, list[FactorUse]]:
        """Per-example losses ``[B]`` and the reference factor stream (float64, forward order)."""
        weights = self.weights if weights is None else weights
        select = [p.name for p in self.params]
        if self.family == "looped_transformer":
            return lt.loss_and_factors(weights, self.config(), batch, select=select)
        return mlp_loss_and_factors(weights, self.arch, batch, select=select)

    def reference_per_step_gradients(self, batch, weights=None) -> dict[str, np.ndarray]:
        """Exact per-step gradients ``{name: [B, S_g, *shape]}`` (float64)."""
        _, uses = self.reference_factors(batch, weights)
        b = _batch_size(batch)
        return lt.factors_to_gradients(uses, self.params, b, self.steps)

    def reference_full_gradients(self, batch, weights=None) -> dict[str, np.ndarray]:
        """Exact per-example gradients of the tied model ``{name: [B, *shape]}`` (float64)."""
        return {n: g.sum(axis=1) for n, g in self.reference_per_step_gradients(batch, weights).items()}

    def reference_loss(self, batch, weights=None) -> np.ndarray:
        """Per-example losses ``[B]`` (float64)."""
        weights = self.weights if weights is None else weights
        if self.family == "looped_transformer":
            return lt.per_example_loss(weights, self.config(), batch)
        return mlp_loss_and_factors(weights, self.arch, batch, select=[])[0]


def _batch_size(batch) -> int:
    return int(np.asarray(batch["tokens"] if "tokens" in batch else batch["x"]).shape[0])


def _name_seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


# --------------------------------------------------------------------------- looped MLP


def mlp_param_shapes(arch: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of a looped_mlp's parameters, in definition order."""
    d_in, d, m, c = arch["d_in"], arch["d_hidden"], arch["d_mlp"], arch["n_classes"]
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (d, d_in), "embed.bias": (d,)}
    if arch["body"] == "two_layer":
        shapes.update({"block.fc1.weight": (m, d), "block.fc1.bias": (m,),
                       "block.fc2.weight": (d, m), "block.fc2.bias": (d,)})  # fmt: skip
    elif arch["body"] == "shared_twice":
        shapes.update({"block.fc.weight": (d, d), "block.fc.bias": (d,)})
    else:
        raise SDIError(f"looped_mlp: unknown body {arch['body']!r}; expected 'two_layer' or 'shared_twice'.")
    shapes.update({"head.weight": (c, d), "head.bias": (c,)})
    if arch.get("unused_param"):
        shapes["unused.weight"] = (d, d)
    return shapes


def _mlp_group(name: str) -> str:
    if name.startswith("block."):
        return "loop"
    return "prelude" if name.startswith("embed.") else "coda"


def _mlp_init(arch, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in mlp_param_shapes(arch).items():
        if len(shape) == 2:
            out[name] = rng.standard_normal(shape) / math.sqrt(shape[1])
        else:
            out[name] = 0.1 * rng.standard_normal(shape)
    return out


def _check_mlp_weights(weights, arch) -> dict[str, np.ndarray]:
    shapes = mlp_param_shapes(arch)
    missing = [n for n in shapes if n not in weights]
    extra = [n for n in weights if n not in shapes]
    if missing or extra:
        raise SDIError(f"looped_mlp weights do not match the architecture: missing {missing}, unexpected {extra}.")
    out = {}
    for n, shape in shapes.items():
        w = np.asarray(weights[n], dtype=np.float64)
        if w.shape != shape:
            raise SDIError(f"looped_mlp weight {n!r} has shape {w.shape}; expected {shape} (canonical (d_out, d_in)).")
        out[n] = w
    return out


def mlp_loss_and_factors(weights, arch, batch, select=None) -> tuple[np.ndarray, list[FactorUse]]:
    """Per-example losses ``[B]`` and the factor stream of a looped_mlp (float64, forward order).

    A hand-written forward and backward pass, like the reference transformer's:
    every use is recorded at forward time with its step, and the backward pass
    fills in its grad-output (the gradient of each example's own loss).
    Factors are ``[B, d]`` (no token axis).

    Args:
        select: names of the parameters to emit (None: all).
    """
    W = _check_mlp_weights(weights, arch)
    x = np.asarray(batch["x"], dtype=np.float64)
    y = np.asarray(batch["y"])
    tokens = arch.get("tokens")
    want = (arch["d_in"],) if not tokens else (tokens, arch["d_in"])
    if x.shape[1:] != want:
        raise SDIError(f"looped_mlp batch['x'] must be float [B, {', '.join(map(str, want))}], got shape {x.shape}.")
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise SDIError(f"looped_mlp batch['y'] must be int [B] = [{x.shape[0]}], got {y.dtype} {y.shape}.")
    uses: list[FactorUse] = []

    def record(param, step, kind, activation) -> int:
        uses.append(FactorUse(param, step, kind, activation, None))
        return len(uses) - 1

    def linear(v, prefix, step):
        iw = record(f"{prefix}.weight", step, "linear", v)
        ib = record(f"{prefix}.bias", step, "bias", None)
        return v @ W[f"{prefix}.weight"].T + W[f"{prefix}.bias"], (iw, ib, W[f"{prefix}.weight"])

    def linear_bwd(dy, cache):
        iw, ib, w = cache
        uses[iw].grad_output = dy
        uses[ib].grad_output = dy
        return dy @ w

    h, c_embed = linear(x, "embed", 0)
    caches = []
    for s in range(arch["tau"]):
        if arch["body"] == "two_layer":
            z, c1 = linear(h, "block.fc1", s)
            a = np.tanh(z)
            out, c2 = linear(a, "block.fc2", s)
            caches.append((a, c1, c2))
            h = h + out
        else:
            z1, c1 = linear(h, "block.fc", s)
            a1 = np.tanh(z1)
            z2, c2 = linear(a1, "block.fc", s)
            a2 = np.tanh(z2)
            caches.append((a1, a2, c1, c2))
            h = h + a2
    logits, c_head = linear(h.mean(axis=1) if tokens else h, "head", 0)

    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(x.shape[0])
    loss = -logp[rows, y]
    dlogits = np.exp(logp)
    dlogits[rows, y] -= 1.0  # d(loss_b)/d(logits_b): rows independent

    dh = linear_bwd(dlogits, c_head)
    if tokens:  # the mean over tokens
        dh = np.repeat(dh[:, None, :] / tokens, tokens, axis=1)
    for cache in reversed(caches):
        if arch["body"] == "two_layer":
            a, c1, c2 = cache
            da = linear_bwd(dh, c2)
            dh = dh + linear_bwd(da * (1.0 - a * a), c1)
        else:
            a1, a2, c1, c2 = cache
            dz2 = dh * (1.0 - a2 * a2)
            da1 = linear_bwd(dz2, c2)
            dh = dh + linear_bwd(da1 * (1.0 - a1 * a1), c1)
    linear_bwd(dh, c_embed)

    keep = set(mlp_param_shapes(arch)) if select is None else set(select)
    out = [u for u in uses if u.param in keep]
    for i, u in enumerate(out):
        u.use_index = i
    return loss, out


# --------------------------------------------------------------------------- registry


def _transformer_spec(name: str, description: str, early_exit: bool = False, **config_kw) -> ModelSpec:
    config = lt.LoopedConfig(vocab_size=11, d_model=8, n_heads=2, d_mlp=16, max_len=_SEQ_LEN + 1, **config_kw)
    weights = lt.init_weights(config, seed=_name_seed(name) % 1000)
    params = tuple(lt.param_infos(config))
    steps = {g: s for g, s in lt.group_steps(config).items() if any(p.group == g for p in params)}
    arch = {"family": "looped_transformer", "config": dataclasses.asdict(config), "early_exit": early_exit}
    return ModelSpec(name, arch, weights, params, steps, description)


def _mlp_spec(name: str, description: str, body: str, **extra) -> ModelSpec:
    arch = {"family": "looped_mlp", "d_in": 5, "d_hidden": 8, "d_mlp": 12, "n_classes": 4, "tau": 3,
            "body": body, "unused_param": False, **extra}  # fmt: skip
    weights = _mlp_init(arch, seed=_name_seed(name) % 1000)
    params = tuple(ParamInfo(n, s, _mlp_group(n)) for n, s in mlp_param_shapes(arch).items())
    return ModelSpec(name, arch, weights, params, {"prelude": 1, "loop": arch["tau"], "coda": 1}, description)


@lru_cache(maxsize=None)
def _build(name: str) -> ModelSpec:
    if name == "looped_transformer":
        return _transformer_spec(name, "every use kind, three groups, attention", tau=3)
    if name == "looped_mlp":
        return _mlp_spec(name, "uses without a token axis", "two_layer")
    if name == "prelude_coda_tied":
        return _transformer_spec(
            name, "prelude and coda blocks, tied embedding, input injection",
            tau=2, n_prelude=1, n_coda=1, tie_embeddings=True, input_injection=True,
        )  # fmt: skip
    if name == "early_exit":
        return _transformer_spec(name, "per-example loop counts (n_steps)", early_exit=True, tau=3)
    if name == "weight_used_twice":
        return _mlp_spec(name, "one weight used twice per step", "shared_twice")
    if name == "seq_first_mlp":
        return _mlp_spec(name, "a token axis, sequence-first body", "two_layer", tokens=_SEQ_LEN, seq_first=True)
    raise SDIError(f"Unknown canonical model {name!r}; the canonical models are {list(CANONICAL_MODELS)}.")


def get_model(name: str) -> ModelSpec:
    """The canonical model ``name`` (a fresh copy: mutating it cannot affect other checks)."""
    spec = _build(name)
    return dataclasses.replace(spec, arch=copy.deepcopy(dict(spec.arch)), weights=spec.copy_weights())
