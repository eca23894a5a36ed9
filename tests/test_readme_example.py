"""The README's "your own model" example, run exactly as written, and the errors of --model/--config."""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sdi_core import SDIError  # noqa: E402
from sdi_core.app.cli import main  # noqa: E402
from sdi_core.store import FeatureStore  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block_after(marker: str) -> str:
    m = re.search(re.escape(marker) + r"\n```[a-z]*\n(.*?)```", README, flags=re.S)
    assert m, f"README has no code block after {marker!r}"
    return m.group(1)


def test_readme_shows_the_example_files_verbatim():
    for rel in ("docs/examples/my_looped_model.py", "docs/examples/query.toml"):
        assert _block_after(f"<!-- example-file: {rel} -->") == (ROOT / rel).read_text(), \
            f"README's copy of {rel} differs from the file"


def test_readme_commands_run_on_the_example(tmp_path):
    work = tmp_path / "project"
    shutil.copytree(ROOT / "docs" / "examples", work, ignore=shutil.ignore_patterns("__pycache__", "*.store"))
    commands = [ln for ln in _block_after("<!-- example-commands -->").splitlines() if ln.strip()]
    assert len(commands) == 3 and all(c.startswith("sdi ") for c in commands), commands
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")}
    for cmd in commands:
        argv = shlex.split(cmd)[1:]
        proc = subprocess.run([sys.executable, "-m", "sdi_core.app.cli", *argv], cwd=work, capture_output=True,
                              text=True, timeout=300, env=env)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
    train, query = FeatureStore(work / "train.store"), FeatureStore(work / "query.store")
    assert (train.n_examples, query.n_examples) == (64, 8)
    assert train.meta["summed"] and query.meta["steps"]["loop"] == 4
    assert list(query.example_ids) == list(range(8))
    scores = np.load(work / "scores.npz")
    assert scores.files, "sdi score --out wrote an empty archive"


@pytest.fixture()
def user_dir(tmp_path, monkeypatch):
    shutil.copy(ROOT / "docs" / "examples" / "my_looped_model.py", tmp_path)
    (tmp_path / "broken_model.py").write_text(
        "def not_a_model():\n    return 42\n\n"
        "def missing_loss():\n    return {'model': 1, 'loop': 1, 'batches': [1]}\n\n"
        "def typo_key():\n    return {'model': 1, 'loss_fn': len, 'loop': 1, 'batches': [1], 'grups': {}}\n\n"
        "VALUE = 3\n")
    (tmp_path / "raises_model.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("spec, message", [
    ("no_such_module:build", "cannot import module 'no_such_module'"),
    ("raises_model:build", "importing 'raises_model' raised RuntimeError: boom at import"),
    ("my_looped_model:nope", "has no attribute 'nope'"),
    ("broken_model:VALUE", "'VALUE' is a int, not a function"),
    ("broken_model:not_a_model", "the factory returned a int; return sdi_core.app.user_model.UserModel"),
    ("broken_model:missing_loss", "has no ['loss_fn']"),
    ("broken_model:typo_key", "unknown key(s) ['grups']"),
])
def test_factory_errors_name_the_attribute_and_the_fix(user_dir, capsys, spec, message):
    assert main(["featurize", "--model", spec, "--out", "s.store"]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (user_dir / "s.store").exists()


def test_config_errors_name_the_key(user_dir, capsys):
    (user_dir / "bad.toml").write_text('model = "my_looped_model:train_split"\nout = "s.store"\nsketch_size = 64\n')
    assert main(["featurize", "--config", "bad.toml"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'sketch_size'" in err and "sketch_dim" in err, err
    (user_dir / "table.toml").write_text('[seed]\nvalue = 1\n')
    assert main(["featurize", "--config", "table.toml"]) == 2
    assert "'seed' is a table" in capsys.readouterr().err
    assert main(["featurize", "--config", "missing.toml"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_command_line_wins_over_the_config(user_dir, capsys):
    (user_dir / "c.toml").write_text('model = "my_looped_model:query_split"\nout = "from_config.store"\n'
                                     'sketch_dim = 64\n')
    assert main(["featurize", "--config", "c.toml", "--out", "from_cli.store"]) == 0
    assert (user_dir / "from_cli.store").is_dir() and not (user_dir / "from_config.store").exists()
    assert FeatureStore(user_dir / "from_cli.store").meta["sketch"]["dim"] == 64


def test_user_model_features_equal_the_attributor_and_checkpoint_files(user_dir):
    """The command's features are the Attributor's on the same model and batches, at --checkpoint weights too."""
    import importlib
    import sys as _sys

    import sdi_core
    import sdi_torch

    _sys.path.insert(0, str(user_dir))
    try:
        mod = importlib.import_module("my_looped_model")
    finally:
        _sys.path.remove(str(user_dir))
    user = mod.query_split()
    with torch.no_grad():
        for p in user.model.parameters():
            p.mul_(1.5)
    torch.save(user.model.state_dict(), user_dir / "ck.pt")
    assert main(["featurize", "--model", "my_looped_model:query_split", "--out", "q.store", "--sketch-dim", "64",
                 "--dtype", "float64", "--checkpoint", "ck.pt", "--eta", "0.5"]) == 0
    got = FeatureStore(user_dir / "q.store").as_features()
    attr = sdi_torch.Attributor(user.model, loop=user.model.block, loss_fn=mod.per_example_loss,
                                sketch=sdi_core.TensorSketch(dim=64, seed=0, time_routes=False), groups=user.groups,
                                progress=False)
    batches = [{k: v for k, v in b.items() if k != "ids"} for b in user.batches]
    want = attr.featurize(batches).to_numpy()
    assert got.checkpoints[0].eta == 0.5 and got.checkpoints[0].id == want.checkpoints[0].id
    for g in want.data[0]:
        np.testing.assert_allclose(np.asarray(got.data[0][g]), np.asarray(want.data[0][g]), rtol=1e-5, atol=1e-6,
                                   err_msg=g)
    with pytest.raises(SDIError):
        FeatureStore(user_dir / "nothing.store")
