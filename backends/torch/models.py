"""The canonical looped transformer in PyTorch.

Same architecture, parameter names and loss as the NumPy reference
:mod:`sdi_core.reference.looped_transformer`: ``named_parameters()`` yields
exactly the reference's names in the same order, with the same (canonical)
shapes, because ``nn.Linear`` stores ``(d_out, d_in)`` and ``nn.Embedding``
``(num, dim)`` already.

The loop body is one :class:`Block` module called ``tau`` times, so the
loop-body parameters are shared across steps: each call of ``block.attn.q`` is
one *use* of ``block.attn.q.weight``.  Attention is written out by hand (no
``scaled_dot_product_attention``), so float64 works on every device.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sdi_core.factors import SDIError
from sdi_core.reference.looped_transformer import IGNORE_INDEX, LoopedConfig, param_shapes

__all__ = ["LoopedConfig", "Attention", "MLP", "Block", "LoopedGPT", "per_example_loss", "per_example_cross_entropy"]


class Attention(nn.Module):
    """Causal multi-head softmax attention with q/k/v/o linear maps (with bias)."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        B, T, d = a.shape
        H = self.n_heads
        q, k, v = (lin(a).view(B, T, H, d // H).transpose(1, 2) for lin in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) * (1.0 / math.sqrt(d // H))
        causal = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
        p = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        return self.o((p @ v).transpose(1, 2).reshape(B, T, d))


class MLP(nn.Module):
    """fc2(gelu(fc1(x))) with the exact (erf) GELU."""

    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_mlp)
        self.fc2 = nn.Linear(d_mlp, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: ``x = u + Attn(LN1(u)); y = x + MLP(LN2(x))``."""

    def __init__(self, config: LoopedConfig):
        super().__init__()
        d = config.d_model
        self.ln1 = nn.LayerNorm(d, eps=config.ln_eps)
        self.attn = Attention(d, config.n_heads)
        self.ln2 = nn.LayerNorm(d, eps=config.ln_eps)
        self.mlp = MLP(d, config.d_mlp)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        x = u + self.attn(self.ln1(u))
        return x + self.mlp(self.ln2(x))


class LoopedGPT(nn.Module):
    """Looped GPT: embeddings, prelude blocks, one block looped ``tau`` times, coda blocks, head.

    Args:
        config: a :class:`LoopedConfig` (shared with the NumPy reference and JAX).

    ``forward(tokens, n_steps=None, tau=None)`` returns logits ``[B, T, V]``;
    example ``b`` runs ``min(n_steps[b], tau)`` loop steps and then keeps its state.
    """

    def __init__(self, config: LoopedConfig):
        super().__init__()
        if not isinstance(config, LoopedConfig):
            raise SDIError(f"LoopedGPT needs a LoopedConfig, got {type(config).__name__}.")
        self.config = config
        d = config.d_model
        self.tok_emb = nn.Embedding(config.vocab_size, d)
        self.pos_emb = nn.Embedding(config.max_len, d)
        self.prelude = nn.ModuleList(Block(config) for _ in range(config.n_prelude))
        self.block = Block(config)
        self.coda = nn.ModuleList(Block(config) for _ in range(config.n_coda))
        self.ln_f = nn.LayerNorm(d, eps=config.ln_eps)
        if not config.tie_embeddings:
            self.head = nn.Linear(d, config.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style init: normal(0, 0.02) matrices and embeddings, zero biases, unit LN weights."""
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)

    def forward(self, tokens: torch.Tensor, n_steps: torch.Tensor | None = None, tau: int | None = None):
        config = self.config
        tau = config.tau if tau is None else int(tau)
        B, T = tokens.shape
        if T > config.max_len:
            raise SDIError(f"Sequence length {T} exceeds config.max_len={config.max_len}.")
        e = self.tok_emb(tokens) + self.pos_emb(torch.arange(T, device=tokens.device))
        for blk in self.prelude:
            e = blk(e)
        h = torch.zeros_like(e) if config.input_injection else e
        for s in range(tau):
            out = self.block(h + e if config.input_injection else h)
            if n_steps is None:
                h = out
            else:  # early exit: finished examples keep their state
                h = torch.where((n_steps > s).view(-1, 1, 1), out, h)
        for blk in self.coda:
            h = blk(h)
        f = self.ln_f(h)
        return F.linear(f, self.tok_emb.weight) if config.tie_embeddings else self.head(f)

    @classmethod
    def from_numpy(
        cls, config: LoopedConfig, weights: Mapping[str, np.ndarray], dtype: torch.dtype = torch.float64
    ) -> "LoopedGPT":
        """A model holding ``weights`` (canonical NumPy dict, e.g. ``init_weights(config, seed)``)."""
        model = cls(config).to(dtype)
        expected = param_shapes(config)
        missing = [n for n in expected if n not in weights]
        extra = [n for n in weights if n not in expected]
        if missing or extra:
            raise SDIError(f"from_numpy: weights do not match the config: missing {missing}, unexpected {extra}.")
        state = {n: torch.as_tensor(np.asarray(weights[n]), dtype=dtype) for n in expected}
        model.load_state_dict(state, strict=True)
        return model

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Canonical name -> NumPy array (in the parameters' dtype), in definition order."""
        return {n: p.detach().cpu().numpy().copy() for n, p in self.named_parameters()}


def per_example_loss(model: LoopedGPT, batch: Mapping[str, torch.Tensor], tau: int | None = None) -> torch.Tensor:
    """Per-example loss ``[B]``: mean cross-entropy over each example's non-ignored targets.

    ``batch`` holds ``tokens`` and ``targets`` (int ``[B, T]``, ``-100`` ignored)
    and optionally ``n_steps`` (int ``[B]``).  An example without targets has loss 0.
    """
    return per_example_cross_entropy(model(batch["tokens"], batch.get("n_steps"), tau), batch["targets"])


def per_example_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[B, T, V]`` logits, ``[B, T]`` targets -> ``[B]`` mean NLL over non-ignored positions (0 if none)."""
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    count = (targets != IGNORE_INDEX).sum(-1).clamp(min=1)
    return nll.view(targets.shape).sum(-1) / count.to(nll.dtype)
