"""The JAX fast path of the core's CountSketch (blocked leading-axis scatter) against the portable path."""
from __future__ import annotations

import numpy as np
import pytest

from sdi_core.countsketch import _JAX_ROW_BLOCK, HashTable, countsketch
from sdi_core.reference.brute_force import countsketch_loop


@pytest.mark.parametrize("rows", [1, _JAX_ROW_BLOCK, _JAX_ROW_BLOCK + 1, 3 * _JAX_ROW_BLOCK + 5])
def test_blocked_jax_scatter_equals_portable_and_loop(jax_x64, rows):
    import jax.numpy as jnp

    rng = np.random.default_rng(rows)
    n, m = 300, 16  # many collisions per bucket
    table = HashTable(rng.integers(0, m, n), rng.choice([-1.0, 1.0], n), m)
    values = rng.normal(size=(rows, 2, n))
    native = np.asarray(countsketch(jnp.asarray(values), table, method="native"))
    portable = np.asarray(countsketch(jnp.asarray(values), table, method="portable"))
    loop = np.stack([[countsketch_loop(v, table.index, table.sign, m) for v in row] for row in values])
    assert native.shape == (rows, 2, m), f"native countsketch of {values.shape} gave {native.shape}"
    np.testing.assert_allclose(native, loop, rtol=1e-12, atol=1e-12,
                               err_msg=f"jax native countsketch, {rows} rows, vs explicit loop")
    np.testing.assert_allclose(portable, loop, rtol=1e-12, atol=1e-12,
                               err_msg=f"jax portable countsketch, {rows} rows, vs explicit loop")


def test_blocked_jax_scatter_under_jit_and_grad(jax_x64):
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    n, m, rows = 50, 7, 20
    table = HashTable(rng.integers(0, m, n), rng.choice([-1.0, 1.0], n), m)
    values = jnp.asarray(rng.normal(size=(rows, n)))
    weights = jnp.asarray(rng.normal(size=(rows, m)))
    f = jax.jit(lambda v: jnp.sum(countsketch(v, table, method="native") * weights))
    grad = np.asarray(jax.grad(f)(values))
    # d/dv[r, j] of sum_k w[r, k] CS(v)[r, k] = w[r, h(j)] s(j)
    want = np.asarray(weights)[:, table.index] * table.sign
    np.testing.assert_allclose(grad, want, rtol=1e-12, atol=1e-12, err_msg="grad of jitted blocked countsketch")
