"""TensorSketch fidelity on a trained looped GPT (issue 3): m=4096 against exact features.

A small LoopedGPT (d_model=96, so every weight matrix of the loop body has more
than 4096 entries and is TensorSketched) is trained for 200 Adam steps on a
synthetic task (predict the previous token), then the query-step trajectory
of 32 train x 8 query examples is computed exactly and with TensorSketch
(m=4096) for 3 seeds.  The issue's bounds: relative Frobenius error at most
0.12 and Pearson correlation at least 0.99, averaged over the seeds.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sdi_core  # noqa: E402
import sdi_torch  # noqa: E402
from sdi_core.reference.looped_transformer import IGNORE_INDEX, LoopedConfig  # noqa: E402
from sdi_torch.models import LoopedGPT, per_example_loss  # noqa: E402

V, T, D = 16, 12, 96


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def previous_token_batch(n, generator):
    tokens = torch.randint(0, V, (n, T), generator=generator)
    targets = torch.full((n, T), IGNORE_INDEX)
    targets[:, 1:] = tokens[:, :-1]
    return {"tokens": tokens, "targets": targets}


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    config = LoopedConfig(vocab_size=V, d_model=D, n_heads=4, tau=3, max_len=T, d_mlp=2 * D)
    model = LoopedGPT(config)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(200):
        loss = per_example_loss(model, previous_token_batch(32, g)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss) if first is None else first
    return model.double().eval(), first, float(loss), g


def test_tensorsketch_m4096_tracks_exact_trajectory_on_trained_model(trained):
    model, first_loss, last_loss, g = trained
    assert last_loss < 0.5 * first_loss, f"the model did not train ({first_loss:.3f} -> {last_loss:.3f})"
    train = [previous_token_batch(32, g)]
    query = [previous_token_batch(8, g)]
    exact = sdi_torch.Attributor(model, model.block, per_example_loss, sdi_core.Exact(), progress=False)
    want = sdi_core.influence(exact.featurize(train), exact.featurize(query)).trajectory
    errs, corrs = [], []
    for seed in range(3):
        attr = sdi_torch.Attributor(model, model.block, per_example_loss, sdi_core.TensorSketch(4096, seed=seed),
                                    progress=False)
        modes = {attr.plan.spec(p.name).mode for p in attr.params if len(p.shape) == 2}
        assert modes == {"tensor"}, f"every weight matrix must be TensorSketched at m=4096, got modes {modes}"
        got = sdi_core.influence(attr.featurize(train), attr.featurize(query)).trajectory
        errs.append(float(torch.linalg.norm(got - want) / torch.linalg.norm(want)))
        corrs.append(float(np.corrcoef(got.flatten().numpy(), want.flatten().numpy())[0, 1]))
    assert np.mean(errs) <= 0.12, f"relative Frobenius error {errs} (mean {np.mean(errs):.4f}) exceeds 0.12"
    assert np.mean(corrs) >= 0.99, f"Pearson correlation {corrs} (mean {np.mean(corrs):.5f}) below 0.99"
    assert max(errs) > 0, "sketched and exact trajectories are identical: the sketch was not exercised"
