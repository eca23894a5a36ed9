"""The JAX looped transformer (unrolled and scan) equals the NumPy reference (float64)."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from sdi_core.factors import SDIError  # noqa: E402
from sdi_core.reference import looped_transformer as lt  # noqa: E402
from sdi_jax import models as jm  # noqa: E402

from model_cases import B, CONFIGS, D, H, T, TAU, TOL, V, make_case  # noqa: E402,F401


@pytest.fixture(scope="module", autouse=True)
def x64():
    """float64 for this module only; the previous setting is restored afterwards."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)




def test_layout_orientation_and_round_trip():
    config, weights, _, _ = make_case("prelude_coda_tied_injection")
    params = jm.params_from_numpy(weights, config)
    assert params["block"]["attn"]["q"]["weight"].dtype == jnp.float64
    assert params["block"]["mlp"]["fc1"]["weight"].shape == (D, 4 * D), "linear kernels are (d_in, d_out) in JAX"
    np.testing.assert_array_equal(params["block"]["mlp"]["fc1"]["weight"], weights["block.mlp.fc1.weight"].T)
    assert params["tok_emb"]["weight"].shape == (V, D) and "head" not in params
    assert params["prelude"]["0"]["ln1"]["bias"].shape == (D,)
    back = jm.params_to_numpy(params, config)
    assert list(back) == list(weights)
    assert all(np.array_equal(back[n], weights[n]) for n in weights)
    # Order is restored even after a tree_map (which sorts dict keys).
    assert list(jm.params_to_numpy(jax.tree.map(lambda x: x, params), config)) == list(weights)
    init = jm.params_to_numpy(jm.init_params(config, 5))
    assert all(np.array_equal(init[n], w) for n, w in lt.init_weights(config, 5).items())


# lax.scan compiles its body, which costs about a second per config: scan runs on the
# configs that exercise injection, early exit, tau_query != tau and prelude/coda.
SCAN_CASES = ["early_exit_tied_injection", "prelude_coda_tied_injection", "tau_query_5"]


@pytest.mark.parametrize(
    "case, scan", [(c, False) for c in sorted(CONFIGS)] + [(c, True) for c in SCAN_CASES]
)
def test_logits_and_losses_match_reference(case, scan):
    config, weights, batch, tau = make_case(case)
    params = jm.params_from_numpy(weights, config)
    fwd = jm.forward_scan if scan else jm.forward
    logits = np.asarray(fwd(params, config, batch, tau))
    np.testing.assert_allclose(logits, lt.forward(weights, config, batch, tau), rtol=0, atol=TOL, err_msg=case)
    loss = np.asarray(jm.per_example_loss(params, batch, config, tau, scan=scan))
    np.testing.assert_allclose(loss, lt.per_example_loss(weights, config, batch, tau), rtol=0, atol=TOL)
    assert loss[3] == 0.0


@pytest.mark.parametrize(
    "case, scan",
    [(c, False) for c in sorted(CONFIGS)] + [("early_exit_tied_injection", True)],
)
def test_per_example_gradients_match_reference(case, scan):
    config, weights, batch, tau = make_case(case)
    params = jm.params_from_numpy(weights, config)

    def loss_one(p, example):
        single = {k: v[None] for k, v in example.items()}
        return jm.per_example_loss(p, single, config, tau, scan=scan)[0]

    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    grads = jax.vmap(jax.grad(loss_one), in_axes=(None, 0))(params, jbatch)
    grads = jm.params_to_numpy(grads, config)  # linear kernels back to (d_out, d_in)
    expected = lt.full_gradients(weights, config, batch, tau)
    for name, g in expected.items():
        np.testing.assert_allclose(grads[name], g, rtol=0, atol=TOL, err_msg=f"[{case}, scan={scan}] {name}")


def test_jit_with_static_config():
    config, weights, batch, tau = make_case("early_exit")
    params = jm.params_from_numpy(weights, config)
    f = jax.jit(jm.per_example_loss, static_argnames=("config", "tau", "scan"))
    np.testing.assert_allclose(
        np.asarray(f(params, batch, config=config, scan=True)), lt.per_example_loss(weights, config, batch), atol=TOL
    )


def test_errors():
    config, weights, batch, _ = make_case("plain")
    with pytest.raises(SDIError, match="missing"):
        jm.params_from_numpy({n: w for n, w in weights.items() if n != "head.weight"}, config)
    with pytest.raises(SDIError, match="shape"):
        jm.params_from_numpy({**weights, "block.attn.q.weight": np.zeros((D, D + 1))}, config)
    params = jm.params_from_numpy(weights, config)
    with pytest.raises(SDIError, match="max_len"):
        jm.forward(params, config, {"tokens": np.zeros((1, T + 2), dtype=int)})
    with pytest.raises(SDIError, match="tau"):
        jm.forward(params, config, batch, tau=-1)
