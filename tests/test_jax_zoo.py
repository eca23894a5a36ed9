"""Third-party JAX models and loop patterns: exact against the untied ``vmap(grad)`` ground truth.

Flax linen (``nn.scan`` with broadcast params), Flax NNX (a Python loop), Equinox (``lax.scan`` over a
closed-over block), a ``stop_gradient`` prefix of steps and ``jax.checkpoint`` around the body.  Every
case is float64 with random weights; the capture's exact features must equal
:func:`sdi_jax.untied_baseline` of the same model written with one weight copy per step, to 1e-10.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
flax = pytest.importorskip("flax")  # in the "test" extra
eqx = pytest.importorskip("equinox")
import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import sdi_core  # noqa: E402
import sdi_jax  # noqa: E402
from sdi_jax.baseline import untied_baseline  # noqa: E402

V, D, TAU = 11, 8, 3
TOL = 1e-10


def batch_of(B, T, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": jnp.asarray(rng.integers(0, V, (B, T))), "y": jnp.asarray(rng.integers(0, V, (B, T)))}


def xent(logits, y):
    lp = jax.nn.log_softmax(logits, -1)
    return -jnp.take_along_axis(lp, y[..., None], -1)[..., 0].mean(-1)


def f64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def assert_exact(loss, untied, params, loop, batch, transposed=()):
    """Capture's exact features == the untied baseline's, relative to the ground truth's scale."""
    ck = [sdi_core.Checkpoint(params)]
    attr = sdi_jax.Attributor(loss, loop=loop, sketch=sdi_core.Exact(), progress=False)
    got = attr.featurize([batch], ck)
    want = untied_baseline(untied, loop, [batch], checkpoints=ck, tau=TAU,
                           params=attr.capture_plan(params, batch).params, transposed=transposed)
    assert got.steps == want.steps, (got.steps, want.steps)
    for g, w in want.data[0].items():
        w = np.asarray(w)
        a = np.asarray(got.data[0][g])
        scale = float(np.abs(w).max())
        assert scale > 0, f"group {g!r}: the ground truth is zero, the case tests nothing"
        err = float(np.abs(a - w).max()) / scale
        assert err <= TOL, f"group {g!r}: relative error {err:.3g} against the untied baseline"
    return got, attr


@pytest.fixture(autouse=True)
def _x64(jax_x64):
    yield


# --------------------------------------------------------------------------- Flax linen, nn.scan


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, h, _=None):
        z = nn.Dense(2 * D, param_dtype=jnp.float64)(nn.LayerNorm(param_dtype=jnp.float64)(h))
        return h + nn.Dense(D, param_dtype=jnp.float64)(jax.nn.gelu(z)), None


class LinenModel(nn.Module):
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        h = nn.Embed(V, D, param_dtype=jnp.float64)(x)
        block = nn.remat(LinenBlock) if self.remat else LinenBlock
        scan = nn.scan(block, variable_broadcast="params", split_rngs={"params": False}, length=TAU)
        h, _ = scan(name="body")(h, None)
        return nn.Dense(V, param_dtype=jnp.float64, name="head")(h)


@pytest.mark.parametrize("remat", [False, True], ids=["scan", "scan_remat"])
@pytest.mark.parametrize("B,T", [(4, 6), (6, 6)], ids=["B!=T", "B==T"])  # JAX's batch axes come from vmap
def test_flax_linen_scan_with_broadcast_params(remat, B, T):
    m = LinenModel(remat=remat)
    batch = batch_of(B, T)
    params = f64(m.init(jax.random.PRNGKey(0), batch["x"]))

    def loss(p, b):
        return xent(m.apply(p, b["x"]), b["y"])

    def untied(p, copies, b):
        pp = p["params"]
        h = nn.Embed(V, D, param_dtype=jnp.float64).apply({"params": pp["Embed_0"]}, b["x"])
        for s in range(TAU):
            h, _ = LinenBlock().apply({"params": copies[s]}, h)
        return xent(nn.Dense(V, param_dtype=jnp.float64).apply({"params": pp["head"]}, h), b["y"])

    assert_exact(loss, untied, params, lambda p: p["params"]["body"], batch,
                 transposed=lambda n: n.endswith("kernel"))


# --------------------------------------------------------------------------- Flax NNX, Python loop


class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.ln = nnx.LayerNorm(D, param_dtype=jnp.float64, rngs=rngs)
        self.fc = nnx.Linear(D, 2 * D, param_dtype=jnp.float64, rngs=rngs)
        self.proj = nnx.Linear(2 * D, D, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, h):
        return h + self.proj(jax.nn.gelu(self.fc(self.ln(h))))


class NNXModel(nnx.Module):
    def __init__(self, rngs):
        self.emb = nnx.Embed(V, D, param_dtype=jnp.float64, rngs=rngs)
        self.block = NNXBlock(rngs)
        self.head = nnx.Linear(D, V, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        h = self.emb(x)
        for _ in range(TAU):
            h = self.block(h)
        return self.head(h)


def test_flax_nnx_python_loop(B=4, T=6):
    graphdef, state = nnx.split(NNXModel(nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)

    def model_of(p):
        st = nnx.eval_shape(lambda: NNXModel(nnx.Rngs(0)))
        _, s = nnx.split(st)
        nnx.replace_by_pure_dict(s, p)
        return nnx.merge(graphdef, s)

    def loss(p, b):
        return xent(model_of(p)(b["x"]), b["y"])

    def untied(p, copies, b):
        m = model_of(p)
        h = m.emb(b["x"])
        for s in range(TAU):
            m_s = model_of({**p, "block": copies[s]})
            h = m_s.block(h)
        return xent(m.head(h), b["y"])

    assert_exact(loss, untied, params, lambda p: p["block"], batch_of(B, T),
                 transposed=lambda n: n.endswith("kernel"))


# --------------------------------------------------------------------------- Equinox, lax.scan


class EqxBlock(eqx.Module):
    ln: eqx.nn.LayerNorm
    fc: eqx.nn.Linear
    proj: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.ln = eqx.nn.LayerNorm(D, dtype=jnp.float64)
        self.fc = eqx.nn.Linear(D, 2 * D, key=k1, dtype=jnp.float64)
        self.proj = eqx.nn.Linear(2 * D, D, key=k2, dtype=jnp.float64)

    def __call__(self, h):  # one token [D]: Equinox layers are unbatched
        return h + self.proj(jax.nn.gelu(self.fc(self.ln(h))))


class EqxModel(eqx.Module):
    emb: eqx.nn.Embedding
    block: EqxBlock
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.emb = eqx.nn.Embedding(V, D, key=k1, dtype=jnp.float64)
        self.block = EqxBlock(k2)
        self.head = eqx.nn.Linear(D, V, key=k3, dtype=jnp.float64)


def eqx_logits(m, x, block_at=None, how="scan"):
    h = jax.vmap(jax.vmap(m.emb))(x)
    step = lambda blk, h: jax.vmap(jax.vmap(blk))(h)  # noqa: E731
    if block_at is not None:  # untied: a copy per step
        for s in range(TAU):
            h = step(block_at(s), h)
    elif how == "scan":  # lax.scan over a block closed over from the model
        h, _ = jax.lax.scan(lambda h, _: (step(m.block, h), None), h, None, length=TAU)
    elif how == "stop_gradient_prefix":  # the first step without gradient (truncated backprop)
        h = jax.lax.stop_gradient(step(m.block, h))
        for _ in range(TAU - 1):
            h = step(m.block, h)
    else:  # jax.checkpoint around the body
        body = jax.checkpoint(lambda blk, h: step(blk, h))
        h, _ = jax.lax.scan(lambda h, _: (body(m.block, h), None), h, None, length=TAU)
    return jax.vmap(jax.vmap(m.head))(h)


@pytest.mark.parametrize("how", ["scan", "stop_gradient_prefix", "checkpoint"])
def test_equinox_patterns(how, B=4, T=6):
    model = EqxModel(jax.random.PRNGKey(0))
    params, static = eqx.partition(model, eqx.is_array)

    def loss(p, b):
        return xent(eqx_logits(eqx.combine(p, static), b["x"], how=how), b["y"])

    def untied(p, copies, b):
        m = eqx.combine(p, static)
        block_static = eqx.partition(m.block, eqx.is_array)[1]

        def block_at(s):
            blk = eqx.combine(copies[s], block_static)
            return jax.tree_util.tree_map(jax.lax.stop_gradient, blk) if how == "stop_gradient_prefix" and s == 0 \
                else blk

        return xent(eqx_logits(m, b["x"], block_at=block_at), b["y"])

    got, attr = assert_exact(loss, untied, params, lambda p: p.block, batch_of(B, T))
    if how == "stop_gradient_prefix":
        assert float(np.abs(np.asarray(got.data[0]["loop"])[:, 0]).max()) == 0.0


def test_coverage_report_has_the_torch_structure():
    model = EqxModel(jax.random.PRNGKey(0))
    params, static = eqx.partition(model, eqx.is_array)

    def loss(p, b):
        return xent(eqx_logits(eqx.combine(p, static), b["x"]), b["y"])

    attr = sdi_jax.Attributor(loss, loop=lambda p: p.block, sketch=sdi_core.Exact(), progress=False,
                              groups={"coda": lambda p: p.head})
    got = attr.featurize([batch_of(4, 6)], [sdi_core.Checkpoint(params)])
    cov = got.meta["coverage"]
    assert isinstance(cov, sdi_core.Coverage)
    assert cov.steps_run == {"loop": TAU, "coda": 1} and cov.steps_with_grad == {"loop": TAU, "coda": 1}
    assert cov.uses["block.fc.weight"] == {s: {"linear": 1} for s in range(TAU)}
    assert cov.uses["block.ln.weight"] == {s: {"scale": 1} for s in range(TAU)}
    assert cov.uses["head.bias"] == {0: {"bias": 1}}
    assert cov.unused == []
    assert "block.fc.weight: linear x3; steps 0-2; 1 use(s) per step" in cov.describe()
