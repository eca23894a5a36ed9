"""sdi validate with the PyTorch retrainer: it really retrains, reads out per loop step, and runs end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from sdi_core import SDIError  # noqa: E402
from sdi_core.app.cli import main  # noqa: E402
from sdi_core.app.cli_validate import corrupt_answers, resolve_validation  # noqa: E402
from sdi_core.reference.looped_transformer import LoopedConfig  # noqa: E402
from sdi_core.app.tasks import get_task  # noqa: E402
from sdi_core.validate import RetrainJob, run_jobs  # noqa: E402
from sdi_core.app.validate_report import VALIDATION_FIGURES  # noqa: E402
from sdi_torch.train import TrainConfig  # noqa: E402
from sdi_torch.validate import LoopedGPTRetrainer  # noqa: E402


def _retrainer(n_train=32, steps=20):
    task = get_task("parity", min_len=2, max_len=6)
    train_set, test_set = task.splits(n_train, 8, seed=0)
    cfg = LoopedConfig(vocab_size=task.vocab_size, d_model=16, n_heads=2, tau=3, max_len=task.seq_len,
                       input_injection=True)
    return LoopedGPTRetrainer(cfg, TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup=2, n_checkpoints=1),
                              train_set.tokens, train_set.targets, test_set.tokens, test_set.targets)


def test_retrained_models_on_a_subset_differ_from_the_full_model_and_read_out_per_step():
    r = _retrainer()
    full = r.retrain(np.arange(r.n_train), seed=0)
    half = r.retrain(np.arange(0, r.n_train, 2), seed=0)
    again = r.retrain(np.arange(r.n_train), seed=0)
    w_full, w_half, w_init = r.weights(full), r.weights(half), r.initial_weights(0)
    assert any(not np.array_equal(w_full[n], w_half[n]) for n in w_full), "the subset model equals the full model"
    assert all(not np.array_equal(w_full[n], w_init[n]) for n in ("block.mlp.fc1.weight", "head.weight"))
    for n in w_full:  # same subset and seed: the same model (the cache relies on it)
        np.testing.assert_array_equal(w_full[n], r.weights(again)[n])
    losses = r.query_losses(full, r.readout_steps)
    assert losses.shape == (3, r.n_query) and np.all(np.isfinite(losses))
    assert not np.allclose(losses[0], losses[-1]), "readouts after step 1 and step tau should differ"
    different_seed = r.weights(r.retrain(np.arange(r.n_train), seed=1))
    assert any(not np.array_equal(w_full[n], different_seed[n]) for n in w_full)


def test_retrainer_pickles_into_worker_processes():
    r = _retrainer(steps=5)
    jobs = [RetrainJob(tuple(range(0, 32, s)), 0) for s in (1, 2)]
    serial = run_jobs(r, jobs, workers=1, progress=False)
    parallel = run_jobs(r, jobs, workers=2, progress=False)
    for j in jobs:
        np.testing.assert_allclose(parallel[j.key], serial[j.key], rtol=1e-6, atol=1e-7)


def test_corrupt_answers_flips_exactly_the_chosen_answers():
    task = get_task("parity")
    data, _ = task.splits(100, 10, seed=0)
    bad, flipped = corrupt_answers(task, data, 0.1, seed=3)
    assert flipped.sum() == 10
    changed = np.any(bad.targets != data.targets, axis=1)
    np.testing.assert_array_equal(changed, flipped)
    wrong = ~task.correct(data, np.where(bad.targets == -100, 0, bad.targets))
    np.testing.assert_array_equal(wrong, flipped)


def test_validate_quick_end_to_end_writes_its_figures(tmp_path, capsys):
    out = tmp_path / "val"
    assert main(["validate", "--quick", "--quiet", "--out", str(out), "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "LDS tracin" in text and "mislabel detection (self-influence of the answer loss): AUC" in text
    for name in VALIDATION_FIGURES.values():
        assert (out / name).stat().st_size > 5000, name
    summary = json.loads((out / "validation.json").read_text())
    lds = summary["validation"]["lds"]
    assert set(lds) == {"tracin", "sdi_step_sum", "last_checkpoint"}
    assert lds["tracin"]["lds"] == pytest.approx(lds["sdi_step_sum"]["lds"], abs=1e-9)
    assert "Step-resolved counterfactual" in (out / "validation.md").read_text()
    # A rerun resumes from the cache; a rerun with another schedule into the same cache is refused.
    assert main(["validate", "--quick", "--quiet", "--out", str(out), "--workers", "1"]) == 0
    assert main(["validate", "--quick", "--quiet", "--out", str(out), "--workers", "1", "--train-steps", "31"]) == 2
    assert "another configuration" in capsys.readouterr().err


def test_bad_validation_settings_are_refused():
    with pytest.raises(SDIError, match="exceeds the 48 training examples"):
        resolve_validation("parity", quick=True, n_subsets=49)
    with pytest.raises(SDIError, match="unknown task"):
        resolve_validation("chess")
