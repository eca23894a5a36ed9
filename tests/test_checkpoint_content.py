"""Checkpoints by content: an overwritten checkpoint file is a new checkpoint; a recorded lr must be a real eta."""
from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

import sdi_core  # noqa: E402
from sdi_core import Checkpoint, SDIError  # noqa: E402
from sdi_core.reference import looped_transformer as lt  # noqa: E402
import sdi_torch  # noqa: E402
from sdi_torch.models import LoopedGPT, per_example_loss  # noqa: E402
from sdi_torch.train import SavedCheckpoint  # noqa: E402


def _model(seed: int = 0) -> LoopedGPT:
    config = lt.LoopedConfig(vocab_size=7, d_model=8, n_heads=2, tau=2, max_len=5)
    return LoopedGPT.from_numpy(config, lt.init_weights(config, seed), dtype=torch.float64).eval()


def _batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randint(0, 7, (3, 5), generator=g), "targets": torch.randint(0, 7, (3, 5), generator=g)}


def _attributor(model):
    return sdi_torch.Attributor(model, model.block, per_example_loss, sdi_core.TensorSketch(dim=16, seed=0),
                                progress=False)


def test_an_overwritten_checkpoint_file_is_detected(tmp_path):
    model = _model()
    path = tmp_path / "step_100.pt"
    torch.save({"state_dict": _model(1).state_dict(), "lr": 1e-3, "step": 100}, path)
    saved = SavedCheckpoint(path, 100, 1e-3)
    ckpts = [saved.checkpoint()]  # the objects a pipeline keeps and reuses for both sides
    attr = _attributor(model)
    train = attr.featurize([_batch(1)], checkpoints=ckpts)
    torch.save({"state_dict": _model(2).state_dict(), "lr": 1e-3, "step": 100}, path)  # same path, other weights
    query = attr.featurize([_batch(2)], checkpoints=ckpts)
    assert train.checkpoints[0].id != query.checkpoints[0].id
    with pytest.raises(SDIError, match="checkpoints differ"):
        sdi_core.influence(train, query)
    torch.save({"state_dict": _model(1).state_dict(), "lr": 1e-3, "step": 100}, tmp_path / "copy.pt")
    same = attr.featurize([_batch(2)], checkpoints=[Checkpoint(str(tmp_path / "copy.pt"))])
    assert same.checkpoints == train.checkpoints, "the same weights under another file name are the same checkpoint"
    sdi_core.influence(train, same)


@pytest.mark.parametrize("lr", [0.0, -1e-3, math.nan, math.inf, "0.001", True])
def test_a_recorded_lr_that_is_not_a_finite_positive_number_is_refused(tmp_path, lr):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": _model(1).state_dict(), "lr": lr, "step": 5}, path)
    attr = _attributor(_model())
    with pytest.raises(SDIError, match=r"records lr=.*not a finite positive number.*eta=") as exc:
        attr.featurize([_batch(1)], checkpoints=[Checkpoint(str(path))])
    assert "1.0" not in str(exc.value)
    f = attr.featurize([_batch(1)], checkpoints=[Checkpoint(str(path), eta=0.25)])  # an explicit eta is used
    assert f.checkpoints[0].eta == 0.25
    torch.save({"state_dict": _model(1).state_dict(), "lr": torch.tensor(2e-3)}, path)
    assert attr.featurize([_batch(1)], checkpoints=[Checkpoint(str(path))]).checkpoints[0].eta == pytest.approx(2e-3)
    torch.save({"state_dict": _model(1).state_dict()}, path)  # no lr recorded: the documented default
    assert attr.featurize([_batch(1)], checkpoints=[Checkpoint(str(path))]).checkpoints[0].eta == 1.0
