"""The PyTorch looped transformer equals the NumPy reference (float64)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sdi_core.factors import SDIError  # noqa: E402
from sdi_core.reference import looped_transformer as lt  # noqa: E402
from sdi_torch.models import LoopedGPT, per_example_cross_entropy, per_example_loss  # noqa: E402

from model_cases import B, CONFIGS, D, H, T, TAU, TOL, V, make_case  # noqa: E402,F401


def to_torch(batch):
    return {k: torch.as_tensor(v, dtype=torch.int64) for k, v in batch.items()}


def test_parameter_names_and_shapes_are_the_contract():
    for case in CONFIGS:
        config, weights, _, _ = make_case(case)
        model = LoopedGPT(config)
        names = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
        assert names == list(lt.param_shapes(config).items()), f"[{case}] named_parameters() != reference table"


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_logits_and_losses_match_reference(case):
    config, weights, batch, tau = make_case(case)
    model = LoopedGPT.from_numpy(config, weights)
    tb = to_torch(batch)
    with torch.no_grad():
        logits = model(tb["tokens"], tb.get("n_steps"), tau).numpy()
        loss = per_example_loss(model, tb, tau).numpy()
    np.testing.assert_allclose(logits, lt.forward(weights, config, batch, tau), rtol=0, atol=TOL, err_msg=case)
    np.testing.assert_allclose(loss, lt.per_example_loss(weights, config, batch, tau), rtol=0, atol=TOL)
    assert loss[3] == 0.0


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_per_example_gradients_match_reference(case):
    config, weights, batch, tau = make_case(case)
    model = LoopedGPT.from_numpy(config, weights)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_one(p, ex):
        n_steps = ex["n_steps"].unsqueeze(0) if "n_steps" in ex else None
        logits = torch.func.functional_call(model, p, (ex["tokens"].unsqueeze(0), n_steps, tau))
        return per_example_cross_entropy(logits, ex["targets"].unsqueeze(0))[0]

    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0))(params, to_torch(batch))
    expected = lt.full_gradients(weights, config, batch, tau)
    assert list(grads) == list(expected)
    for name, g in grads.items():
        np.testing.assert_allclose(g.numpy(), expected[name], rtol=0, atol=TOL, err_msg=f"[{case}] {name}")


def test_round_trip_and_dtype():
    config, weights, batch, _ = make_case("prelude_coda_tied_injection")
    model = LoopedGPT.from_numpy(config, weights)
    back = model.to_numpy()
    assert list(back) == list(weights)
    assert all(np.array_equal(back[n], weights[n]) and back[n].dtype == np.float64 for n in weights)
    m32 = LoopedGPT.from_numpy(config, weights, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in m32.parameters())
    with torch.no_grad():
        out = m32(torch.as_tensor(batch["tokens"]))
    np.testing.assert_allclose(out.numpy(), lt.forward(weights, config, batch), rtol=0, atol=1e-4)


def test_default_init_and_errors():
    config, weights, batch, _ = make_case("plain")
    torch.manual_seed(0)
    model = LoopedGPT(config)
    assert model.block.ln1.weight.detach().eq(1).all() and model.block.attn.q.bias.detach().eq(0).all()
    with pytest.raises(SDIError, match="missing"):
        LoopedGPT.from_numpy(config, {n: w for n, w in weights.items() if n != "head.weight"})
    with pytest.raises(SDIError, match="max_len"):
        model(torch.zeros(1, T + 2, dtype=torch.int64))
