"""sdi_torch.train: the loss goes down, checkpoints record what TracIn needs, schedules and batching are right."""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sdi_core import SDIError  # noqa: E402
from sdi_core.reference.looped_transformer import LoopedConfig  # noqa: E402
from sdi_core.app.tasks import get_task  # noqa: E402
from sdi_torch.models import LoopedGPT, per_example_loss  # noqa: E402
from sdi_torch.train import (  # noqa: E402
    TrainConfig,
    checkpoint_steps,
    evaluate,
    learning_rate,
    load_model,
    train,
)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These models are tiny: one intra-op thread is fastest, and stays fast when the cores are shared."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def parity():
    task = get_task("parity", min_len=2, max_len=6)
    train_set, test_set = task.splits(48, 16, seed=0)
    return task, train_set, test_set


def _tiny_model(task, seed=0, tau=2):
    torch.manual_seed(seed)
    return LoopedGPT(LoopedConfig(vocab_size=task.vocab_size, d_model=16, n_heads=2, tau=tau, max_len=task.seq_len,
                                  input_injection=True))


@pytest.mark.parametrize("optimizer,lr", [("adamw", 1e-2), ("sgd", 0.3)])
def test_training_lowers_the_loss(parity, optimizer, lr):
    task, train_set, _ = parity
    model = _tiny_model(task)
    before, _ = evaluate(model, train_set, task=task)
    cfg = TrainConfig(steps=25, batch_size=16, lr=lr, optimizer=optimizer, warmup=2, n_checkpoints=1)
    res = train(model, train_set, cfg, progress=False)
    after, _ = evaluate(model, train_set, task=task)
    assert after < before - 0.05, f"{optimizer}: training loss {before:.4f} -> {after:.4f} did not go down"
    assert res.losses.shape == (25,) and np.all(np.isfinite(res.losses))
    assert res.losses[-5:].mean() < res.losses[:5].mean()
    assert res.checkpoints == []  # no out_dir, no files
    assert not model.training


def test_checkpoints_record_state_step_lr_config(parity, tmp_path):
    task, train_set, test_set = parity
    model = _tiny_model(task)
    cfg = TrainConfig(steps=12, batch_size=8, lr=5e-3, warmup=3, n_checkpoints=3, eval_every=4)
    res = train(model, train_set, cfg, out_dir=tmp_path, eval_data=test_set, task=task, progress=False)
    assert [c.step for c in res.checkpoints] == [4, 8, 12]
    assert [e[0] for e in res.evals] == [4, 8, 12]
    for c in res.checkpoints:
        payload = torch.load(c.path, map_location="cpu", weights_only=True)
        assert {"state_dict", "step", "lr", "config"} <= set(payload)
        assert payload["step"] == c.step
        assert payload["lr"] == pytest.approx(learning_rate(c.step, cfg), rel=1e-12) and payload["lr"] > 0
        assert payload["lr"] == pytest.approx(res.lrs[c.step - 1], rel=1e-12)
        assert LoopedConfig(**payload["config"]) == model.config
    # The last checkpoint holds the final weights; load_model rebuilds the same model.
    loaded, info = load_model(res.checkpoints[-1].path)
    assert info["step"] == 12
    tokens = torch.as_tensor(test_set.tokens)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)
    sdi_ck = res.sdi_checkpoints()
    assert [c.eta for c in sdi_ck] == [c.lr for c in res.checkpoints]
    assert [c.step for c in sdi_ck] == [4, 8, 12]


def test_attributor_reads_eta_from_checkpoint_files(parity, tmp_path):
    sdi_torch = pytest.importorskip("sdi_torch")
    from sdi_core import Checkpoint, TensorSketch

    task, train_set, _ = parity
    model = _tiny_model(task)
    res = train(model, train_set, TrainConfig(steps=6, batch_size=8, warmup=2, n_checkpoints=2), out_dir=tmp_path,
                progress=False)
    attr = sdi_torch.Attributor(model, loop=model.block, loss_fn=per_example_loss,
                                sketch=TensorSketch(dim=32, seed=0), progress=False)
    batch = {"tokens": torch.as_tensor(train_set.tokens[:4]), "targets": torch.as_tensor(train_set.targets[:4])}
    feats = attr.featurize([batch], [Checkpoint(str(c.path)) for c in res.checkpoints])
    assert [c.eta for c in feats.checkpoints] == pytest.approx([c.lr for c in res.checkpoints], rel=1e-12)
    assert [c.step for c in feats.checkpoints] == [3, 6]


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=100, lr=1e-2, warmup=10, min_lr_ratio=0.1)
    lrs = np.array([learning_rate(s, cfg) for s in range(1, 101)])
    np.testing.assert_allclose(lrs[:10], 1e-2 * np.arange(1, 11) / 10, rtol=1e-12)
    assert np.all(np.diff(lrs[9:]) <= 1e-15), "cosine decay must not increase"
    assert lrs[-1] == pytest.approx(1e-3, rel=1e-12) and lrs.min() > 0
    mid = 10 + 45
    assert learning_rate(mid, cfg) == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    const = TrainConfig(steps=50, lr=3e-3, warmup=0, schedule="constant")
    assert {learning_rate(s, const) for s in range(1, 51)} == {3e-3}


def test_checkpoint_steps():
    assert checkpoint_steps(100, 4) == [25, 50, 75, 100]
    assert checkpoint_steps(10, 3) == [3, 7, 10]
    assert checkpoint_steps(5, 5) == [1, 2, 3, 4, 5]
    assert checkpoint_steps(7, 1) == [7]


def test_every_epoch_visits_each_example_once(parity):
    task, _, _ = parity
    n, bs, steps = 10, 4, 5  # 20 draws = exactly 2 epochs
    tokens = np.zeros((n, task.seq_len), dtype=np.int64)
    tokens[:, 0] = np.arange(n)  # the row's id in the first column
    targets = np.full_like(tokens, -100)
    targets[:, 0] = 1
    seen = []

    def loss_fn(model, batch):
        seen.extend(batch["tokens"][:, 0].tolist())
        return per_example_loss(model, batch)

    model = LoopedGPT(LoopedConfig(vocab_size=16, d_model=8, n_heads=2, tau=1, max_len=task.seq_len))
    train(model, {"tokens": tokens, "targets": targets}, TrainConfig(steps=steps, batch_size=bs, warmup=0,
                                                                      n_checkpoints=1), loss_fn=loss_fn, progress=False)
    assert sorted(seen[:n]) == list(range(n)) and sorted(seen[n:]) == list(range(n)), seen
    assert seen[:n] != list(range(n)), "batches are not shuffled"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(steps=0), "steps"),
        (dict(batch_size=-1), "batch_size"),
        (dict(lr=0.0), "learning rate"),
        (dict(lr=float("nan")), "learning rate"),
        (dict(optimizer="adam"), "optimizer"),
        (dict(schedule="linear"), "schedule"),
        (dict(min_lr_ratio=0.0), "positive learning rate"),
        (dict(steps=3, n_checkpoints=4), "n_checkpoints"),
        (dict(grad_clip=-1.0), "grad_clip"),
    ],
)
def test_bad_train_config(kwargs, match):
    with pytest.raises(SDIError, match=match):
        TrainConfig(**kwargs)


def test_bad_train_inputs(parity, tmp_path):
    task, train_set, _ = parity
    model = _tiny_model(task)
    with pytest.raises(SDIError, match="TaskData or a dict"):
        train(model, [1, 2, 3], progress=False)
    with pytest.raises(SDIError, match="empty"):
        train(model, {"tokens": np.zeros((0, 9), np.int64), "targets": np.zeros((0, 9), np.int64)}, progress=False)
    with pytest.raises(SDIError, match="TrainConfig"):
        train(model, train_set, config={"steps": 3}, progress=False)
    with pytest.raises(SDIError, match="does not exist"):
        load_model(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"weights": 1}, bad)
    with pytest.raises(SDIError, match="not an sdi_torch.train checkpoint"):
        load_model(bad)
    with pytest.raises(SDIError, match="loss became"):
        train(model, train_set, TrainConfig(steps=2, warmup=0, n_checkpoints=1),
              loss_fn=lambda m, b: per_example_loss(m, b) * float("nan"), progress=False)


def test_load_checkpoint_is_the_deprecated_name_of_load_model(tmp_path):
    from sdi_torch import train as train_mod

    model = LoopedGPT(LoopedConfig(vocab_size=5, d_model=8, n_heads=2, tau=2, max_len=4))
    path = train_mod.save_checkpoint(tmp_path / "c.pt", model, step=3, lr=0.5)
    with pytest.warns(DeprecationWarning, match="use sdi_torch.train.load_model"):
        loaded, info = train_mod.load_checkpoint(path)
    assert info["step"] == 3 and isinstance(loaded, LoopedGPT)
