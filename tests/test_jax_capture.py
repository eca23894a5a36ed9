"""sdi_jax capture: factor streams of pure JAX losses against float64 references.

The canonical looped transformer (:mod:`sdi_jax.models`, unrolled and
``lax.scan``) is checked use by use against the NumPy reference's factor
stream; small looped MLPs check every way of writing a loop (scan, fori_loop,
jit, remat, custom_vjp, marked bodies, einsum kernels) against the untied
``vmap(grad)`` baseline.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import sdi_core  # noqa: E402
import sdi_jax  # noqa: E402
from sdi_core.factors import SDIError  # noqa: E402
from sdi_core.reference import looped_transformer as ref  # noqa: E402
from sdi_core.reference.brute_force import per_step_gradients, use_gradient  # noqa: E402
from sdi_jax import baseline, models  # noqa: E402

# Every use kind, three groups, a tied embedding/unembedding, input injection, early exit.
CFG = ref.LoopedConfig(vocab_size=11, d_model=8, n_heads=2, d_mlp=12, tau=3, max_len=6, n_prelude=1, n_coda=1,
                       tie_embeddings=True, input_injection=True)
EXTRA = {
    "prelude": lambda p: {"tok_emb": p["tok_emb"], "pos_emb": p["pos_emb"], "prelude": p["prelude"]},
    "coda": lambda p: {"coda": p["coda"], "ln_f": p["ln_f"]},
}


def _batch(seed=0, b=3, t=5):
    rng = np.random.default_rng(seed)
    batch = {"tokens": rng.integers(0, CFG.vocab_size, (b, t)), "targets": rng.integers(0, CFG.vocab_size, (b, t)),
             "n_steps": np.array([3, 1, 2][:b])}
    batch["targets"][0, :2] = ref.IGNORE_INDEX
    return batch


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    # relative to the larger of the reference scale and 1e-6: exact zeros (a key bias under softmax) are
    # computed as rounding noise ~1e-17 by every implementation
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scan"])
def captured(request, jax_x64):
    scan = request.param
    weights = ref.init_weights(CFG, seed=1)
    params = models.params_from_numpy(weights, CFG)
    batch = _batch()
    attr = sdi_jax.Attributor(lambda p, b: models.per_example_loss(p, b, CFG, scan=scan), loop=lambda p: p["block"],
                              groups=EXTRA, sketch=sdi_core.Exact(), progress=False)
    loss, uses = attr.factors(params, batch)
    ref_loss, ref_uses = ref.loss_and_factors(weights, CFG, batch)
    return {"scan": scan, "weights": weights, "params": params, "batch": batch, "attr": attr, "loss": loss,
            "uses": uses, "ref_loss": ref_loss, "ref_uses": ref_uses}


def test_loss_and_steps_found(captured):
    cap = captured["attr"].capture_plan(captured["params"], captured["batch"])
    assert cap.mode == ("scan" if captured["scan"] else "count"), f"step mode {cap.mode!r}\n{cap.describe()}"
    assert cap.steps == {"prelude": 1, "loop": CFG.tau, "coda": 1}, f"steps {cap.steps}"
    assert _rel(captured["loss"], captured["ref_loss"]) < 1e-12, "per-example losses differ from the reference"


def test_layout_is_the_reference_parameter_table(captured):
    """Names are dotted pytree paths, shapes canonical (kernels transposed), order = definition order."""
    got = captured["attr"].sketch_plan(captured["params"], captured["batch"]).layout
    want = sdi_core.SketchPlan(sdi_core.Exact(), ref.param_infos(CFG)).layout
    assert got.diff(want) is None, f"layout differs from the reference's parameter table: {got.diff(want)}"


def test_loop_factor_stream_equals_reference(captured):
    """Loop-body uses: same (param, step, kind) sequence and the same factors, to 1e-10."""
    mine = [u for u in captured["uses"] if u.param.startswith("block.")]
    theirs = [u for u in captured["ref_uses"] if u.param.startswith("block.")]
    assert [(u.param, u.step, u.kind) for u in mine] == [(u.param, u.step, u.kind) for u in theirs], \
        "loop-body use sequence differs from the reference (forward order, steps, kinds)"
    for a, b in zip(mine, theirs):
        assert _rel(a.grad_output, b.grad_output) < 1e-10, f"grad_output of {a.param} step {a.step}"
        if b.activation is not None:
            assert a.activation is not None and _rel(a.activation, b.activation) < 1e-10, \
                f"activation of {a.param} step {a.step}"


def test_every_factor_equals_reference(captured):
    """All groups: uses of the same kind match factor for factor; the rest by their per-example gradient."""
    mine, theirs = captured["uses"], captured["ref_uses"]
    by_key = {}
    for u in theirs:
        by_key.setdefault((u.param, u.step, u.kind), []).append(u)
    matched = 0
    for u in mine:
        cands = by_key.get((u.param, u.step, u.kind))
        if not cands:
            continue
        r = cands.pop(0)
        assert _rel(u.grad_output, r.grad_output) < 1e-10, f"grad_output of {u.param} ({u.kind}) step {u.step}"
        if r.activation is not None and u.kind != "embedding":
            assert _rel(u.activation, r.activation) < 1e-10, f"activation of {u.param} ({u.kind})"
        if u.kind == "embedding":
            np.testing.assert_array_equal(np.asarray(u.activation), np.asarray(r.activation),
                                          err_msg=f"embedding ids of {u.param}")
        matched += 1
    assert matched >= len(theirs) - 2, f"only {matched} of {len(theirs)} reference uses matched by kind"
    infos = ref.param_infos(CFG)
    steps = ref.group_steps(CFG)
    got = per_step_gradients(mine, infos, 3, steps)
    want = per_step_gradients(theirs, infos, 3, steps)
    for p in infos:
        assert _rel(got[p.name], want[p.name]) < 1e-10, f"per-step gradient of {p.name} ({p.group})"


def test_kinds_of_the_canonical_model(captured):
    kinds = {(u.param, u.kind) for u in captured["uses"]}
    assert ("tok_emb.weight", "embedding") in kinds and ("tok_emb.weight", "linear") in kinds, \
        "the tied embedding should have an embedding use and a linear (unembedding) use"
    assert ("block.mlp.fc1.weight", "linear") in kinds and ("block.ln1.weight", "scale") in kinds
    assert ("block.attn.q.bias", "bias") in kinds
    # pos_emb[:T] is a slice added to the embeddings: taken exactly (dense), never dropped
    assert ("pos_emb.weight", "dense") in kinds


# ----------------------------------------------------------------- small loops

D_IN, H, M, C, TAU = 3, 4, 5, 3, 3


def _mlp_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "emb": {"w": jnp.asarray(rng.normal(size=(D_IN, H)))},
        "block": {"w1": jnp.asarray(rng.normal(size=(H, M)) / 2), "b1": jnp.asarray(rng.normal(size=M) / 4),
                  "w2": jnp.asarray(rng.normal(size=(M, H)) / 2), "g": jnp.asarray(1 + rng.normal(size=H) / 4)},
        "head": {"w": jnp.asarray(rng.normal(size=(H, C)))},
    }


def _mlp_batch(seed=0, b=4):
    rng = np.random.default_rng(seed)
    return {"x": jnp.asarray(rng.normal(size=(b, D_IN))), "y": jnp.asarray(rng.integers(0, C, b))}


def _body(bp, h):
    a = h @ bp["w1"] + bp["b1"]
    z = jax.nn.gelu(a, approximate=False) + jax.nn.relu(a)  # relu is a custom_jvp function
    return h + jnp.tanh(z @ bp["w2"]) * bp["g"]


def _readout(params, h, y):
    logp = jax.nn.log_softmax(h @ params["head"]["w"], axis=-1)
    return -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]


@functools.lru_cache(maxsize=None)  # one function per body: its vmap(grad) compiles once
def _untied(body=_body):
    def loss(params, copies, batch):
        h = batch["x"] @ params["emb"]["w"]
        for bp in copies:
            h = body(bp, h)
        return _readout(params, h, batch["y"])

    return loss


@jax.custom_vjp
def _scaled(h, g):
    return h * g


_scaled.defvjp(lambda h, g: (h * g, (h, g)), lambda res, ct: (ct * res[1], jnp.sum(ct * res[0], axis=0)))


def _body_custom_vjp(bp, h):
    return h + _scaled(jnp.tanh(h @ bp["w1"] + bp["b1"]) @ bp["w2"], bp["g"])


def _loop_unrolled(params, batch):
    h = batch["x"] @ params["emb"]["w"]
    for _ in range(TAU):
        h = _body(params["block"], h)
    return _readout(params, h, batch["y"])


def _loop_scan(params, batch):
    h = batch["x"] @ params["emb"]["w"]
    h, _ = jax.lax.scan(lambda h, _: (_body(params["block"], h), None), h, None, length=TAU)
    return _readout(params, h, batch["y"])


def _loop_fori(params, batch):
    h = batch["x"] @ params["emb"]["w"]
    h = jax.lax.fori_loop(0, TAU, lambda i, h: _body(params["block"], h), h)
    return _readout(params, h, batch["y"])


def _loop_jit_body(params, batch):
    h = batch["x"] @ params["emb"]["w"]
    body = jax.jit(_body)
    for _ in range(TAU):
        h = body(params["block"], h)
    return _readout(params, h, batch["y"])


def _loop_remat_in_scan(params, batch):
    h = batch["x"] @ params["emb"]["w"]
    body = jax.checkpoint(_body)
    h, _ = jax.lax.scan(lambda h, _: (body(params["block"], h), None), h, None, length=TAU)
    return jax.jit(_readout)(params, h, batch["y"])


def _loop_custom_vjp(params, batch):
    h = batch["x"] @ params["emb"]["w"]
    for _ in range(TAU):
        h = _body_custom_vjp(params["block"], h)
    return _readout(params, h, batch["y"])


def _loop_reverse_scan(params, batch):
    h = batch["x"] @ params["emb"]["w"]
    h, _ = jax.lax.scan(lambda h, _: (_body(params["block"], h), None), h, None, length=TAU, reverse=True)
    return _readout(params, h, batch["y"])


@sdi_jax.loop_step  # w2 is used twice per step (the predicate and the layer): counting is ambiguous
def _body_cond(bp, h):
    # a weight used inside lax.cond branches: taken exactly (dense), per step (the predicate must not mix
    # examples: rows stay independent)
    a = jax.lax.cond(jnp.sum(bp["w2"]) > 0, lambda h: h @ bp["w1"], lambda h: -(h @ bp["w1"]), h) + bp["b1"]
    return h + jnp.tanh(jnp.tanh(a) @ bp["w2"]) * bp["g"]


def _loop_cond(params, batch):
    h = batch["x"] @ params["emb"]["w"]
    for _ in range(TAU):
        h = _body_cond(params["block"], h)
    return _readout(params, h, batch["y"])


LOOPS = {
    "unrolled": (_loop_unrolled, _body, "count"),
    "scan": (_loop_scan, _body, "scan"),
    "reverse_scan": (_loop_reverse_scan, _body, "scan"),
    "fori_loop": (_loop_fori, _body, "scan"),
    "jit_body": (_loop_jit_body, _body, "count"),
    "remat_in_scan": (_loop_remat_in_scan, _body, "scan"),
    "custom_vjp": (_loop_custom_vjp, _body_custom_vjp, "count"),
    "cond": (_loop_cond, _body_cond, "marker"),
}
GROUPS = {"prelude": lambda p: p["emb"], "coda": lambda p: p["head"]}


def _materialise(uses, infos, b, steps):
    """Per-step gradients from factors; rank-3 kernels through their (rows, prod(rest)) matrix view."""
    out = {p.name: np.zeros((b, steps[p.group]) + p.shape) for p in infos}
    info = {p.name: p for p in infos}
    for u in uses:
        p = info[u.param]
        if u.kind == "linear" and len(p.shape) > 2:
            g = np.einsum("bto,bti->boi", u.grad_output, u.activation).reshape((b,) + p.shape)
        else:
            g = use_gradient(u, p)
        out[u.param][:, u.step] += g
    return out


# leaves stored (d_in, d_out) and used as x @ W: canonical (d_out, d_in) is their transpose
KERNELS = ("emb.w", "block.w1", "block.w2", "head.w")


def _check_against_untied(loss_fn, untied, params, batch, *, tau=TAU, extra=GROUPS, transposed=KERNELS, **attr_kw):
    attr = sdi_jax.Attributor(loss_fn, loop=lambda p: p["block"], groups=extra, sketch=sdi_core.Exact(),
                              progress=False, **attr_kw)
    loss, uses = attr.factors(params, batch)
    cap = attr.capture_plan(params, batch)
    want_loss = np.asarray(loss_fn(params, batch))
    assert _rel(loss, want_loss) < 1e-12, "captured loss differs from loss_fn"
    got = _materialise(uses, cap.params, len(want_loss), cap.steps)
    want = baseline.untied_per_step_gradients(untied, params, batch, loop=lambda p: p["block"], tau=tau,
                                              extra=extra, transposed=transposed)
    for p in cap.params:
        assert got[p.name].shape == want[p.name].shape, f"{p.name}: {got[p.name].shape} vs {want[p.name].shape}"
        assert _rel(got[p.name], want[p.name]) < 1e-10, \
            f"per-step gradient of {p.name} differs from untied vmap(grad)\n{cap.describe()}"
    return attr, cap, uses


@pytest.mark.parametrize("name", list(LOOPS))
def test_loop_forms_equal_untied_vmap_grad(jax_x64, name):
    loss_fn, body, mode = LOOPS[name]
    params, batch = _mlp_params(), _mlp_batch()
    # a kernel with no linear use (only inside cond here) keeps its stored orientation
    kernels = tuple(k for k in KERNELS if not (name == "cond" and k == "block.w1"))
    _, cap, uses = _check_against_untied(loss_fn, _untied(body), params, batch, transposed=kernels)
    assert cap.mode == mode, f"{name}: steps found by {cap.mode!r}, expected {mode!r}"
    assert cap.steps["loop"] == TAU
    steps = [u.step for u in uses if u.param == "block.w1"]
    assert steps == list(range(TAU)), f"{name}: forward order of block.w1 uses by step: {steps}"
    kinds = {u.param: u.kind for u in uses}
    assert kinds["block.w1"] == ("dense" if name == "cond" else "linear"), f"{name}: block.w1 is {kinds['block.w1']}"
    assert kinds["block.b1"] == "bias"
    assert kinds["block.g"] == ("dense" if name == "custom_vjp" else "scale"), \
        f"{name}: block.g captured as {kinds['block.g']}"


@sdi_jax.loop_step
def _marked_body_twice(bp, h):
    # the same square weight used twice in one step: counting alone is ambiguous
    return h + jnp.tanh(jnp.tanh(h @ bp["w"]) @ bp["w"])


def test_marked_body_with_a_weight_used_twice(jax_x64):
    rng = np.random.default_rng(3)
    params = {"emb": {"w": jnp.asarray(rng.normal(size=(D_IN, H)))}, "block": {"w": jnp.asarray(rng.normal(size=(H, H)) / 2)},
              "head": {"w": jnp.asarray(rng.normal(size=(H, C)))}}
    batch = _mlp_batch(1)

    def loss_fn(p, b):
        h = b["x"] @ p["emb"]["w"]
        for _ in range(TAU):
            h = _marked_body_twice(p["block"], h)
        return _readout(p, h, b["y"])

    kernels = ("emb.w", "block.w", "head.w")
    _, cap, uses = _check_against_untied(loss_fn, _untied(_marked_body_twice.__wrapped__), params, batch,
                                         transposed=kernels)
    assert cap.mode == "marker" and cap.steps["loop"] == TAU, cap.describe()
    assert [u.step for u in uses if u.param == "block.w"] == [0, 0, 1, 1, 2, 2]

    def unmarked(p, b):
        h = b["x"] @ p["emb"]["w"]
        for _ in range(TAU):
            h = _marked_body_twice.__wrapped__(p["block"], h)
        return _readout(p, h, b["y"])

    # without the mark, steps= says how many uses make one step
    _check_against_untied(unmarked, _untied(_marked_body_twice.__wrapped__), params, batch, steps=TAU,
                          transposed=kernels)


def test_einsum_kernels_and_rank3_weights(jax_x64):
    """Kernels stored (d_out, d_in) and used as x @ W.T, and a rank-3 head kernel used through einsum."""
    rng = np.random.default_rng(4)
    params = {"block": {"w": jnp.asarray(rng.normal(size=(H, H)) / 2),  # (d_out, d_in): torch layout
                        "u": jnp.asarray(rng.normal(size=(H, 2, 2)) / 2)},  # (d_in, heads, d_head)
              "emb": {"w": jnp.asarray(rng.normal(size=(D_IN, H)))}, "head": {"w": jnp.asarray(rng.normal(size=(H, C)))}}

    def body(bp, h):
        h = h + jnp.tanh(h @ bp["w"].T)
        return h + jnp.einsum("bd,dnk->bnk", h, bp["u"]).reshape(h.shape)

    def loss_fn(p, b):
        h = b["x"] @ p["emb"]["w"]
        for _ in range(TAU):
            h = body(p["block"], h)
        return _readout(p, h, b["y"])

    _, cap, uses = _check_against_untied(loss_fn, _untied(body), params, _mlp_batch(2), transposed=("emb.w", "head.w"))
    shapes = {p.name: p.shape for p in cap.params}
    assert shapes["block.w"] == (H, H) and shapes["block.u"] == (H, 2, 2) and shapes["head.w"] == (C, H), shapes
    assert {u.kind for u in uses if u.param == "block.u"} == {"linear"}, "rank-3 kernel should factor as linear"


def test_fallback_error_names_leaf_and_primitive(jax_x64):
    params, batch = _mlp_params(), _mlp_batch()
    attr = sdi_jax.Attributor(_loop_custom_vjp, loop=lambda p: p["block"], sketch=sdi_core.Exact(),
                              fallback="error", progress=False)
    with pytest.raises(SDIError, match=r"block\.g.*custom_vjp_call"):
        attr.capture_plan(params, batch)


def test_while_loop_is_an_error_naming_the_leaf(jax_x64):
    def loss_fn(p, b):
        h = b["x"] @ p["emb"]["w"]
        h = jax.lax.while_loop(lambda c: c[0] < TAU, lambda c: (c[0] + 1, _body(p["block"], c[1])), (0, h))[1]
        return _readout(p, h, b["y"])

    attr = sdi_jax.Attributor(loss_fn, loop=lambda p: p["block"], sketch=sdi_core.Exact(), progress=False)
    with pytest.raises(SDIError, match=r"block\.(w1|b1|w2|g).*while"):
        attr.capture_plan(_mlp_params(), _mlp_batch())


def test_stacked_layers_scanned_over_are_taken_exactly(jax_x64):
    """A prelude of untied layers stacked along axis 0 and scanned over (xs): one exact per-example gradient."""
    rng = np.random.default_rng(5)
    params = _mlp_params()
    params["stack"] = {"w": jnp.asarray(rng.normal(size=(2, H, H)) / 2)}

    def run(p, b, copies=None):
        h = b["x"] @ p["emb"]["w"]
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, p["stack"]["w"])
        for s in range(TAU):
            h = _body(p["block"] if copies is None else copies[s], h)
        return _readout(p, h, b["y"])

    extra = {"prelude": lambda p: {"emb": p["emb"], "stack": p["stack"]}}
    _, cap, uses = _check_against_untied(run, lambda p, c, b: run(p, b, c), params, _mlp_batch(), extra=extra)
    assert {u.kind for u in uses if u.param == "stack.w"} == {"dense"}
