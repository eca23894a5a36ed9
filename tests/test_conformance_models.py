"""The canonical models of the conformance suite: hand-written backward vs finite differences, and fitness
of each model for its checks (every parameter and every step carries a gradient a bug would change)."""

from __future__ import annotations

import numpy as np
import pytest

from sdi_conformance import CANONICAL_MODELS, get_model
from sdi_conformance.models import mlp_loss_and_factors, mlp_param_shapes
from sdi_core import SDIError
from sdi_core.reference import looped_transformer as lt

MLP_MODELS = ("looped_mlp", "weight_used_twice")
EPS = 1e-6


def _mlp_loss_untied(weights, arch, batch, per_step=None):
    """An independent NumPy forward of the looped MLP; ``per_step={s: {name: array}}`` unties step s."""
    x, y = batch["x"], batch["y"]
    h = x @ weights["embed.weight"].T + weights["embed.bias"]
    for s in range(arch["tau"]):
        w = dict(weights, **(per_step or {}).get(s, {}))
        if arch["body"] == "two_layer":
            h = h + np.tanh(h @ w["block.fc1.weight"].T + w["block.fc1.bias"]) @ w["block.fc2.weight"].T \
                + w["block.fc2.bias"]
        else:
            a = np.tanh(h @ w["block.fc.weight"].T + w["block.fc.bias"])
            h = h + np.tanh(a @ w["block.fc.weight"].T + w["block.fc.bias"])
    logits = h @ weights["head.weight"].T + weights["head.bias"]
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y]


def _bumped(w, idx, delta):
    out = w.copy()
    out[idx] += delta
    return out


@pytest.mark.parametrize("model", MLP_MODELS)
def test_mlp_per_step_gradients_match_finite_differences_of_the_untied_model(model):
    spec = get_model(model)
    batch = spec.batch(3, seed=4)
    loss, _ = spec.reference_factors(batch)
    np.testing.assert_allclose(loss, _mlp_loss_untied(spec.weights, spec.arch, batch), rtol=1e-13)
    per_step = spec.reference_per_step_gradients(batch)
    rng = np.random.default_rng(0)
    for p in spec.params:
        w = spec.weights[p.name]
        for _ in range(2):
            idx = tuple(int(rng.integers(0, s)) for s in w.shape)
            for s in range(spec.steps[p.group]):
                if p.group == "loop":
                    plus = _mlp_loss_untied(spec.weights, spec.arch, batch, {s: {p.name: _bumped(w, idx, EPS)}})
                    minus = _mlp_loss_untied(spec.weights, spec.arch, batch, {s: {p.name: _bumped(w, idx, -EPS)}})
                else:
                    plus = _mlp_loss_untied(dict(spec.weights, **{p.name: _bumped(w, idx, EPS)}), spec.arch, batch)
                    minus = _mlp_loss_untied(dict(spec.weights, **{p.name: _bumped(w, idx, -EPS)}), spec.arch, batch)
                fd = (plus - minus) / (2 * EPS)
                np.testing.assert_allclose(per_step[p.name][(slice(None), s) + idx], fd, rtol=1e-6, atol=1e-9,
                                           err_msg=f"{model}: d loss / d {p.name}{list(idx)} at step {s}")


def test_weight_used_twice_has_two_uses_per_step():
    spec = get_model("weight_used_twice")
    _, uses = spec.reference_factors(spec.batch(2))
    for s in range(spec.tau):
        kinds = [u.kind for u in uses if u.param == "block.fc.weight" and u.step == s]
        assert kinds == ["linear", "linear"], (s, kinds)
    assert [u.use_index for u in uses] == list(range(len(uses)))


@pytest.mark.parametrize("model", CANONICAL_MODELS)
def test_every_parameter_and_every_step_carries_gradient(model):
    """A dropped use or a mislabelled step must change the numbers the checks compare."""
    spec = get_model(model)
    batch = spec.batch(4, seed=0)
    per_step = spec.reference_per_step_gradients(batch)
    assert [p.name for p in spec.params] == list(spec.weights), "every parameter is selected, in definition order"
    for p in spec.params:
        g = per_step[p.name]
        assert g.shape == (4, spec.steps[p.group], *p.shape)
        if p.name.endswith("attn.k.bias"):
            # Softmax is invariant to q . b_k added to every key: this gradient is exactly 0.
            assert np.abs(g).max() < 1e-12
            continue
        for s in range(g.shape[1]):
            assert np.abs(g[:, s]).max() > 1e-3, f"{model}: {p.name} has no gradient at step {s}"
        if p.group == "loop" and spec.tau > 1:
            assert np.abs(g[:, 0] - g[:, 1]).max() > 1e-3, f"{model}: steps of {p.name} are indistinguishable"


@pytest.mark.parametrize("model", ["looped_transformer", "prelude_coda_tied", "early_exit"])
def test_transformer_models_are_the_reference_transformer(model):
    spec = get_model(model)
    batch = spec.batch(4, seed=2)
    want = lt.per_step_gradients(spec.weights, spec.config(), batch)
    got = spec.reference_per_step_gradients(batch)
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_early_exit_batches_leave_steps_unreached_in_each_half():
    spec = get_model("early_exit")
    n_steps = spec.batch(4)["n_steps"]
    assert n_steps.max() == spec.tau and n_steps.min() == 0, n_steps
    assert n_steps[:2].max() < spec.tau, "the first half must leave the last step unreached"


def test_models_are_deterministic_fresh_copies():
    a, b = get_model("looped_mlp"), get_model("looped_mlp")
    a.weights["head.bias"][0] += 1.0
    assert a.weights["head.bias"][0] != b.weights["head.bias"][0]
    for name, arr in a.batch(4, seed=3).items():
        np.testing.assert_array_equal(arr, b.batch(4, seed=3)[name])
    assert not np.array_equal(a.batch(4, seed=3)["x"], a.batch(4, seed=4)["x"])


def test_unused_parameter_variant_adds_a_group_never_used():
    spec = get_model("looped_mlp").with_unused_parameter()
    assert list(mlp_param_shapes(spec.arch))[-1] == "unused.weight"
    assert spec.params[-1].name == "unused.weight" and spec.params[-1].group == "unused"
    assert spec.steps["unused"] == 1
    _, uses = spec.reference_factors(spec.batch(2))
    assert "unused.weight" not in {u.param for u in uses}
    with pytest.raises(SDIError, match="looped_mlp"):
        get_model("looped_transformer").with_unused_parameter()


def test_unknown_model_and_bad_mlp_input_raise():
    with pytest.raises(SDIError, match="Unknown canonical model"):
        get_model("looped_cnn")
    spec = get_model("looped_mlp")
    with pytest.raises(SDIError, match="missing"):
        mlp_loss_and_factors({k: v for k, v in spec.weights.items() if k != "head.bias"}, spec.arch, spec.batch(2))
    with pytest.raises(SDIError, match=r"batch\['x'\]"):
        mlp_loss_and_factors(spec.weights, spec.arch, {"x": np.zeros((2, 3)), "y": np.zeros(2, dtype=np.int64)})
