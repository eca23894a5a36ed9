"""Backends by registry (``sdi.backends``), the NumPy demo without a framework, and its training pieces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sdi_core import SDIError
from sdi_core.app import backends as reg
from sdi_core.app.numpy_backend import batch_gradients
from sdi_core.app.training import TrainConfig, adamw_init, adamw_update, clip_by_global_norm
from sdi_core.reference import looped_transformer as ref

FRAMEWORKS = ("torch", "jax", "jaxlib", "optax")

# A meta-path finder that makes the frameworks uninstallable: any import of them raises ImportError.
BLOCK = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in {blocked!r}:
                raise ImportError(f'{{name}} is blocked in this test (no framework installed)')
            return None
    sys.meta_path.insert(0, _Block())
""").format(blocked=FRAMEWORKS)

RUN_MAIN = BLOCK + textwrap.dedent("""
    from sdi_core.app.cli import main
    rc = main(sys.argv[1:])
    print('FRAMEWORKS', sorted(m for m in {blocked!r} if m in sys.modules))
    sys.exit(rc)
""").format(blocked=FRAMEWORKS)


def _env(extra_path: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")}
    if extra_path:
        env["PYTHONPATH"] = extra_path + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(code: str, args: list[str], cwd, extra_path: str | None = None, timeout: int = 300):
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd,
                          env=_env(extra_path), timeout=timeout)


# ----------------------------------------------------------------------------- registry


def test_the_three_builtin_backends_are_registered_and_load_no_framework():
    code = ("import sys\nfrom sdi_core.app.backends import backend_names, get_backend\n"
            "names = backend_names()\nfor n in names: get_backend(n)\n"
            f"print(names, sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert out.returncode == 0, out.stderr
    names, loaded = out.stdout.strip().rsplit("] ", 1)
    assert {"numpy", "torch", "jax"} <= set(eval(names + "]")), names
    assert loaded == "[]", f"loading the backends' entry points imported {loaded}"


def test_an_unknown_backend_names_the_installed_ones():
    with pytest.raises(SDIError, match=r"unknown backend 'tensorflow'; installed backends: numpy, .*torch"):
        reg.get_backend("tensorflow")


def test_sdi_demo_refuses_an_unknown_backend_listing_the_choices(capsys):
    from sdi_core.app.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--backend", "tensorflow", "--quick"])
    err = capsys.readouterr().err
    assert "invalid choice: 'tensorflow'" in err and "numpy" in err and "torch" in err, err


def test_a_backend_entry_point_must_hold_a_backend(monkeypatch):
    class EP:
        name, value = "odd", "odd_module:THING"

        def load(self):
            return object()

    monkeypatch.setattr(reg, "_entry_points", lambda: [EP()])
    with pytest.raises(SDIError, match="not an sdi_core.app.backends.Backend"):
        reg.get_backend("odd")
    assert "odd" in reg.describe_backends() and "does not load" in reg.describe_backends()


@pytest.fixture()
def fake_dist(tmp_path):
    """A third-party distribution on a temp path registering backend 'fake' (it wraps the numpy one)."""
    site = tmp_path / "site"
    (site / "fake_sdi_backend-0.1.dist-info").mkdir(parents=True)
    (site / "fake_sdi_backend-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fake-sdi-backend\nVersion: 0.1\n")
    (site / "fake_sdi_backend-0.1.dist-info" / "entry_points.txt").write_text(
        "[sdi.backends]\nfake = fake_sdi_backend:BACKEND\n")
    (site / "fake_sdi_backend.py").write_text(textwrap.dedent("""
        import dataclasses, pathlib
        from sdi_core.app.numpy_backend import BACKEND as _NUMPY

        def train(model, data, config, *, out_dir=None, **kw):
            pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
            pathlib.Path(out_dir, "trained-by-fake").write_text(str(config.steps))
            return _NUMPY.train(model, data, config, out_dir=out_dir, **kw)

        BACKEND = dataclasses.replace(_NUMPY, name="fake", description="a third-party backend of the test suite",
                                      train=train)
    """))
    return site


def test_a_third_party_backend_appears_in_help_and_runs_the_demo(fake_dist, tmp_path):
    helped = _run(BLOCK + "from sdi_core.app.cli import build_parser\nprint(build_parser().format_help())", [],
                  tmp_path, str(fake_dist))
    assert helped.returncode == 0, helped.stderr
    assert "fake" in helped.stdout and "a third-party backend of the test suite" in helped.stdout, helped.stdout
    out = tmp_path / "report"
    proc = _run(RUN_MAIN, ["demo", "--backend", "fake", "--quick", "--quiet", "--out", str(out)], tmp_path,
                str(fake_dist))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoints" / "trained-by-fake").read_text() == "30", "the demo did not train with 'fake'"
    assert "(fake)" in (out / "report.md").read_text()
    assert proc.stdout.strip().endswith("FRAMEWORKS []"), proc.stdout


# ----------------------------------------------------------------------------- sdi demo --backend numpy


def test_numpy_demo_runs_with_torch_and_jax_blocked(tmp_path):
    """`sdi demo --backend numpy --quick` with every framework import failing writes the full report."""
    out = tmp_path / "report"
    proc = _run(RUN_MAIN, ["demo", "--backend", "numpy", "--quick", "--quiet", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("FRAMEWORKS []"), proc.stdout
    names = {p.name for p in out.glob("*.png")}
    assert {"training.png", "step_profile.png", "sketch_vs_exact.png", "extra_steps.png", "query_0.png",
            "query_1.png"} <= names, names
    assert len(list((out / "checkpoints").glob("ckpt_*.npz"))) == 2
    arrays = np.load(out / "influence.npz")
    np.testing.assert_allclose(arrays["tracin"], arrays["trajectory"].sum(2), rtol=1e-10)
    r = np.corrcoef(arrays["sketch_trajectory_subset"].ravel(), arrays["exact_trajectory"].ravel())[0, 1]
    assert r > 0.9, f"numpy backend: sketch vs exact Pearson {r:.3f}"
    summary = json.loads((out / "summary.json").read_text())
    assert "numpy" in json.dumps(summary)


def test_help_runs_with_the_frameworks_blocked(tmp_path):
    code = BLOCK + "from sdi_core.app.cli import build_parser\nprint(build_parser().format_help())"
    proc = _run(code, [], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "installed backends" in proc.stdout and "numpy" in proc.stdout


# ----------------------------------------------------------------------------- training pieces


CFG = ref.LoopedConfig(vocab_size=7, d_model=8, n_heads=2, tau=3, max_len=6, n_prelude=1, n_coda=1,
                       input_injection=True)


def _batch(seed: int, b: int = 5):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, size=(b, CFG.max_len))
    targets = np.where(rng.random((b, CFG.max_len)) < 0.5, rng.integers(0, CFG.vocab_size, (b, CFG.max_len)), -100)
    targets[:, -1] = tokens[:, 0]
    return {"tokens": tokens, "targets": targets}


def test_batch_gradients_equal_the_mean_of_exact_per_example_gradients():
    w = ref.init_weights(CFG, seed=3)
    batch = _batch(0)
    _, uses = ref.loss_and_factors(w, CFG, batch)
    got = batch_gradients(uses, ref.param_shapes(CFG), 5)
    want = {n: g.mean(0) for n, g in ref.full_gradients(w, CFG, batch).items()}
    assert set(got) == set(want)
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-12, atol=1e-14, err_msg=n)


def test_batch_gradient_is_the_derivative_of_the_mean_loss():
    """Central finite differences of the mean loss along a random direction (float64)."""
    w = ref.init_weights(CFG, seed=4)
    batch = _batch(1)
    _, uses = ref.loss_and_factors(w, CFG, batch)
    g = batch_gradients(uses, ref.param_shapes(CFG), 5)
    rng = np.random.default_rng(0)
    d = {n: rng.standard_normal(a.shape) for n, a in w.items()}
    eps = 1e-5
    plus = ref.per_example_loss({n: w[n] + eps * d[n] for n in w}, CFG, batch).mean()
    minus = ref.per_example_loss({n: w[n] - eps * d[n] for n in w}, CFG, batch).mean()
    directional = sum(float(np.sum(g[n] * d[n])) for n in w)
    assert abs((plus - minus) / (2 * eps) - directional) < 1e-7 * max(1.0, abs(directional))


def test_numpy_adamw_matches_torch_adamw():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    opt = torch.optim.AdamW([{"params": [tp["w"]], "weight_decay": 0.01}, {"params": [tp["b"]], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.98), eps=1e-8)
    state = adamw_init(params)
    for step in range(5):
        grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
        lr = 1e-2 * (step + 1) / 5
        params, state = adamw_update(grads, state, params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
        for g in opt.param_groups:
            g["lr"] = lr
        for k in tp:
            tp[k].grad = torch.tensor(grads[k])
        opt.step()
    for k in params:
        np.testing.assert_allclose(params[k], tp[k].detach().numpy(), rtol=1e-12, atol=1e-14, err_msg=k)


def test_clip_by_global_norm():
    g = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    clipped = clip_by_global_norm(g, 1.0)
    norm = np.sqrt(sum(np.sum(v * v) for v in clipped.values()))
    assert abs(norm - 1.0) < 1e-6 and clipped["a"][0] / clipped["b"][0, 0] == pytest.approx(0.75)
    assert clip_by_global_norm(g, 10.0)["a"][0] == 3.0 and clip_by_global_norm(g, None)["a"][0] == 3.0


def test_numpy_training_lowers_the_loss(tmp_path):
    from sdi_core.app.numpy_backend import BACKEND, load_checkpoint

    model = BACKEND.build_model(CFG, 0)
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, CFG.vocab_size, size=(64, CFG.max_len))
    targets = np.full_like(tokens, -100)
    targets[:, 1:] = tokens[:, :-1]  # copy the previous token: learnable
    res = BACKEND.train(model, {"tokens": tokens, "targets": targets},
                        TrainConfig(steps=60, batch_size=16, lr=1e-2, warmup=5, n_checkpoints=2), out_dir=tmp_path)
    assert res.losses[-5:].mean() < 0.7 * res.losses[:5].mean(), res.losses[[0, -1]]
    assert [c.step for c in res.checkpoints] == [30, 60] and all(c.eta > 0 for c in res.checkpoints)
    config, weights = load_checkpoint(tmp_path / "ckpt_000060.npz")
    assert config == CFG
    for n, a in model.weights.items():
        np.testing.assert_array_equal(weights[n], a)


@pytest.mark.slow
def test_jax_demo_quick(tmp_path):
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    from sdi_core.app.cli import main

    out = tmp_path / "report"
    assert main(["demo", "--backend", "jax", "--quick", "--quiet", "--out", str(out)]) == 0
    arrays = np.load(out / "influence.npz")
    np.testing.assert_allclose(arrays["tracin"], arrays["trajectory"].sum(2), rtol=1e-5)
    r = np.corrcoef(arrays["sketch_trajectory_subset"].ravel(), arrays["exact_trajectory"].ravel())[0, 1]
    assert r > 0.9, f"jax backend: sketch vs exact Pearson {r:.3f}"
