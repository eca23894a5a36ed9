"""``sdi featurize`` and ``sdi score``: results equal the Python API; help and errors are complete."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import sdi_core
from sdi_core import TensorSketch
from sdi_core.app.cli import build_parser, main
from sdi_core.app.cli_store import (
    demo_data,
    demo_model,
    numpy_reference_featurizer,
)
from sdi_core.features import CheckpointInfo
from sdi_core.reference.looped_transformer import LoopedConfig, init_weights
from sdi_core.scoring import score_store
from sdi_core.store import open_store


def _sdi(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def demo_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    assert _sdi("featurize", "--demo", "train", "--out", root / "train", "--summed", "--dtype", "float64",
                "--shard-size", "2", "--sketch-dim", "256") == 0
    assert _sdi("featurize", "--demo", "query", "--out", root / "query", "--dtype", "float64",
                "--sketch-dim", "256") == 0
    return root


def test_demo_featurize_matches_the_reference_featurizer(demo_stores):
    config, weights = demo_model()
    ck = [(weights, CheckpointInfo(sdi_core.checkpoint_id(weights), 1.0, None))]
    for split in ("train", "query"):
        data = demo_data(split, config)
        fn = numpy_reference_featurizer(config, ck, TensorSketch(dim=256, seed=0), data)
        want = fn([(0, len(data["tokens"]))])
        got = open_store(demo_stores / split)
        assert got.meta["split"] == split
        np.testing.assert_array_equal(got.example_ids, data["ids"])
        w = want.sum_steps() if split == "train" else want
        np.testing.assert_allclose(got.as_features().data[0]["loop"], w.data[0]["loop"], rtol=1e-12, atol=1e-12)


def test_score_writes_what_the_api_computes(demo_stores, tmp_path, capsys):
    out = tmp_path / "scores.npz"
    assert _sdi("score", demo_stores / "train", demo_stores / "query", "--k", "4", "--out", out,
                "--dense", "trajectory,tracin", "--max-queries", "2") == 0
    printed = capsys.readouterr().out
    assert "query 0:" in printed and "loop[2]" in printed and "14 more queries" in printed
    api = score_store(open_store(demo_stores / "train"), open_store(demo_stores / "query"), k=4,
                      dense=("trajectory", "tracin"))
    with np.load(out) as z:
        np.testing.assert_array_equal(z["slot_topk_ids"], api.slot_topk.ids)
        np.testing.assert_array_equal(z["total_topk_indices"], api.total_topk.indices)
        np.testing.assert_allclose(z["trajectory"], api.trajectory, rtol=1e-12)
        assert list(z["slot_labels"]) == ["loop[0]", "loop[1]", "loop[2]"]
    ref = sdi_core.influence(open_store(demo_stores / "train").as_features(),
                             open_store(demo_stores / "query").as_features())
    np.testing.assert_allclose(api.tracin, ref.tracin, rtol=1e-12, atol=1e-12)


def test_self_influence_command(demo_stores, tmp_path, capsys):
    out = tmp_path / "self.npz"
    assert _sdi("score", demo_stores / "train", "--self-influence", "--k", "3", "--out", out) == 0
    assert "highest self-influence" in capsys.readouterr().out
    train = open_store(demo_stores / "train").as_features()
    with np.load(out) as z:
        tot = train.data[0]["loop"][:, 0]
        np.testing.assert_allclose(z["tracin"], np.einsum("id,id->i", tot, tot), rtol=1e-12)
        assert "per_slot" not in z.files  # a summed store has no per-step self-influence


def test_featurize_from_files_with_two_checkpoints(tmp_path):
    config = LoopedConfig(vocab_size=9, d_model=8, n_heads=2, tau=2, max_len=6, n_prelude=1)
    (tmp_path / "model.json").write_text(json.dumps({"vocab_size": 9, "d_model": 8, "n_heads": 2, "tau": 2,
                                                     "max_len": 6, "n_prelude": 1}))
    ws = [init_weights(config, seed=s) for s in (1, 2)]
    for i, w in enumerate(ws):
        np.savez(tmp_path / f"ckpt{i}.npz", **w)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 9, size=(11, 6))
    targets = np.where(rng.random((11, 6)) < 0.5, tokens, -100)
    ids = np.arange(11) * 7 + 3
    np.savez(tmp_path / "data.npz", tokens=tokens, targets=targets, ids=ids)
    assert _sdi("featurize", "--model", tmp_path / "model.json", "--checkpoint", tmp_path / "ckpt0.npz",
                "--checkpoint", tmp_path / "ckpt1.npz", "--eta", "0.5", "--eta", "0.1", "--data", tmp_path / "data.npz",
                "--out", tmp_path / "s", "--groups", "prelude,loop,coda", "--batch-size", "4", "--shard-size", "1",
                "--dtype", "float64", "--sketch-dim", "64", "--seed", "3", "--tau", "3") == 0
    st = open_store(tmp_path / "s")
    assert [c.eta for c in st.checkpoints] == [0.5, 0.1] and st.steps == {"prelude": 1, "loop": 3, "coda": 1}
    assert st.checkpoints[0].id == sdi_core.checkpoint_id(ws[0]) != st.checkpoints[1].id
    ck = [(w, CheckpointInfo(sdi_core.checkpoint_id(w), e, None)) for w, e in zip(ws, (0.5, 0.1))]
    fn = numpy_reference_featurizer(config, ck, TensorSketch(dim=64, seed=3),
                                    {"tokens": tokens, "targets": targets, "ids": ids},
                                    groups=("prelude", "loop", "coda"), tau=3)
    want = fn([(0, 11)])
    got = st.as_features()
    for k in range(2):
        for g in ("prelude", "loop", "coda"):
            np.testing.assert_allclose(got.data[k][g], want.data[k][g], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(got.example_ids, ids)


def test_two_ranks_score_like_one(demo_stores, tmp_path):
    for r in (0, 1):
        assert _sdi("featurize", "--demo", "train", "--out", tmp_path / "two", "--summed", "--dtype", "float64",
                    "--shard-size", "2", "--sketch-dim", "256", "--rank", r, "--world-size", "2") == 0
    two = open_store(tmp_path / "two")
    assert len(two.segments) == 4
    q = open_store(demo_stores / "query")
    a = score_store(two, q, k=5)
    b = score_store(open_store(demo_stores / "train"), q, k=5)
    np.testing.assert_array_equal(a.slot_topk.indices, b.slot_topk.indices)
    np.testing.assert_array_equal(a.total_topk.scores, b.total_topk.scores)


def test_torch_backend_writes_the_numpy_backend_store(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sdi_torch.models")
    common = ["--demo", "query", "--dtype", "float64", "--sketch-dim", "256"]
    assert _sdi("featurize", *common, "--out", tmp_path / "np") == 0
    assert _sdi("featurize", *common, "--out", tmp_path / "torch", "--backend", "torch", "--torch-dtype", "float64") == 0
    a, b = open_store(tmp_path / "np"), open_store(tmp_path / "torch")
    assert {k: v for k, v in a.meta.items() if k != "run"} == {k: v for k, v in b.meta.items() if k != "run"}
    assert (a.meta["run"]["backend"], b.meta["run"]["backend"]) == ("numpy", "torch")
    np.testing.assert_allclose(b.as_features().data[0]["loop"], a.as_features().data[0]["loop"],
                               rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- help and errors


@pytest.mark.parametrize("command", ["featurize", "score"])
def test_help_documents_every_option(command, capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for action in sub._actions:
        for opt in action.option_strings:
            assert opt in text, f"sdi {command} --help does not show {opt}"
        if action.option_strings and opt != "-h" and opt != "--help":
            assert action.help and len(action.help) > 10, f"{opt} has no help text"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["featurize", "--out", "{tmp}/a"], "needs --model, --checkpoint, --data"),
        (["featurize", "--demo", "train", "--out", "{tmp}/a", "--groups", "body"], "--groups 'body'"),
        (["featurize", "--demo", "train", "--out", "{tmp}/a", "--sketch-dim", "-4"], "--sketch-dim -4"),
        (["featurize", "--demo", "train", "--out", "{tmp}/a", "--batch-size", "0"], "--batch-size must be"),
        (["featurize", "--demo", "train", "--out", "{tmp}/a", "--eta", "1", "--eta", "2"], "2 --eta values for 1"),
        (["featurize", "--demo", "train", "--out", "{tmp}/a", "--model", "m.json"], "--demo uses a built-in"),
        (["featurize", "--model", "{tmp}/none.json", "--checkpoint", "c.npz", "--data", "d.npz", "--out", "{tmp}/a"],
         "no such file"),
        (["score", "{store}/train", "{store}/query", "--dense", "everything", "--out", "{tmp}/o.npz"], "--dense"),
        (["score", "{store}/train", "{store}/query", "--dense", "tracin"], "give --out"),
        (["score", "{store}/train", "{store}/query", "--budget", "lots"], "memory size"),
        (["score", "{store}/train", "{store}/query", "--k", "-1"], "--k must be"),
        (["score", "{store}/train"], "needs a QUERY store"),
        (["score", "{tmp}/missing", "{store}/query"], "does not exist"),
        (["score", "{store}/query", "{store}/train"], "summed over steps"),
    ],
)
def test_bad_options_give_clear_errors(argv, message, demo_stores, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, store=demo_stores) for a in argv]
    assert _sdi(*argv) == 2
    err = capsys.readouterr().err
    assert f"sdi {argv[0]}: error:" in err and message in err, err


def test_argparse_rejects_unknown_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        _sdi("featurize", "--demo", "train", "--out", "x", "--backend", "tensorflow")
    assert exc.value.code == 2
    assert "invalid choice: 'tensorflow'" in capsys.readouterr().err


# --------------------------------------------------------------------------- a run is its configuration


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    """Model, two checkpoints and two data files of the same size for `sdi featurize --model ...`."""
    root = tmp_path_factory.mktemp("run_inputs")
    fields = {"vocab_size": 9, "d_model": 8, "n_heads": 2, "tau": 2, "max_len": 6, "n_prelude": 1}
    (root / "model.json").write_text(json.dumps(fields))
    config = LoopedConfig(**fields)
    for i in (0, 1):
        np.savez(root / f"ckpt{i}.npz", **init_weights(config, seed=i + 1))
        rng = np.random.default_rng(i)
        tokens = rng.integers(0, 9, size=(24, 6))
        np.savez(root / f"data{i}.npz", tokens=tokens, targets=np.where(rng.random((24, 6)) < 0.5, tokens, -100))
    return root


def _featurize_args(inputs, out, **changes):
    opts = {"--model": inputs / "model.json", "--checkpoint": inputs / "ckpt0.npz", "--data": inputs / "data0.npz",
            "--out": out, "--batch-size": "4", "--shard-size": "2", "--sketch-dim": "32", "--dtype": "float64",
            "--groups": "loop"}
    flags = []
    for k, v in changes.items():
        if v is True:
            flags.append(k)
        else:
            opts[k] = v
    return ["featurize", *[x for kv in opts.items() for x in kv], *flags]


CHANGES = [
    ({"--sketch-dim": "64"}, "run.sketch.dim: 32 vs 64"),
    ({"--seed": "1"}, "run.sketch.seed: 0 vs 1"),
    ({"--groups": "prelude,loop"}, "run.groups: ['loop'] vs ['prelude', 'loop']"),
    ({"--tau": "3"}, "run.tau: None vs 3"),
    ({"--eta": "0.5"}, "run.checkpoints"),
    ({"--checkpoint": "ckpt1.npz"}, "run.checkpoints"),
    ({"--data": "data1.npz"}, "run.data.fingerprint"),
    ({"--batch-size": "3"}, "run.batch_size: 4 vs 3"),
    ({"--shard-size": "3"}, "shard size (batches per shard) differs: 2 vs 3"),
    ({"--dtype": "float32"}, "dtype differs: 'float64' vs 'float32'"),
    ({"--summed": True}, "step-summed flag differs: False vs True"),
    ({"--split": "other"}, "split differs: None vs 'other'"),
    ({"--backend": "torch"}, "run.backend: 'numpy' vs 'torch'"),
]


def _resolve(inputs, changes):
    return {k: (inputs / v if k in ("--checkpoint", "--data") else v) for k, v in changes.items()}


@pytest.mark.parametrize("changes,named", CHANGES, ids=[next(iter(c)) for c, _ in CHANGES])
@pytest.mark.parametrize("when", ["rerun", "resume"])
def test_a_changed_setting_is_refused_on_rerun_and_on_resume(run_inputs, tmp_path, monkeypatch, capsys, changes,
                                                            named, when):
    if "--backend" in changes:
        pytest.importorskip("torch")
        pytest.importorskip("sdi_torch.models")
    out = tmp_path / "s"
    if when == "rerun":
        assert _sdi(*_featurize_args(run_inputs, out)) == 0
    else:
        from test_store_helpers import crash_before_shard

        crash_before_shard(monkeypatch, 1)
        with pytest.raises(RuntimeError, match="simulated crash"):
            _sdi(*_featurize_args(run_inputs, out))
        monkeypatch.undo()
    capsys.readouterr()
    assert _sdi(*_featurize_args(run_inputs, out, **_resolve(run_inputs, changes))) == 2
    err = capsys.readouterr().err
    assert "was written by a different run" in err and named in err and "--overwrite" in err, err
    if when == "resume":  # the original command still resumes, and --overwrite replaces the store
        assert _sdi(*_featurize_args(run_inputs, out)) == 0
    assert _sdi(*_featurize_args(run_inputs, out, **_resolve(run_inputs, changes), **{"--overwrite": True})) == 0
    assert _sdi(*_featurize_args(run_inputs, tmp_path / "fresh", **_resolve(run_inputs, changes))) == 0
    fresh, replaced = open_store(tmp_path / "fresh"), open_store(out)
    assert fresh.meta == replaced.meta
    np.testing.assert_array_equal(fresh.as_features().data[0]["loop"], replaced.as_features().data[0]["loop"])


def test_every_differing_setting_is_named_at_once(run_inputs, tmp_path, capsys):
    assert _sdi(*_featurize_args(run_inputs, tmp_path / "s")) == 0
    capsys.readouterr()
    assert _sdi(*_featurize_args(run_inputs, tmp_path / "s", **{"--seed": "2", "--batch-size": "5",
                                                                 "--data": run_inputs / "data1.npz"})) == 2
    err = capsys.readouterr().err
    for named in ("run.sketch.seed: 0 vs 2", "run.batch_size: 4 vs 5", "run.data.fingerprint"):
        assert named in err, err


def test_outputs_are_checked_before_any_work(demo_stores, tmp_path, capsys, monkeypatch):
    import errno

    from sdi_core import _io
    from sdi_core.app import cli_store

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the output location was checked")

    monkeypatch.setattr(cli_store, "numpy_reference_featurizer", no_work)
    monkeypatch.setattr("sdi_core.scoring.score_store", no_work)
    (tmp_path / "file").write_text("x")
    assert _sdi("featurize", "--demo", "train", "--out", tmp_path / "file") == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert _sdi("score", demo_stores / "train", demo_stores / "query", "--out", tmp_path / "file" / "x.npz") == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    real_open = os.open

    def read_only(path, flags, *args):
        if os.fspath(path).startswith(str(tmp_path / "ro")) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real_open(path, flags, *args)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(_io.os, "open", read_only)
    for argv in (["featurize", "--demo", "train", "--out", tmp_path / "ro"],
                 ["score", demo_stores / "train", demo_stores / "query", "--out", tmp_path / "ro" / "s.npz"]):
        assert _sdi(*argv) == 2
        err = capsys.readouterr().err
        assert "Read-only file system [EROFS]" in err and "choose a writable location" in err, err
    assert _sdi("featurize", "--demo", "train", "--out", tmp_path / "new", "--batch-size", "0") == 2
    assert not (tmp_path / "new").exists(), "a refused command creates nothing"


def test_sdi_run_checks_its_output_before_training(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    import sdi_torch.train

    def no_training(*args, **kwargs):
        raise AssertionError("training started before --out was checked")

    monkeypatch.setattr(sdi_torch.train, "train", no_training)
    (tmp_path / "file").write_text("x")
    assert _sdi("run", "--quick", "--quiet", "--out", tmp_path / "file") == 2
    assert "--out" in capsys.readouterr().err
