"""sdi_jax.Attributor: features against the untied vmap(grad) baseline, the NumPy sketch of the
reference factor stream and sdi_torch; tracing, checkpoints, dtypes and errors for bad input."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import sdi_core  # noqa: E402
import sdi_jax  # noqa: E402
from sdi_core import Checkpoint, SDIError  # noqa: E402
from sdi_core.reference import looped_transformer as ref  # noqa: E402
from sdi_jax import baseline, models  # noqa: E402

# small, but every use kind and group, a tied embedding, input injection and early exit
CFG = ref.LoopedConfig(vocab_size=11, d_model=8, n_heads=2, d_mlp=12, tau=3, max_len=6, n_prelude=1, n_coda=1,
                       tie_embeddings=True, input_injection=True)
EXTRA = {
    "prelude": lambda p: {"tok_emb": p["tok_emb"], "pos_emb": p["pos_emb"], "prelude": p["prelude"]},
    "coda": lambda p: {"coda": p["coda"], "ln_f": p["ln_f"]},
}
B, T = 3, 5
UNTIED = baseline.looped_untied_loss(CFG)  # one function object: its vmap(grad) compiles once per shape


def _batch(seed):
    rng = np.random.default_rng(seed)
    batch = {"tokens": rng.integers(0, CFG.vocab_size, (B, T)), "targets": rng.integers(0, CFG.vocab_size, (B, T)),
             "n_steps": np.array([3, 1, 2])}
    batch["targets"][seed % B, :2] = ref.IGNORE_INDEX
    return batch


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    # relative to the larger of the reference scale and 1e-6: exact zeros (a key bias under softmax) are
    # computed as rounding noise ~1e-17 by every implementation
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def _assert_features_close(got: sdi_core.Features, want: sdi_core.Features, tol: float, what: str) -> None:
    assert got.layout.diff(want.layout) is None, f"{what}: layouts differ: {got.layout.diff(want.layout)}"
    assert got.steps == want.steps, f"{what}: steps {got.steps} vs {want.steps}"
    for k, (a, b) in enumerate(zip(got.data, want.data)):
        for g in b:
            assert np.asarray(a[g]).shape == np.asarray(b[g]).shape, f"{what}: checkpoint {k} group {g} shape"
            err = _rel(a[g], b[g])
            assert err < tol, f"{what}: checkpoint {k} group {g!r}: relative error {err:.2e} > {tol}"


@pytest.fixture(scope="module")
def canonical(jax_x64):
    w0, w1 = ref.init_weights(CFG, seed=1), ref.init_weights(CFG, seed=2)
    ckpts = [Checkpoint(models.params_from_numpy(w0, CFG), eta=0.5, name="k0"),
             Checkpoint(models.params_from_numpy(w1, CFG), eta=0.25, name="k1")]
    return {"weights": [w0, w1], "ckpts": ckpts, "train": [_batch(0), _batch(1)], "query": [_batch(2)]}


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["unrolled", "scan"])
def test_exact_trajectories_equal_untied_vmap_grad(canonical, scan):
    attr = sdi_jax.Attributor(lambda p, b: models.per_example_loss(p, b, CFG, scan=scan), loop=lambda p: p["block"],
                              groups=EXTRA, sketch=sdi_core.Exact(), progress=False,
                              check_rows=False)  # rows: test_examples_that_interact_are_an_error
    train = attr.featurize(canonical["train"], canonical["ckpts"])
    query = attr.featurize(canonical["query"], canonical["ckpts"])
    kw = dict(tau=CFG.tau, groups=EXTRA, transposed=models.is_linear_weight, params=ref.param_infos(CFG),
              checkpoints=canonical["ckpts"])
    b_train = sdi_jax.untied_baseline(UNTIED, lambda p: p["block"], canonical["train"], **kw)
    b_query = sdi_jax.untied_baseline(UNTIED, lambda p: p["block"], canonical["query"], **kw)
    _assert_features_close(train, b_train, 1e-10, "train features vs untied vmap(grad)")
    _assert_features_close(query, b_query, 1e-10, "query features vs untied vmap(grad)")
    got = sdi_core.influence(train.to_numpy(), query.to_numpy())
    want = sdi_core.influence(b_train, b_query)
    for attr_name in ("trajectory", "tracin", "train_trajectory", "step_matrix"):
        err = _rel(getattr(got, attr_name), getattr(want, attr_name))
        assert err < 1e-10, f"{attr_name}: relative error {err:.2e} against the untied vmap(grad) baseline"
    # lossless: the trajectory sums to TracIn exactly
    assert _rel(np.asarray(got.trajectory).sum(-1), got.tracin) < 1e-12


def test_baseline_equals_numpy_reference(canonical):
    """The baseline itself, against the NumPy reference's per-step gradients (hand-written backward)."""
    w, batch = canonical["weights"][0], canonical["train"][0]
    got = baseline.untied_per_step_gradients(UNTIED, models.params_from_numpy(w, CFG),
                                             batch, loop=lambda p: p["block"], tau=CFG.tau, extra=EXTRA,
                                             transposed=models.is_linear_weight)
    want = ref.per_step_gradients(w, CFG, batch)
    assert set(got) == set(want)
    for n in want:
        assert _rel(got[n], want[n]) < 1e-10, f"baseline per-step gradient of {n}"


SKETCH = sdi_core.TensorSketch(dim=32, seed=3)


@pytest.fixture(scope="module")
def sketched(canonical):
    attr = sdi_jax.Attributor(lambda p, b: models.per_example_loss(p, b, CFG), loop=lambda p: p["block"],
                              groups=EXTRA, sketch=SKETCH, progress=False, check_rows=False)
    return attr, attr.featurize(canonical["train"], canonical["ckpts"])


def test_sketched_features_equal_numpy_sketch_of_reference_stream(canonical, sketched):
    """What every backend must match: the core's NumPy sketch of the reference factor stream."""
    _, feats = sketched
    plan = sdi_core.SketchPlan(SKETCH, ref.param_infos(CFG))
    data = []
    for w in canonical["weights"]:
        parts = [sdi_core.sketch_uses(plan, ref.loss_and_factors(w, CFG, b)[1], B, steps=ref.group_steps(CFG))
                 for b in canonical["train"]]
        data.append({g: np.concatenate([p[g] for p in parts]) for g in parts[0]})
    want = sdi_core.Features(data, plan.layout, feats.checkpoints, ref.group_steps(CFG))
    _assert_features_close(feats, want, 1e-10, "sdi_jax TensorSketch features vs NumPy sketch of reference factors")


def test_sketched_features_equal_torch(canonical, sketched):
    torch = pytest.importorskip("torch")
    sdi_torch = pytest.importorskip("sdi_torch")
    from sdi_torch.models import LoopedGPT, per_example_loss

    _, feats = sketched
    model = LoopedGPT.from_numpy(CFG, canonical["weights"][0], dtype=torch.float64)
    model.eval()
    tattr = sdi_torch.Attributor(model, model.block, per_example_loss, SKETCH, progress=False,
                                 groups={"prelude": [model.tok_emb, model.pos_emb, model.prelude],
                                         "coda": [model.coda, model.ln_f]})
    tbatches = [{k: torch.as_tensor(v) for k, v in b.items()} for b in canonical["train"]]
    tfeats = tattr.featurize(tbatches, [Checkpoint(model.state_dict(), eta=0.5, name="k0")]).to_numpy()
    one = sdi_core.Features(feats.data[:1], feats.layout, feats.checkpoints[:1], feats.steps)
    _assert_features_close(one, tfeats, 1e-10, "sdi_jax vs sdi_torch TensorSketch features (same weights, seed)")


@pytest.mark.slow
def test_route_choice_does_not_change_features(canonical, sketched):
    """FFT and exact-then-hash routes give the same features (the capture hands both the same factors)."""
    _, feats = sketched
    attr = sdi_jax.Attributor(lambda p, b: models.per_example_loss(p, b, CFG), loop=lambda p: p["block"],
                              groups=EXTRA, sketch=sdi_core.TensorSketch(dim=32, seed=3, route="fft"), progress=False,
                              check_rows=False)
    fft = attr.featurize(canonical["train"], canonical["ckpts"])
    _assert_features_close(fft, feats, 1e-10, "route='fft' vs route='auto'")


# ----------------------------------------------------------------------- a toy loop (fast to compile)


def _toy_params(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return {"emb": {"w": jnp.asarray(rng.normal(size=(3, 4)), dtype)},
            "block": {"w": jnp.asarray(rng.normal(size=(4, 4)) / 2, dtype), "b": jnp.asarray(rng.normal(size=4), dtype)},
            "head": {"w": jnp.asarray(rng.normal(size=(4, 2)), dtype)}}


def _toy_batch(seed=0, b=4):
    rng = np.random.default_rng(seed)
    return {"x": jnp.asarray(rng.normal(size=(b, 3))), "y": jnp.asarray(rng.integers(0, 2, b))}


CALLS = {"n": 0}


def _toy_loss(params, batch):
    CALLS["n"] += 1
    h = batch["x"].astype(params["emb"]["w"].dtype) @ params["emb"]["w"]
    h, _ = jax.lax.scan(lambda h, _: (h + jnp.tanh(h @ params["block"]["w"] + params["block"]["b"]), None), h, None,
                        length=2)
    logp = jax.nn.log_softmax(h @ params["head"]["w"], axis=-1)
    return -jnp.take_along_axis(logp, batch["y"][:, None], axis=-1)[:, 0]


def _toy_attr(**kw):
    kw.setdefault("sketch", sdi_core.Exact())
    kw.setdefault("progress", False)
    return sdi_jax.Attributor(_toy_loss, loop=lambda p: p["block"], **kw)


def test_traced_once_per_batch_shape(jax_x64):
    attr = _toy_attr(sketch=sdi_core.TensorSketch(dim=8, seed=0))
    ckpts = [Checkpoint(_toy_params(s), eta=1.0, name=f"c{s}") for s in range(3)]
    batches = [_toy_batch(s) for s in range(4)]
    CALLS["n"] = 0
    feats = attr.featurize(batches, ckpts)
    traced = CALLS["n"]
    # eval_shape, make_jaxpr and the row check's jitted forward: a constant, whatever the number of batches
    assert traced <= 3, f"loss_fn was traced {traced} times for 3 checkpoints x 4 batches of one shape"
    fn = attr._fn(ckpts[0].source, batches[0], "features")[2]
    assert fn._cache_size() == 1, f"the jitted featurisation compiled {fn._cache_size()} times for one shape"
    attr.featurize([_toy_batch(9, b=5)], ckpts)
    assert CALLS["n"] - traced <= 3, "a new batch shape should trace once more, no more"
    assert feats.n_examples == 16 and feats.steps == {"loop": 2}
    np.testing.assert_array_equal(feats.example_ids, np.arange(16))


def test_batch_split_and_jit_do_not_change_features(jax_x64):
    params = _toy_params(1)
    big, ck = _toy_batch(5, b=6), [Checkpoint(params, name="c")]
    halves = [{k: v[:3] for k, v in big.items()}, {k: v[3:] for k, v in big.items()}]
    whole = _toy_attr().featurize(big, ck)  # a single batch may be passed as a Mapping
    split = _toy_attr().featurize(halves, ck)
    _assert_features_close(split, whole, 1e-12, "two half batches vs one batch")


@pytest.mark.slow
def test_eager_equals_jit(jax_x64):
    batch, ck = _toy_batch(5), [Checkpoint(_toy_params(1), name="c")]
    eager = _toy_attr(jit=False).featurize(batch, ck)
    _assert_features_close(eager, _toy_attr().featurize(batch, ck), 1e-12, "jit=False vs jit=True")


def test_checkpoint_ids_etas_and_content_hash(jax_x64):
    p0, p1 = _toy_params(0), _toy_params(1)
    attr = _toy_attr()
    f = attr.featurize([_toy_batch()], [Checkpoint(p0, eta=0.1), Checkpoint(p1, eta=0.2, name="named", step=7), p0])
    ids = [c.id for c in f.checkpoints]
    assert ids[1] == "named" and ids[0] == ids[2] != ids[1], f"checkpoint ids {ids}"
    assert [c.eta for c in f.checkpoints] == [0.1, 0.2, 1.0] and f.checkpoints[1].step == 7
    assert ids[0] == sdi_core.checkpoint_id(sdi_jax.named_leaves(_toy_params(0))), "id is a content hash of the weights"


def test_float32_params_give_float32_features(jax_x64):
    batch, attr = _toy_batch(), _toy_attr()
    f64 = attr.featurize([batch], [Checkpoint(_toy_params(0), name="c")])
    f32 = attr.featurize([batch], [Checkpoint(_toy_params(0, np.float32), name="c")])
    assert f32.data[0]["loop"].dtype == jnp.float32 and f64.data[0]["loop"].dtype == jnp.float64
    assert _rel(f32.data[0]["loop"], f64.data[0]["loop"]) < 1e-4


def test_shared_batch_leaf_with_batch_axes(jax_x64):
    """batch_axes marks leaves shared by all examples (None), as jax.vmap's in_axes."""
    def loss(params, batch):
        return _toy_loss(params, {"x": batch["x"] * batch["scale"], "y": batch["y"]})

    batch = dict(_toy_batch(), scale=jnp.asarray(2.0))
    attr = sdi_jax.Attributor(loss, loop=lambda p: p["block"], sketch=sdi_core.Exact(), progress=False,
                              batch_axes={"x": 0, "y": 0, "scale": None})
    got = attr.featurize([batch], [Checkpoint(_toy_params(), name="c")])
    want = _toy_attr().featurize([{"x": batch["x"] * 2.0, "y": batch["y"]}], [Checkpoint(_toy_params(), name="c")])
    _assert_features_close(got, want, 1e-12, "shared leaf via batch_axes=None")


def test_progress_bar_can_be_silenced(jax_x64, capsys):
    ck = [Checkpoint(_toy_params(), name="c")]
    _toy_attr(progress=True).featurize([_toy_batch()], ck)
    assert "sdi_jax featurize" in capsys.readouterr().err, "progress=True shows a tqdm bar"
    _toy_attr(progress=True).featurize([_toy_batch()], ck, progress=False)
    assert capsys.readouterr().err == "", "progress=False is silent"


# ------------------------------------------------------------------------------------------ bad input


def test_loss_not_per_example_is_an_error(jax_x64):
    attr = sdi_jax.Attributor(lambda p, b: _toy_loss(p, b).mean(), loop=lambda p: p["block"],
                              sketch=sdi_core.Exact(), progress=False)
    with pytest.raises(SDIError, match=r"shape \(\).*\(B,\) = \(4,\).*per-example"):
        attr.featurize([_toy_batch()], [Checkpoint(_toy_params())])


def test_selector_errors(jax_x64):
    params, batch, ck = _toy_params(), _toy_batch(), [Checkpoint(_toy_params())]
    with pytest.raises(SDIError, match=r"selector.*sub-pytree"):
        sdi_jax.Attributor(_toy_loss, loop=lambda p: p["block"]["w"].T, sketch=sdi_core.Exact()).featurize(
            [batch], ck)
    with pytest.raises(SDIError, match=r"not leaves of params"):
        sdi_jax.Attributor(_toy_loss, loop=lambda p: [jnp.ones(3)], sketch=sdi_core.Exact()).featurize([batch], ck)
    unused = dict(params, block=dict(params["block"], unused=jnp.ones((4, 4))))
    with pytest.raises(SDIError, match=r"never used by loss_fn: \['block\.unused'\]"):
        _toy_attr().featurize([batch], [Checkpoint(unused)])
    with pytest.raises(SDIError, match=r"both the 'loop' and the 'coda'"):
        _toy_attr(groups={"coda": lambda p: p["block"]["b"]}).featurize([batch], ck)


def test_loop_leaves_used_different_numbers_of_times(jax_x64):
    def loss(params, batch):
        h = batch["x"] @ params["emb"]["w"]
        for _ in range(2):
            h = jnp.tanh(h @ params["block"]["w"] + params["block"]["b"])
        h = h + params["block"]["b"]  # the bias once more, outside the body
        logp = jax.nn.log_softmax(h @ params["head"]["w"], axis=-1)
        return -jnp.take_along_axis(logp, batch["y"][:, None], axis=-1)[:, 0]

    attr = sdi_jax.Attributor(loss, loop=lambda p: p["block"], sketch=sdi_core.Exact(), progress=False)
    with pytest.raises(SDIError, match=r"different numbers of times.*block\.b: 3.*loop_step"):
        attr.featurize([_toy_batch()], [Checkpoint(_toy_params())])
    with pytest.raises(SDIError, match=r"Found 2 loop steps .* steps=3"):
        _toy_attr(steps=3).featurize([_toy_batch()], [Checkpoint(_toy_params())])


def test_checkpoint_structure_must_match_the_first(jax_x64):
    p0 = _toy_params()
    other = dict(p0, head={"w": jnp.ones((4, 3))})
    with pytest.raises(SDIError, match=r"Checkpoint 1's params.*'head\.w' is \(4, 2\).*\(4, 3\)"):
        _toy_attr().featurize([_toy_batch()], [Checkpoint(p0), Checkpoint(other)])
    missing = {"emb": p0["emb"], "block": p0["block"]}
    with pytest.raises(SDIError, match=r"Checkpoint 1's params.*only in the first: \['head\.w'\]"):
        _toy_attr().featurize([_toy_batch()], [Checkpoint(p0), Checkpoint(missing)])
    with pytest.raises(SDIError, match=r"list of sdi_core.Checkpoint"):
        _toy_attr().featurize([_toy_batch()], p0)
    with pytest.raises(SDIError, match=r"params pytree itself"):
        _toy_attr().featurize([_toy_batch()], [Checkpoint("weights.msgpack")])


def test_mismatched_sketches_between_train_and_query(jax_x64):
    ck = [Checkpoint(_toy_params(), name="c")]
    a = _toy_attr(sketch=sdi_core.TensorSketch(dim=8, seed=0)).featurize([_toy_batch()], ck)
    b = _toy_attr(sketch=sdi_core.TensorSketch(dim=8, seed=1)).featurize([_toy_batch()], ck)
    with pytest.raises(SDIError, match=r"sketch differs.*seed.*same sketch"):
        sdi_core.influence(a, b)


def test_nonfinite_factors_name_the_parameter(jax_x64):
    params = _toy_params()
    params["head"]["w"] = params["head"]["w"].at[0, 0].set(jnp.nan)
    with pytest.raises(SDIError, match=r"Non-finite.*'block\.(w|b)'"):
        _toy_attr().featurize([_toy_batch()], [Checkpoint(params)])


def test_bad_arguments(jax_x64):
    with pytest.raises(SDIError, match=r"TensorSketch\(dim=\.\.\., seed=\.\.\.\) or sdi_core\.Exact\(\)"):
        sdi_jax.Attributor(_toy_loss, loop=lambda p: p["block"], sketch="tensorsketch")
    with pytest.raises(SDIError, match=r"fallback='x'"):
        sdi_jax.Attributor(_toy_loss, loop=lambda p: p["block"], sketch=sdi_core.Exact(), fallback="x")
    with pytest.raises(SDIError, match=r"Select something"):
        sdi_jax.Attributor(_toy_loss, sketch=sdi_core.Exact())
    with pytest.raises(SDIError, match=r"positive int"):
        sdi_jax.Attributor(_toy_loss, loop=lambda p: p["block"], sketch=sdi_core.Exact(), steps=0)


def test_import_does_not_touch_jax_config():
    code = (
        "import jax\n"
        "snap = lambda: {k: repr(v) for k, v in jax.config.values.items()}\n"
        "before = snap()\n"
        "import sdi_jax, sdi_jax.models, sdi_jax.baseline, sdi_jax.capture\n"
        "after = snap()\n"
        "diff = {k: (before[k], after[k]) for k in before if before[k] != after[k]}\n"
        "assert not diff, diff\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, f"import sdi_jax changed jax.config: {out.stderr[-2000:]}"


def _toy_loss_tau(tau):
    def loss(params, batch):
        h = batch["x"] @ params["emb"]["w"]
        for _ in range(tau):
            h = h + jnp.tanh(h @ params["block"]["w"] + params["block"]["b"])
        logp = jax.nn.log_softmax(h @ params["head"]["w"], axis=-1)
        return -jnp.take_along_axis(logp, batch["y"][:, None], axis=-1)[:, 0]

    return loss


def test_query_loop_count_may_differ_and_jax_features_score_directly(jax_x64):
    """Train at tau=2, query at tau=4; influence on the jax arrays themselves conserves TracIn."""
    ck = [Checkpoint(_toy_params(), eta=0.5, name="c")]
    kw = dict(loop=lambda p: p["block"], groups={"coda": lambda p: p["head"]},
              sketch=sdi_core.TensorSketch(dim=8, seed=0), progress=False)
    train = sdi_jax.Attributor(_toy_loss_tau(2), **kw).featurize([_toy_batch(0)], ck)
    query = sdi_jax.Attributor(_toy_loss_tau(4), **kw).featurize([_toy_batch(1, b=3)], ck)
    assert train.steps["loop"] == 2 and query.steps["loop"] == 4
    res = sdi_core.influence(train, query)
    traj = np.asarray(res.trajectory)
    assert traj.shape == (4, 3, 5), f"trajectory shape {traj.shape} (4 train, 3 query, 4 loop steps + coda)"
    direct = np.einsum("ikd,jkd->ij", np.asarray(train.sum_steps().data[0]["loop"]), np.asarray(query.sum_steps().data[0]["loop"]))
    direct += np.einsum("ikd,jkd->ij", np.asarray(train.data[0]["coda"]), np.asarray(query.data[0]["coda"]))
    assert _rel(np.asarray(res.tracin), 0.5 * direct) < 1e-12, "TracIn from jax features vs a direct contraction"
    assert _rel(traj.sum(-1), res.tracin) < 1e-12, "trajectory sums to TracIn"


def test_layout_order_option(jax_x64):
    ck = [Checkpoint(_toy_params(), name="c")]
    sel = lambda p: [p["block"]["b"], p["block"]["w"]]  # noqa: E731
    fwd = sdi_jax.Attributor(_toy_loss, loop=sel, sketch=sdi_core.Exact(), progress=False)
    mine = sdi_jax.Attributor(_toy_loss, loop=sel, sketch=sdi_core.Exact(), progress=False, order="selection")
    assert fwd.featurize([_toy_batch()], ck).layout.groups[0].params == ("block.w", "block.b"), "forward order"
    assert mine.featurize([_toy_batch()], ck).layout.groups[0].params == ("block.b", "block.w"), "selection order"


def test_examples_that_interact_are_an_error(jax_x64):
    """A loss whose rows depend on each other (a batch mean inside the model) cannot be attributed per example."""
    def coupled(params, batch):
        x = batch["x"] - batch["x"].mean(axis=0)  # centring over the batch couples the examples
        return _toy_loss(params, {"x": x, "y": batch["y"]})

    attr = sdi_jax.Attributor(coupled, loop=lambda p: p["block"], sketch=sdi_core.Exact(), progress=False)
    with pytest.raises(SDIError, match=r"examples of a batch interact"):
        attr.featurize([_toy_batch()], [Checkpoint(_toy_params())])
    quiet = sdi_jax.Attributor(coupled, loop=lambda p: p["block"], sketch=sdi_core.Exact(), progress=False,
                               check_rows=False)
    assert quiet.featurize([_toy_batch()], [Checkpoint(_toy_params())]).n_examples == 4


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_summed_features_equal_per_step_features_summed(jax_x64, scan):
    """featurize(summed=True) hashes each parameter's step-summed gradient once: equal to summing the per-step
    features (the sketch is linear); the routes chosen are recorded in meta."""
    from sdi_jax import models as jm

    cfg = jm.LoopedConfig(vocab_size=11, d_model=16, n_heads=2, tau=3, max_len=6)
    params = jm.init_params(cfg, seed=0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 11, (3, 6))
    batch = {"tokens": jnp.asarray(tokens), "targets": jnp.asarray(np.roll(tokens, 1, 1))}
    attr = sdi_jax.Attributor(lambda p, b: jm.per_example_loss(p, b, cfg, scan=scan), loop=lambda p: p["block"],
                              sketch=sdi_core.TensorSketch(dim=64, seed=0), progress=False)
    ck = [Checkpoint(params, name="c")]
    per_step = attr.featurize([batch], ck)
    summed = attr.featurize([batch], ck, summed=True)
    assert summed.summed and summed.steps == per_step.steps
    _assert_features_close(summed, per_step.sum_steps(), 1e-10, "summed=True vs per-step features summed")
    routes = summed.meta["routes"]
    assert "block.mlp.fc1.weight" in routes and routes["block.mlp.fc1.weight"]["route"] in ("fft", "exact_hash")
