"""Several processes and devices: torchrun (gloo, CPU) and jax.sharding write the same store as one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sdi_core.store import open_store
from test_store_helpers import assert_same_tree

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(cmd, env_extra=None, timeout=240):
    env = dict(os.environ)
    env.update(env_extra or {})
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\nSTDOUT\n{proc.stdout[-4000:]}\nSTDERR\n{proc.stderr[-6000:]}"
    return proc


_TORCHRUN_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # same arithmetic in every process, so stores can be compared bit for bit
    import sdi_core, sdi_torch
    import sdi_torch.distributed as sd
    from sdi_core.app.cli_store import demo_data, demo_model
    from sdi_core.store import featurize_to_store as single_process_featurize
    from sdi_torch import models

    out = sys.argv[1]
    assert sd.init_from_env() and dist.get_backend() == "gloo"
    rank, world = sd.rank_and_world()
    config, weights = demo_model()
    model = models.LoopedGPT.from_numpy(config, weights).eval()
    attr = sdi_torch.Attributor(model, loop=model.block, loss_fn=lambda m, b: models.per_example_loss(m, b),
                                sketch=sdi_core.TensorSketch(dim=128, seed=0, time_routes=False), progress=False)
    ckpts = [sdi_core.Checkpoint({k: torch.as_tensor(v) for k, v in weights.items()}, eta=0.5, name="demo")]
    data = demo_data("train", config)
    n = 32
    batches = [{k: torch.as_tensor(data[k][a:a + 4]) for k in ("tokens", "targets", "ids")} for a in range(0, n, 4)]
    fn = sd.attributor_featurizer(attr, ckpts, steps=config.tau)
    store = sd.featurize_to_store(os.path.join(out, "two"), fn, batches, shard_size=2, dtype="float64", summed=True)
    qdata = demo_data("query", config)
    qb = [{k: torch.as_tensor(qdata[k]) for k in ("tokens", "targets", "ids")}]
    query = fn(qb)
    scores = sd.score_store(store, query, k=4, dense=("tracin",))
    if rank == 0:
        single_process_featurize(os.path.join(out, "one"), fn, batches, shard_size=2, dtype="float64", summed=True)
        np.savez(os.path.join(out, "scores.npz"), idx=scores.slot_topk.indices, tot=scores.total_topk.indices,
                 tracin=scores.tracin)
        query_store = sdi_core.store.write_features(os.path.join(out, "query"), query, dtype="float64")
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump({"rank": rank, "world": world, "rows": store.n_examples, "scores_rows": list(scores.rows)}, fh)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def test_torchrun_two_processes_write_the_single_process_store(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sdi_torch.attributor")
    script = tmp_path / "run.py"
    script.write_text(_TORCHRUN_SCRIPT)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
          str(tmp_path)], env_extra={"OMP_NUM_THREADS": "1", "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")})
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in reports] == [2, 2] and all(r["rows"] == 32 for r in reports)
    assert all(r["scores_rows"] == [0, 32] for r in reports), "every rank gets the merged result"
    assert_same_tree(tmp_path / "one", tmp_path / "two")

    import sdi_core
    from sdi_core.scoring import score_store

    train = open_store(tmp_path / "one")
    query = open_store(tmp_path / "query")
    assert list(train.example_ids) == list(range(32))
    single = score_store(train, query, k=4, dense=("tracin",))
    with np.load(tmp_path / "scores.npz") as z:
        np.testing.assert_array_equal(z["idx"], single.slot_topk.indices)
        np.testing.assert_array_equal(z["tot"], single.total_topk.indices)
        np.testing.assert_allclose(z["tracin"], sdi_core.influence(train.as_features(), query.as_features()).tracin,
                                   rtol=1e-12, atol=1e-12)


_JAX_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import jax

    jax.config.update("jax_enable_x64", True)  # test configuration, in the test's own process
    import sdi_core, sdi_jax
    import sdi_jax.distributed as jd
    from sdi_core.app.cli_store import demo_data, demo_model
    from sdi_core.store import featurize_to_store
    from sdi_jax import models

    out = sys.argv[1]
    assert len(jax.devices()) == 2, jax.devices()
    config, weights = demo_model()
    params = models.params_from_numpy(weights, config)
    attr = sdi_jax.Attributor(lambda p, b: models.per_example_loss(p, b, config), loop=lambda p: p["block"],
                              sketch=sdi_core.TensorSketch(dim=128, seed=0, time_routes=False), progress=False)
    ckpts = [sdi_core.Checkpoint(params, eta=0.5, name="demo")]
    data = demo_data("train", config)
    batches = [{k: data[k][a:a + 6] for k in ("tokens", "targets", "ids")} for a in range(0, 24, 6)]
    one = jd.sharded_featurizer(attr, ckpts, devices=jax.devices()[:1])
    two = jd.sharded_featurizer(attr, ckpts)
    probe = two.features(batches[:1])
    shardings = {g: len(a.sharding.device_set) for g, a in probe.data[0].items()}
    featurize_to_store(os.path.join(out, "one"), one, batches, shard_size=2, dtype="float64")
    jd.featurize_to_store(os.path.join(out, "two"), attr, batches, ckpts, shard_size=2, dtype="float64")
    a = sdi_core.store.open_store(os.path.join(out, "one")).as_features()
    b = sdi_core.store.open_store(os.path.join(out, "two")).as_features()
    # An odd batch (5 examples) is padded to 6 for two devices; its features are those of the real rows.
    odd = two([{k: v[:5] for k, v in batches[0].items()}])
    odd_diff = float(np.abs(odd.data[0]["loop"] - np.asarray(a.data[0]["loop"])[:5]).max())
    diff = max(float(np.abs(np.asarray(a.data[0][g]) - np.asarray(b.data[0][g])).max()) for g in a.data[0])
    with open(os.path.join(out, "report.json"), "w") as fh:
        json.dump({"shardings": shardings, "max_diff": diff, "n": int(a.n_examples), "odd_diff": odd_diff,
                   "odd_ids": [int(i) for i in odd.example_ids], "ids": [int(i) for i in b.example_ids]}, fh)
    """
)


def test_jax_two_devices_equal_one_device(tmp_path):
    pytest.importorskip("jax")
    pytest.importorskip("sdi_jax.attributor")
    script = tmp_path / "run.py"
    script.write_text(_JAX_SCRIPT)
    _run([sys.executable, str(script), str(tmp_path)],
         env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"})
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["shardings"] == {"loop": 2}, f"features were not spread over both devices: {report['shardings']}"
    assert report["n"] == 24 and report["ids"] == list(range(24))
    assert report["max_diff"] <= 1e-12, f"2-device features differ from 1-device ones by {report['max_diff']}"
    assert report["odd_ids"] == list(range(5)) and report["odd_diff"] <= 1e-12, report
    one, two = open_store(tmp_path / "one"), open_store(tmp_path / "two")
    assert one.meta == two.meta


@pytest.mark.slow
def test_sdi_cli_under_torchrun_matches_one_process(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sdi_torch.attributor")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              "-m", "sdi_core.app.cli"]
    common = ["--demo", "query", "--batch-size", "4", "--shard-size", "1", "--summed", "--dtype", "float64",
              "--sketch-dim", "256"]
    env = {"OMP_NUM_THREADS": "1"}
    _run(launch + ["featurize", *common, "--out", str(tmp_path / "two")], env_extra=env)
    _run([sys.executable, "-m", "sdi_core.app.cli", "featurize", *common, "--out", str(tmp_path / "one")], env_extra=env)
    assert_same_tree(tmp_path / "one", tmp_path / "two")
    _run([sys.executable, "-m", "sdi_core.app.cli", "featurize", "--demo", "query", "--dtype", "float64",
          "--sketch-dim", "256", "--out", str(tmp_path / "q")], env_extra=env)
    _run(launch + ["score", str(tmp_path / "two"), str(tmp_path / "q"), "--k", "3", "--out", str(tmp_path / "two.npz"),
                   "--quiet"], env_extra=env)
    _run([sys.executable, "-m", "sdi_core.app.cli", "score", str(tmp_path / "one"), str(tmp_path / "q"), "--k", "3",
          "--out", str(tmp_path / "one.npz"), "--quiet"], env_extra=env)
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        # Blocks lie on a fixed grid whatever the rank split (sdi_core.scoring), so scores are bit-identical.
        for key in ("slot_topk_indices", "total_topk_indices", "slot_topk_scores", "total_topk_scores"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
