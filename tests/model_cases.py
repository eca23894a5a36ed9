"""The small looped-transformer cases shared by the PyTorch and JAX model tests."""

from __future__ import annotations

import numpy as np

from sdi_core.reference import looped_transformer as lt

V, D, H, T, B, TAU = 7, 8, 2, 5, 4, 3
TOL = 1e-10

CONFIGS = {
    "plain": (dict(), {}),
    "prelude_coda_tied_injection": (dict(n_prelude=1, n_coda=1, tie_embeddings=True, input_injection=True), {}),
    "early_exit": (dict(n_coda=1), {"n_steps": np.array([3, 1, 0, 2])}),
    "early_exit_tied_injection": (
        dict(tie_embeddings=True, input_injection=True),
        {"n_steps": np.array([0, 2, 5, 1])},
    ),
    "tau_query_5": (dict(n_prelude=1), {"tau": 5}),
    "tau_query_2": (dict(tie_embeddings=True), {"tau": 2}),
}


def make_case(name: str, seed: int = 0):
    cfg_kw, extra = CONFIGS[name]
    config = lt.LoopedConfig(vocab_size=V, d_model=D, n_heads=H, tau=TAU, max_len=T + 1, **cfg_kw)
    weights = lt.init_weights(config, seed)
    rng = np.random.default_rng(seed + 100)
    targets = rng.integers(0, V, (B, T))
    targets[0, :2] = lt.IGNORE_INDEX
    targets[3] = lt.IGNORE_INDEX  # an example without targets
    batch = {"tokens": rng.integers(0, V, (B, T)), "targets": targets}
    if "n_steps" in extra:
        batch["n_steps"] = extra["n_steps"]
    return config, weights, batch, extra.get("tau")
