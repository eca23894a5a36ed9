"""`sdi demo --budget small` end to end, and `sdi run` option checking."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sdi_core import SDIError
from sdi_core.app.cli import main
from sdi_core.app.cli_demo import BUDGETS, TASK_PRESETS, RunSettings, resolve_settings, training_targets
from sdi_core.app.tasks import get_task

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")


def _png_ok(path):
    from matplotlib.image import imread

    assert path.is_file() and path.stat().st_size > 10_000, f"{path} missing or trivially small"
    img = imread(path)[..., :3]
    ink = float(np.mean(img.min(axis=2) < 0.9))
    assert ink > 0.02, f"{path} is nearly blank ({ink:.3%} non-white pixels)"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One `sdi demo --budget small` run, shared by the checks below."""
    out = tmp_path_factory.mktemp("demo") / "sdi_report"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["demo", "--budget", "small", "--quiet", "--out", str(out)])
    return rc, out, buf.getvalue()


def test_demo_small_budget_writes_the_report(demo_run):
    rc, out, printed = demo_run
    assert rc == 0
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    pngs = sorted(out.glob("*.png"))
    names = {p.name for p in pngs}
    # training, step profile, sketch vs exact, extra steps (query tau > tau), one figure per shown query
    assert {"training.png", "step_profile.png", "sketch_vs_exact.png", "extra_steps.png", "query_0.png",
            "query_1.png"} <= names, names
    for p in pngs:
        _png_ok(p)
        assert f"({p.name})" in md, f"report.md does not show {p.name}"
        assert f'src="{p.name}"' in page, f"report.html does not show {p.name}"
    # Parity examples are printed as the task's own text ("0110 -> 0").
    assert " -> " in md
    summary = json.loads((out / "summary.json").read_text())
    cmp = summary["sketch_vs_exact"]
    assert np.isfinite(cmp["pearson_trajectory"]) and 0 <= cmp["topk_overlap_tracin"] <= 1
    ckpts = sorted((out / "checkpoints").glob("*.pt"))
    assert len(ckpts) == BUDGETS["small"]["n_checkpoints"]
    arrays = np.load(out / "influence.npz")
    small = BUDGETS["small"]
    assert arrays["trajectory"].shape == (small["n_train"], small["n_query"], small["tau"] + 2)  # prelude, loop, coda
    assert arrays["extrapolated_trajectory"].shape[2] == small["query_tau"] + 2
    # What the command prints: where the report is and a short summary.
    assert str(out / "report.html") in printed
    assert "test accuracy" in printed and "Pearson" in printed and "train #" in printed


def test_demo_sketch_matches_exact_on_the_subset(demo_run):
    """The sketched trajectories on the exact subset track the exact ones (fixed seed, small model)."""
    _, out, _ = demo_run
    arrays = np.load(out / "influence.npz")
    s, e = arrays["sketch_trajectory_subset"], arrays["exact_trajectory"]
    assert s.shape == e.shape
    r = np.corrcoef(s.ravel(), e.ravel())[0, 1]
    assert r > 0.9, f"sketch vs exact Pearson {r:.3f} at the small budget's sketch dim"
    # Conservation holds per sketch draw and for exact features alike: the slots sum to TracIn.
    np.testing.assert_allclose(arrays["tracin"], arrays["trajectory"].sum(2), rtol=1e-12)


def test_training_targets_running_parity():
    task = get_task("parity", min_len=2, max_len=6)
    data = task.sample(50, seed=3)
    tt = training_targets(task, data)
    for row, t, n in zip(data.tokens, tt, data.meta["length"]):
        bits = row[1 : n + 1] - task.zero_id
        np.testing.assert_array_equal(t[1 : n + 1] - task.zero_id, np.cumsum(bits) % 2)
        assert t[n + 1] == task.answer(row)[0]  # the task's own answer target is kept
        assert np.all(t[n + 2 :] == -100) and t[0] == -100
    other = get_task("addition")
    d2 = other.sample(5, seed=0)
    np.testing.assert_array_equal(training_targets(other, d2), d2.targets)


def test_presets_are_valid():
    for task in TASK_PRESETS:
        for budget in BUDGETS:
            resolve_settings(task, budget)
    s = resolve_settings("parity", tau=3)
    assert s.query_tau == 3 + TASK_PRESETS["parity"]["query_tau"] - TASK_PRESETS["parity"]["tau"]
    assert resolve_settings("parity", tau=3, query_tau=3).query_tau == 3


@pytest.mark.parametrize("command", ["demo", "run"])
def test_help_documents_every_option(command, capsys):
    from sdi_core.app.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for action in sub._actions:
        for opt in action.option_strings:
            assert opt in text, f"`sdi {command} --help` does not show {opt}"
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, f"{action.option_strings} has no help text"
    if command == "run":
        for opt in ("--task", "--d-model", "--heads", "--tau", "--query-tau", "--prelude", "--coda", "--sketch-dim",
                    "--seed", "--n-train", "--n-query", "--n-checkpoints", "--train-steps", "--out", "--quiet"):
            assert opt in text, f"`sdi run --help` does not document {opt}"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["run", "--tau", "0"], "must be >= 1"),
        (["run", "--d-model", "abc"], "expected an integer"),
        (["run", "--task", "chess"], "invalid choice"),
        (["run", "--lr", "-1"], "positive number"),
        (["run", "--sketch-dim", "1.5"], "expected an integer"),
        (["demo", "--budget", "huge"], "invalid choice"),
    ],
)
def test_run_bad_option_values_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["run", "--d-model", "30", "--heads", "4"], "does not divide"),
        (["run", "--n-train", "5000"], "exceeds the training set"),
        (["run", "--n-query", "600"], "exceeds the test set"),
        (["run", "--exact-train", "300"], "exact subset"),
        (["run", "--exact-train", "0"], "both be 0"),
        (["run", "--budget", "small", "--n-checkpoints", "100"], "exceeds --train-steps"),
    ],
)
def test_run_inconsistent_options_are_clear_errors(argv, message, capsys, tmp_path):
    rc = main(argv + ["--out", str(tmp_path / "never")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sdi {argv[0]}: error:") and message in err, err
    assert not (tmp_path / "never").exists(), "a bad option must fail before anything is written"


def test_settings_validation_direct():
    with pytest.raises(SDIError, match="unknown task"):
        resolve_settings("chess")
    with pytest.raises(SDIError, match="unknown setting"):
        resolve_settings("parity", colour="red")
    with pytest.raises(SDIError, match="positive integer"):
        RunSettings(tau=0).validate()
