"""The NumPy looped transformer: hand-written backward pass vs finite differences."""

from __future__ import annotations

import numpy as np
import pytest

from sdi_core.factors import FactorUse, SDIError
from sdi_core.reference import looped_transformer as lt

V, D, H, T, B, TAU = 7, 8, 2, 5, 4, 3
EPS = 1e-6
RTOL, ATOL = 1e-6, 1e-9

CONFIGS = {
    "plain": (dict(), {}),
    "prelude_coda_tied_injection": (
        dict(n_prelude=1, n_coda=1, tie_embeddings=True, input_injection=True),
        {},
    ),
    "early_exit": (dict(n_coda=1), {"n_steps": np.array([3, 1, 0, 2])}),
    "early_exit_injection": (dict(input_injection=True), {"n_steps": np.array([0, 2, 5, 1])}),
    "tau_query_5": (dict(n_prelude=1), {"tau": 5}),
    "tau_query_2": (dict(tie_embeddings=True), {"tau": 2}),
}


def make_case(name: str, seed: int = 0):
    cfg_kw, extra = CONFIGS[name]
    config = lt.LoopedConfig(vocab_size=V, d_model=D, n_heads=H, tau=TAU, max_len=T + 1, **cfg_kw)
    weights = lt.init_weights(config, seed)
    rng = np.random.default_rng(seed + 100)
    targets = rng.integers(0, V, (B, T))
    targets[0, :2] = lt.IGNORE_INDEX  # some ignored positions
    batch = {"tokens": rng.integers(0, V, (B, T)), "targets": targets}
    if "n_steps" in extra:
        batch["n_steps"] = extra["n_steps"]
    return config, weights, batch, extra.get("tau")


def perturbed(weights, name, idx, delta):
    out = dict(weights)
    out[name] = weights[name].copy()
    out[name][idx] += delta
    return out


def sample_indices(shape, rng, k=3):
    return [tuple(int(rng.integers(0, s)) for s in shape) for _ in range(k)]


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_full_gradients_match_finite_differences(case):
    config, weights, batch, tau = make_case(case)
    grads = lt.full_gradients(weights, config, batch, tau)
    assert list(grads) == list(lt.param_shapes(config)), "full_gradients must cover every parameter in order"
    rng = np.random.default_rng(1)
    for name, w in weights.items():
        assert grads[name].shape == (B, *w.shape), name
        for idx in sample_indices(w.shape, rng):
            plus = lt.per_example_loss(perturbed(weights, name, idx, EPS), config, batch, tau)
            minus = lt.per_example_loss(perturbed(weights, name, idx, -EPS), config, batch, tau)
            fd = (plus - minus) / (2 * EPS)
            np.testing.assert_allclose(
                grads[name][(slice(None), *idx)], fd, rtol=RTOL, atol=ATOL,
                err_msg=f"[{case}] d loss / d {name}{list(idx)}: backward vs central differences",
            )  # fmt: skip


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_per_step_gradients_sum_to_full(case):
    config, weights, batch, tau = make_case(case)
    per_step = lt.per_step_gradients(weights, config, batch, tau)
    full = lt.full_gradients(weights, config, batch, tau)
    steps = lt.group_steps(config, tau)
    groups = lt.param_groups(config)
    for name, g in per_step.items():
        assert g.shape == (B, steps[groups[name]], *weights[name].shape), name
        np.testing.assert_allclose(g.sum(1), full[name], rtol=0, atol=1e-14, err_msg=name)


def test_every_gradient_nonzero_except_key_bias():
    """Test weights exercise every parameter; attn.k.bias is exactly invariant (softmax shift)."""
    config, weights, batch, tau = make_case("prelude_coda_tied_injection")
    for name, g in lt.full_gradients(weights, config, batch, tau).items():
        if name.endswith("attn.k.bias"):
            assert np.abs(g).max() < 1e-14, f"{name}: q.(k + b) shifts all scores of a row equally"
        else:
            assert np.abs(g[1]).max() > 1e-6, f"{name} has a vanishing gradient at the test weights"


@pytest.mark.parametrize("case", ["early_exit", "early_exit_injection"])
def test_early_exit_steps_have_zero_gradient(case):
    config, weights, batch, tau = make_case(case)
    n_steps = batch["n_steps"]
    per_step = lt.per_step_gradients(weights, config, batch, tau, select=["block.attn.q.weight", "block.ln2.bias"])
    for name, g in per_step.items():
        for b in range(B):
            for s in range(TAU):
                norm = np.abs(g[b, s]).max()
                if s >= n_steps[b]:
                    assert norm == 0.0, f"{name}: example {b} exited after {n_steps[b]} steps, step {s} has {norm}"
                else:
                    assert norm > 0.0, f"{name}: example {b} ran step {s} yet has zero gradient"


def test_early_exit_equals_shorter_run():
    config, weights, batch, _ = make_case("early_exit")
    logits = lt.forward(weights, config, batch)
    for b, n in enumerate(batch["n_steps"]):
        single = {"tokens": batch["tokens"][b : b + 1]}
        np.testing.assert_allclose(logits[b], lt.forward(weights, config, single, tau=int(n))[0], atol=1e-13)


@pytest.mark.parametrize("case", ["plain", "prelude_coda_tied_injection", "early_exit", "tau_query_5"])
def test_per_step_gradients_match_finite_differences_of_untied_copy(case):
    config, weights, batch, tau = make_case(case)
    tau_eff = TAU if tau is None else tau
    per_step = lt.per_step_gradients(weights, config, batch, tau)
    rng = np.random.default_rng(2)
    loop_names = [n for n, g in lt.param_groups(config).items() if g == "loop"]
    for name in rng.choice(loop_names, 6, replace=False):
        for s in range(tau_eff):
            idx = sample_indices(weights[name].shape, rng, k=1)[0]
            w = weights[name]
            plus = {s: {name: perturbed({name: w}, name, idx, EPS)[name]}}
            minus = {s: {name: perturbed({name: w}, name, idx, -EPS)[name]}}
            fd = (
                lt.per_example_loss(weights, config, batch, tau, block_overrides=plus)
                - lt.per_example_loss(weights, config, batch, tau, block_overrides=minus)
            ) / (2 * EPS)
            np.testing.assert_allclose(
                per_step[name][(slice(None), s, *idx)], fd, rtol=RTOL, atol=ATOL,
                err_msg=f"[{case}] d loss / d {name}^({s}){list(idx)}",
            )  # fmt: skip


def test_overrides_equal_to_shared_weights_change_nothing():
    config, weights, batch, tau = make_case("plain")
    same = {s: {n: weights[n] for n in weights if n.startswith("block.")} for s in range(TAU)}
    np.testing.assert_array_equal(
        lt.forward(weights, config, batch), lt.forward(weights, config, batch, block_overrides=same)
    )
    with pytest.raises(SDIError, match="not a loop-body parameter"):
        lt.forward(weights, config, batch, block_overrides={0: {"ln_f.weight": weights["ln_f.weight"]}})
    with pytest.raises(SDIError, match="range"):
        lt.forward(weights, config, batch, block_overrides={TAU: {}})


def test_factor_stream_order_and_shapes():
    config, weights, batch, tau = make_case("prelude_coda_tied_injection")
    loss, uses = lt.loss_and_factors(weights, config, batch)
    np.testing.assert_array_equal(loss, lt.per_example_loss(weights, config, batch))
    assert all(isinstance(u, FactorUse) for u in uses)
    assert [u.use_index for u in uses] == list(range(len(uses)))
    groups, kinds = lt.param_groups(config), lt.param_kinds(config)
    # Forward order: embeddings, prelude, loop steps 0..tau-1, coda, ln_f, tied unembedding.
    assert [u.param for u in uses[:2]] == ["tok_emb.weight", "pos_emb.weight"]
    assert (uses[-1].param, uses[-1].kind) == ("tok_emb.weight", "linear")
    block_steps = [u.step for u in uses if u.param.startswith("block.")]
    assert block_steps == sorted(block_steps) and set(block_steps) == set(range(TAU))
    per_block = [n for n in lt.param_shapes(config) if n.startswith("block.")]
    assert [u.param for u in uses if u.param.startswith("block.") and u.step == 1] == per_block
    for u in uses:
        if groups[u.param] != "loop":
            assert u.step == 0, u
        assert u.kind == kinds[u.param] or (u.param == "tok_emb.weight" and u.kind == "linear"), u
        shape = weights[u.param].shape
        if u.kind == "linear":
            assert u.activation.shape == (B, T, shape[1]) and u.grad_output.shape == (B, T, shape[0]), u.param
        elif u.kind == "embedding":
            assert u.activation.shape == (B, T) and u.grad_output.shape == (B, T, D), u.param
        elif u.kind == "scale":
            assert u.activation.shape == u.grad_output.shape == (B, T, D), u.param
        else:
            assert u.activation is None and u.grad_output.shape[:2] == (B, T), u.param
    counts = {}
    for u in uses:
        counts[u.param] = counts.get(u.param, 0) + 1
    assert counts["tok_emb.weight"] == 2 and counts["block.mlp.fc1.weight"] == TAU and counts["coda.0.ln1.bias"] == 1


def test_select_filters_and_renumbers():
    config, weights, batch, tau = make_case("plain")
    _, uses = lt.loss_and_factors(weights, config, batch, select=["head.weight", "block.attn.o.weight"])
    assert [(u.param, u.step, u.use_index) for u in uses] == [
        ("block.attn.o.weight", 0, 0), ("block.attn.o.weight", 1, 1), ("block.attn.o.weight", 2, 2),
        ("head.weight", 0, 3),
    ]  # fmt: skip
    with pytest.raises(SDIError, match="unknown parameter"):
        lt.loss_and_factors(weights, config, batch, select=["block.nope"])


def test_example_without_targets_has_zero_loss_and_gradient():
    config, weights, batch, tau = make_case("plain")
    batch["targets"][2] = lt.IGNORE_INDEX
    loss = lt.per_example_loss(weights, config, batch)
    assert loss[2] == 0.0 and (loss[[0, 1, 3]] > 0).all()
    for name, g in lt.full_gradients(weights, config, batch).items():
        assert not g[2].any(), name


def test_param_tables():
    config, weights, _, _ = make_case("prelude_coda_tied_injection")
    infos = lt.param_infos(config)
    assert [p.name for p in infos] == list(weights) == list(lt.param_shapes(config))
    assert "head.weight" not in weights
    assert {p.group for p in infos if p.name.startswith("block.")} == {"loop"}
    assert {p.name: p.group for p in infos}["tok_emb.weight"] == "prelude"
    assert {p.name: p.group for p in infos}["coda.0.mlp.fc2.bias"] == "coda"
    assert [p.name for p in lt.param_infos(config, groups=["coda"])][-2:] == ["ln_f.weight", "ln_f.bias"]
    assert all(p.group == "loop" for p in lt.param_infos(config, groups="loop"))
    assert weights["block.mlp.fc1.weight"].shape == (4 * D, D)
    a, b = lt.init_weights(config, 3), lt.init_weights(config, 3)
    assert all(np.array_equal(a[n], b[n]) and a[n].dtype == np.float64 for n in a)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(d_model=9), "divisible"),
        (dict(tau=0), "tau"),
        (dict(n_prelude=-1), "n_prelude"),
        (dict(ln_eps=0.0), "ln_eps"),
    ],
)
def test_config_validation(kw, match):
    base = dict(vocab_size=V, d_model=D, n_heads=H, tau=TAU, max_len=T)
    with pytest.raises(SDIError, match=match):
        lt.LoopedConfig(**{**base, **kw})


def test_input_validation():
    config, weights, batch, _ = make_case("plain")
    with pytest.raises(SDIError, match="missing"):
        lt.forward({k: v for k, v in weights.items() if k != "ln_f.bias"}, config, batch)
    with pytest.raises(SDIError, match="max_len"):
        lt.forward(weights, config, {"tokens": np.zeros((1, T + 2), dtype=int)})
    with pytest.raises(SDIError, match="n_steps"):
        lt.forward(weights, config, {**batch, "n_steps": np.array([1, 2])})
    with pytest.raises(SDIError, match="targets"):
        lt.per_example_loss(weights, config, {"tokens": batch["tokens"]})
