"""TensorSketch and CountSketch: identities, agreement of routes and fast paths, unbiasedness."""
from __future__ import annotations

import numpy as np
import pytest

from sdi_core import Exact, FactorUse, ParamInfo, SketchPlan, TensorSketch, countsketch, use_features
from sdi_core._array import to_numpy
from sdi_core.countsketch import HashTable
from sdi_core.reference import countsketch_loop, tensorsketch_by_definition, tensorsketch_by_fft, use_gradient
from sdi_core.sketch import outer_features
from sdi_core.specs import make_spec

from conftest import to_xp


def _spec(m=16, rows=5, cols=7, seed=3, name="w"):
    return make_spec(TensorSketch(dim=m, seed=seed), ParamInfo(name, (rows, cols)))


@pytest.mark.parametrize("method", ["portable", "auto"])
def test_countsketch_matches_loop_with_collisions(xp, method):
    rng = np.random.default_rng(0)
    n, m = 40, 6  # many collisions per bucket
    h = rng.integers(0, m, n)
    s = rng.choice([-1.0, 1.0], n)
    v = rng.normal(size=(3, 2, n))
    out = to_numpy(countsketch(to_xp(xp, v), HashTable(h, s, m), method=method))
    expect = np.stack([[countsketch_loop(v[a, b], h, s, m) for b in range(2)] for a in range(3)])
    assert out.shape == (3, 2, m), f"countsketch({method}) returned shape {out.shape}, expected (3, 2, {m})"
    np.testing.assert_allclose(out, expect, rtol=1e-12, atol=1e-12,
                               err_msg=f"countsketch(method={method!r}) on {xp.__name__} vs explicit loop")


@pytest.mark.parametrize("name", ["numpy", "torch", "jax"])  # array_api_strict has no native scatter-add
def test_native_fast_paths_equal_portable(name, request):
    xp = {"numpy": "array_api_compat.numpy", "torch": "array_api_compat.torch", "jax": "jax.numpy"}[name]
    if name == "jax":
        request.getfixturevalue("jax_x64")
    xp = pytest.importorskip(xp)
    rng = np.random.default_rng(1)
    table = HashTable(rng.integers(0, 32, 500), rng.choice([-1.0, 1.0], 500), 32)
    v = to_xp(xp, rng.normal(size=(4, 500)))
    a = to_numpy(countsketch(v, table, method="native"))
    b = to_numpy(countsketch(v, table, method="portable"))
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=f"native vs portable on {xp.__name__}")


def test_tensorsketch_is_countsketch_of_vec_with_combined_hash(xp):
    """TS(g a^T) equals the CountSketch of vec(g a^T) with hash (h_r + h_c) mod m, sign s_r s_c."""
    spec = _spec(m=16, rows=5, cols=7)
    rng = np.random.default_rng(2)
    g = rng.normal(size=(2, 4, 5))  # [B, T, rows]
    a = rng.normal(size=(2, 4, 7))  # [B, T, cols]
    G = np.einsum("btr,btc->brc", g, a)
    expect = np.stack([
        tensorsketch_by_definition(G[b], spec.h_rows, spec.s_rows, spec.h_cols, spec.s_cols, 16) for b in range(2)
    ])
    for route in ("fft", "exact_hash"):
        got = to_numpy(outer_features(to_xp(xp, g), to_xp(xp, a), spec, route=route))
        np.testing.assert_allclose(got, expect, rtol=1e-10, atol=1e-10,
                                   err_msg=f"outer_features(route={route!r}) on {xp.__name__} vs definition")
    # the FFT identity itself, one token
    fft_one = tensorsketch_by_fft(g[0, 0], a[0, 0], spec.h_rows, spec.s_rows, spec.h_cols, spec.s_cols, 16)
    by_def = tensorsketch_by_definition(np.outer(g[0, 0], a[0, 0]), spec.h_rows, spec.s_rows, spec.h_cols,
                                        spec.s_cols, 16)
    np.testing.assert_allclose(fft_one, by_def, atol=1e-12)


def test_row_slice_uses_match_full_gradient(xp):
    """A use touching rows r0:r1 (MultiheadAttention in_proj slices) lands on those rows only."""
    spec = _spec(m=8, rows=6, cols=3)
    rng = np.random.default_rng(4)
    g = rng.normal(size=(2, 3, 2))
    a = rng.normal(size=(2, 3, 3))
    full_g = np.zeros((2, 3, 6))
    full_g[..., 2:4] = g
    for route in ("fft", "exact_hash"):
        part = to_numpy(outer_features(to_xp(xp, g), to_xp(xp, a), spec, row_range=(2, 4), route=route))
        full = to_numpy(outer_features(to_xp(xp, full_g), to_xp(xp, a), spec, route=route))
        np.testing.assert_allclose(part, full, atol=1e-12, err_msg=f"row_slice, route {route}")


@pytest.mark.parametrize("kind", ["linear", "bias", "scale", "embedding", "dense"])
@pytest.mark.parametrize("sketch", [Exact(), TensorSketch(dim=8, seed=5)], ids=["exact", "ts8"])
def test_use_features_equal_sketch_of_materialised_gradient(xp, kind, sketch):
    rng = np.random.default_rng(6)
    B, T = 3, 4
    shapes = {"linear": (5, 4), "bias": (12,), "scale": (12,), "embedding": (6, 3), "dense": (4, 5)}
    p = ParamInfo("p." + kind, shapes[kind])
    spec = make_spec(sketch, p)
    if kind == "linear":
        act, go = rng.normal(size=(B, T, 4)), rng.normal(size=(B, T, 5))
    elif kind == "bias":
        act, go = None, rng.normal(size=(B, T, 12))
    elif kind == "scale":
        act, go = rng.normal(size=(B, T, 12)), rng.normal(size=(B, T, 12))
    elif kind == "embedding":
        act, go = rng.integers(0, 6, size=(B, T)), rng.normal(size=(B, T, 3))
    else:
        act, go = None, rng.normal(size=(B, 4, 5))
    use_np = FactorUse(p.name, 0, kind, act, go)
    grad = use_gradient(use_np, p).reshape(B, -1)
    if spec.mode == "exact":
        expect = grad
    else:
        t = spec.flat_table()
        expect = np.stack([countsketch_loop(grad[b], t.index, t.sign, t.m) for b in range(B)])
    act_x = None if act is None else (xp.asarray(act) if kind == "embedding" else to_xp(xp, act))
    got = to_numpy(use_features(FactorUse(p.name, 0, kind, act_x, to_xp(xp, go)), spec))
    np.testing.assert_allclose(got, expect, rtol=1e-10, atol=1e-10,
                               err_msg=f"use_features({kind}, {sketch}) on {xp.__name__}")


def test_embedding_ignore_index_contributes_nothing(xp):
    p = ParamInfo("emb", (5, 3))
    spec = make_spec(Exact(), p)
    ids = np.array([[0, 2, 2], [1, 0, 4]])
    g = np.random.default_rng(7).normal(size=(2, 3, 3))
    got = to_numpy(use_features(FactorUse("emb", 0, "embedding", xp.asarray(ids), to_xp(xp, g), ignore_index=0),
                                spec)).reshape(2, 5, 3)
    assert np.all(got[:, 0] == 0), "rows of the ignored id must get no gradient"
    np.testing.assert_allclose(got[0, 2], g[0, 1] + g[0, 2], atol=1e-12)


def test_routes_agree_at_realistic_size():
    rng = np.random.default_rng(8)
    spec = _spec(m=256, rows=48, cols=32)
    g, a = rng.normal(size=(4, 20, 48)), rng.normal(size=(4, 20, 32))
    f1 = outer_features(g, a, spec, route="fft")
    f2 = outer_features(g, a, spec, route="exact_hash")
    np.testing.assert_allclose(f1, f2, rtol=1e-9, atol=1e-9)


def test_same_seed_same_features_across_namespaces(jax_x64):
    """numpy, torch and jax give the same sketched features for the same factors (float64, 1e-12)."""
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(9)
    p = ParamInfo("block.fc1.weight", (24, 16))
    spec = make_spec(TensorSketch(dim=64, seed=11), p)
    g, a = rng.normal(size=(3, 5, 24)), rng.normal(size=(3, 5, 16))
    ref = use_features(FactorUse(p.name, 0, "linear", a, g), spec)
    for route in ("fft", "exact_hash"):
        t = use_features(FactorUse(p.name, 0, "linear", torch.from_numpy(a), torch.from_numpy(g)), spec, route=route)
        j = use_features(FactorUse(p.name, 0, "linear", jnp.asarray(a), jnp.asarray(g)), spec, route=route)
        assert str(j.dtype) == "float64", f"jax features dtype {j.dtype}, expected float64"
        np.testing.assert_allclose(to_numpy(t), ref, atol=1e-12, err_msg=f"torch vs numpy, {route}")
        np.testing.assert_allclose(to_numpy(j), ref, atol=1e-12, err_msg=f"jax vs numpy, {route}")


def test_specs_depend_only_on_seed_name_and_shape():
    a = SketchPlan(TensorSketch(dim=16, seed=1), [ParamInfo("x", (8, 8)), ParamInfo("y", (9, 9))])
    b = SketchPlan(TensorSketch(dim=16, seed=1), [ParamInfo("y", (9, 9)), ParamInfo("z", (40,))])
    assert np.array_equal(a.spec("y").h_rows, b.spec("y").h_rows), "adding a parameter changed another's hash"
    c = SketchPlan(TensorSketch(dim=16, seed=2), [ParamInfo("y", (9, 9))])
    assert not np.array_equal(a.spec("y").h_rows, c.spec("y").h_rows), "a different seed gave the same hash"
    small = SketchPlan(TensorSketch(dim=16, seed=1), [ParamInfo("b", (16,))])
    assert small.spec("b").mode == "exact", "a tensor with at most dim elements must be stored exactly"


def test_unbiased_over_2000_seeds_and_error_falls_like_inverse_sqrt_m():
    """E<TS(X), TS(Y)> = <X, Y>: the mean over 2000 seeds is within 3 standard errors."""
    rng = np.random.default_rng(10)
    rows, cols, B = 12, 10, 2
    g = rng.normal(size=(B, 3, rows))
    a = rng.normal(size=(B, 3, cols))
    G = np.einsum("btr,btc->brc", g, a).reshape(B, -1)
    exact = float(G[0] @ G[1])

    def estimates(m, n_seeds):
        out = np.empty(n_seeds)
        for seed in range(n_seeds):
            spec = make_spec(TensorSketch(dim=m, seed=seed), ParamInfo("w", (rows, cols)))
            f = outer_features(g, a, spec, route="exact_hash")
            out[seed] = f[0] @ f[1]
        return out

    est = estimates(16, 2000)
    se = est.std(ddof=1) / np.sqrt(len(est))
    assert abs(est.mean() - exact) < 3 * se, f"mean sketched inner product {est.mean()} vs exact {exact} (se {se})"
    err = {m: np.sqrt(np.mean((estimates(m, 300) - exact) ** 2)) for m in (16, 64)}
    ratio = err[16] / err[64]  # 1/sqrt(m) predicts 2
    assert 1.4 < ratio < 2.9, f"RMS error ratio m=16 vs m=64 is {ratio:.2f}; 1/sqrt(m) scaling predicts 2"


@pytest.mark.parametrize("sketch", [Exact(), TensorSketch(dim=8, seed=0)], ids=["exact", "ts8"])
@pytest.mark.parametrize("route", ["fft", "exact_hash"])
def test_no_device_or_dtype_leaks_on_array_api_strict_device1(sketch, route):
    """Features stay on the factors' device and in float32 for float32 factors (array_api_strict device1)."""
    xs = pytest.importorskip("array_api_strict")
    dev = xs.Device("device1")
    rng = np.random.default_rng(12)
    cases = [
        ("linear", (5, 4), rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 5))),
        ("embedding", (6, 3), rng.integers(0, 6, (2, 3)), rng.normal(size=(2, 3, 3))),
        ("scale", (30,), rng.normal(size=(2, 3, 30)), rng.normal(size=(2, 3, 30))),
        ("bias", (30,), None, rng.normal(size=(2, 3, 30))),
    ]
    for kind, shape, act, go in cases:
        spec = make_spec(sketch, ParamInfo("p", shape))
        a = None if act is None else xs.asarray(act if kind == "embedding" else act.astype(np.float32), device=dev)
        f = use_features(FactorUse("p", 0, kind, a, xs.asarray(go.astype(np.float32), device=dev)), spec, route=route)
        assert f.device == dev, f"{kind}/{route}: features on {f.device}, factors on {dev}"
        assert f.dtype == xs.float32, f"{kind}/{route}: float32 factors gave {f.dtype} features"
