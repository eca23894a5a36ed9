"""Everything that needs a GPU, in one command (under 8 minutes on one GPU).

Sections (``--sections``, default all, in this order):

- ``conformance``: the conformance suite with every check on the GPU, for
  sdi_torch (``cuda``) and sdi_jax (its ``gpu`` platform; the Python-unrolled
  models, ``--jax-forms unrolled,scan`` adds the ``lax.scan`` ones), float64,
  with the CPU declared as the second device so that ``check_devices_agree``
  compares GPU and CPU features.  Repeat calls are not required to be
  bit-identical on the GPU (atomic scatter-adds).
- ``cpu_vs_gpu``: a looped GPT (d_model 64, tau 4) featurised on the CPU and
  on the GPU from the same weights and seed, in float64 (must agree to 1e-10
  relative) and float32 (reported, 1e-4 expected), for torch and JAX.
- ``bench``: ``benchmarks/bench_torch_featurize.py`` (the issue-3
  configuration) on the GPU in float32 and in bfloat16, time and memory in
  separate processes; results in ``benchmarks/results/torch_featurize_cuda_<dtype>.json``.
- ``scoring``: a 1,000,000 x 4096 float32 store (summed train side, 16 GB
  on disk, written with synthetic features) scored against 256 queries x 8
  steps held on the GPU with the public :func:`sdi_core.scoring.score_store`
  (top-10 per query step and in total), against a bare GPU matmul of the
  same shapes.

Without a GPU the script stops with exit status 2 and says so; ``--device
cpu --quick`` runs the same code on the CPU at small sizes (the tests do).
Exit status 1 when a section failed.  The summary goes to
``benchmarks/results/gpu_check.json`` (``gpu_check_quick.json`` with ``--quick``).

    python benchmarks/gpu_check.py                       # on a machine with one NVIDIA GPU
    python benchmarks/gpu_check.py --sections cpu_vs_gpu,scoring --score-rows 200000
    python benchmarks/gpu_check.py --device cpu --quick  # smoke test of this script on the CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import common  # noqa: E402

SECTIONS = ("conformance", "cpu_vs_gpu", "bench", "scoring")
BUDGET_S = 480
EXIT_NO_GPU = 2


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cuda (default); cpu runs the same code on the CPU, for a smoke test")
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds; with --device cpu for the tests)")
    ap.add_argument("--jax-forms", default="unrolled", help="JAX conformance models: unrolled, scan, or none")
    ap.add_argument("--score-rows", type=int, default=None, help="train rows of the scoring store (default 1000000)")
    ap.add_argument("--score-dim", type=int, default=None, help="features per row of the scoring store (default 4096)")
    ap.add_argument("--store-dir", default=None, help="where the scoring store is written (default a temporary folder)")
    ap.add_argument("--load-limit", type=float, default=None,
                    help="load limit passed to the benchmark (default 0.25 per usable CPU: the GPU run is not CPU bound)")
    ap.add_argument("--out", default=None, help="summary JSON path")
    ap.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    args = ap.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad or not args.sections:
        ap.error(f"unknown section(s) {bad}; choose from {', '.join(SECTIONS)}")
    args.jax_forms = [f.strip() for f in args.jax_forms.split(",") if f.strip() and f.strip() != "none"]
    bad = [f for f in args.jax_forms if f not in ("unrolled", "scan")]
    if bad:
        ap.error(f"--jax-forms: unknown {bad}; choose from unrolled, scan, none")
    args.score_rows = args.score_rows or (20_000 if args.quick else 1_000_000)
    args.score_dim = args.score_dim or (256 if args.quick else 4096)
    if args.score_rows < 1 or args.score_dim < 2:
        ap.error("--score-rows must be >= 1 and --score-dim >= 2")
    if args.load_limit is None:
        args.load_limit = max(common.LOAD_LIMIT, 0.25 * (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                                          else (os.cpu_count() or 2)))
    return args


# ------------------------------------------------------------------------------ devices


def available(device: str) -> dict:
    """Which frameworks can run on ``device``: ``{"torch": bool, "jax": bool, "notes": [...]}``."""
    out = {"torch": False, "jax": False, "notes": []}
    try:
        import torch

        out["torch"] = device == "cpu" or torch.cuda.is_available()
        if not out["torch"]:
            out["notes"].append(f"torch {torch.__version__}: torch.cuda.is_available() is False")
        elif device == "cuda":
            out["torch_device"] = torch.cuda.get_device_name(0)
    except ImportError:
        out["notes"].append("torch is not installed")
    try:
        import jax

        platforms = {d.platform for d in jax.devices()}
        out["jax"] = device == "cpu" or "gpu" in platforms
        if not out["jax"]:
            out["notes"].append(f"jax {jax.__version__}: no GPU device (platforms {sorted(platforms)}); install a "
                                "CUDA build, e.g. pip install 'jax[cuda12]'")
    except ImportError:
        out["notes"].append("jax is not installed")
    return out


def jax_device(device: str):
    import jax

    return jax.devices("gpu" if device == "cuda" else "cpu")[0]


# ----------------------------------------------------------------------------- sections


def section_conformance(args, have) -> dict:
    from sdi_conformance import run_checks

    out = {}
    if have["torch"]:
        from sdi_torch.conformance import TorchBackend

        tb = TorchBackend()
        devices = ("cuda", "cpu") if args.device == "cuda" else ("cpu",)
        tb.capabilities = dataclasses.replace(tb.capabilities, devices=devices,
                                              deterministic=args.device == "cpu" and tb.capabilities.deterministic)
        out["torch"] = _summarise(run_checks(tb))
    if have["jax"] and args.jax_forms:
        import jax

        jax.config.update("jax_enable_x64", True)  # this script is the application: it may configure jax
        from sdi_jax.conformance import JaxBackend

        for form in args.jax_forms:
            jb = JaxBackend(scan=form == "scan")
            devices = ("gpu", "cpu") if args.device == "cuda" else ("cpu",)
            jb.capabilities = dataclasses.replace(jb.capabilities, devices=devices,
                                                  deterministic=args.device == "cpu" and jb.capabilities.deterministic)
            out[f"jax ({form})"] = _summarise(run_checks(jb))
    failed = sum(v["failed"] for v in out.values())
    return {"status": "failed" if failed else "ok", "backends": out}


def _summarise(results) -> dict:
    bad = [r for r in results if not r.passed]
    return {"checks": len(results), "failed": len(bad), "seconds": round(sum(r.seconds for r in results), 2),
            "failures": {r.name: r.message[:2000] for r in bad}}


def _rel(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def section_cpu_vs_gpu(args, have) -> dict:
    import numpy as np

    import sdi_core
    from sdi_core.reference.looped_transformer import LoopedConfig, init_weights

    d, tau, n = (16, 2, 4) if args.quick else (64, 4, 16)
    cfg = LoopedConfig(vocab_size=32, d_model=d, n_heads=4, tau=tau, max_len=24)
    weights = init_weights(cfg, 0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 32, (n, 24))
    targets = np.roll(tokens, -1, axis=1)
    sketch = sdi_core.TensorSketch(dim=256 if args.quick else 1024, seed=0)
    out: dict = {}
    if have["torch"]:
        import torch

        import sdi_torch
        from sdi_torch.models import LoopedGPT, per_example_loss

        def torch_feats(device, dtype):
            model = LoopedGPT.from_numpy(cfg, weights, dtype=dtype).to(device).eval()
            batch = {"tokens": torch.as_tensor(tokens, device=device), "targets": torch.as_tensor(targets, device=device)}
            attr = sdi_torch.Attributor(model, model.block, per_example_loss, sketch, progress=False)
            f = attr.featurize([batch])
            return f.to_numpy().data[0]["loop"], f.checkpoints[0].id

        for name, dt, tol in (("float64", torch.float64, 1e-10), ("float32", torch.float32, 1e-4)):
            cpu, id_cpu = torch_feats("cpu", dt)
            gpu, id_gpu = torch_feats(args.device, dt)
            out[f"torch {name}"] = {"rel_err": _rel(gpu, cpu), "tolerance": tol, "ok": _rel(gpu, cpu) <= tol,
                                    "same_checkpoint_id": id_cpu == id_gpu}
    if have["jax"]:
        import jax
        import jax.numpy as jnp

        jax.config.update("jax_enable_x64", True)
        import sdi_jax
        from sdi_jax import models as jm

        def jax_feats(device, dtype):
            params = jax.device_put(jm.params_from_numpy(weights, cfg, dtype=dtype), device)
            batch = jax.device_put({"tokens": jnp.asarray(tokens), "targets": jnp.asarray(targets)}, device)
            attr = sdi_jax.Attributor(lambda p, b: jm.per_example_loss(p, b, cfg, scan=True), loop=lambda p: p["block"],
                                      sketch=sketch, progress=False)
            f = attr.featurize([batch], [sdi_core.Checkpoint(params)])
            return np.asarray(f.data[0]["loop"]), f.checkpoints[0].id

        for name, dt, tol in (("float64", jnp.float64, 1e-10), ("float32", jnp.float32, 1e-4)):
            cpu, id_cpu = jax_feats(jax_device("cpu"), dt)
            gpu, id_gpu = jax_feats(jax_device(args.device), dt)
            out[f"jax {name}"] = {"rel_err": _rel(gpu, cpu), "tolerance": tol, "ok": _rel(gpu, cpu) <= tol,
                                  "same_checkpoint_id": id_cpu == id_gpu}
    ok = all(v["ok"] and v["same_checkpoint_id"] for v in out.values())
    return {"status": "ok" if ok else "failed", "comparisons": out}


def section_bench(args, have) -> dict:
    if not have["torch"]:
        return {"status": "skipped", "reason": "torch cannot run on the device"}
    runs = {}
    out_dir = os.path.join(HERE, "results") if not args.quick else tempfile.mkdtemp(prefix="gpu_check_bench_")
    for dtype in ("float32", "bfloat16"):
        path = os.path.join(out_dir, f"torch_featurize_{args.device}_{dtype}{'_quick' if args.quick else ''}.json")
        cmd = [sys.executable, os.path.join(HERE, "bench_torch_featurize.py"), "--device", args.device, "--dtype", dtype,
               "--load-limit", str(args.load_limit), "--out", path]
        if args.quick:
            cmd += ["--quick", "--repeats", "1", "--threads", "1"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            runs[dtype] = {"status": "failed", "stderr": proc.stderr[-3000:]}
            continue
        with open(path) as f:
            res = json.load(f)
        runs[dtype] = {"status": "ok", "result_file": os.path.relpath(path, ROOT) if not args.quick else path,
                       "valid": res["valid"], "rows": res["rows"]}
    failed = [k for k, v in runs.items() if v["status"] != "ok"]
    return {"status": "failed" if failed else "ok", "runs": runs}


def section_scoring(args, have) -> dict:
    if not have["torch"]:
        return {"status": "skipped", "reason": "the queries are held as torch tensors on the device; torch cannot "
                                                "run there"}
    import numpy as np
    import torch

    import sdi_core
    from sdi_core import CheckpointInfo, Features, ParamInfo, SketchPlan, TensorSketch
    from sdi_core.scoring import score_store
    from sdi_core.store import featurize_to_store

    rows, dim, n_q, steps, k = args.score_rows, args.score_dim, 256, 8, 10
    plan = SketchPlan(TensorSketch(dim=dim, seed=0), [ParamInfo("w", (2 * dim,))])  # a CountSketched tensor: width dim
    ck = (CheckpointInfo("gpu-check", 1.0, None),)
    shard = min(rows, 1 << 16)
    block = np.random.default_rng(0).standard_normal((shard, dim), dtype=np.float32)  # synthetic features, tiled

    def featurize(ranges):
        a, b = ranges[0]
        data = (block[: b - a] + np.float32(a / rows))[:, None, :]
        return Features([{"loop": data}], plan.layout, ck, {"loop": steps}, example_ids=np.arange(a, b), summed=True)

    tmp = args.store_dir or tempfile.mkdtemp(prefix="gpu_check_store_")
    t0 = time.perf_counter()
    store = featurize_to_store(os.path.join(tmp, "train.store"), featurize,
                               [(a, min(rows, a + shard)) for a in range(0, rows, shard)], summed=True,
                               consolidate=False)
    write_s = time.perf_counter() - t0
    device = torch.device(args.device)
    q = torch.randn((n_q, steps, dim), generator=torch.Generator().manual_seed(1)).to(device)
    query = Features([{"loop": q}], plan.layout, ck, {"loop": steps}, example_ids=np.arange(n_q))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(2):  # the first run reads the store from disk, the second from the page cache
        t0 = time.perf_counter()
        res = score_store(store, query, k=k, budget="8GiB")
        sync()
        times.append(time.perf_counter() - t0)
    # the floor: a bare matmul of the same shapes on the device, the train matrix already there
    chunk = min(rows, 1 << 18)
    train = torch.from_numpy(block[: min(shard, chunk)]).to(device)
    qm = q.reshape(n_q * steps, dim).T.contiguous()
    reps = -(-rows // train.shape[0])
    torch.matmul(train, qm)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.matmul(train, qm)
    sync()
    bare = time.perf_counter() - t0
    top = getattr(res, "total_topk", None)
    return {"status": "ok", "rows": rows, "dim": dim, "queries": n_q, "steps": steps, "k": k,
            "store_gb": round(rows * dim * 4 / 1e9, 2), "write_s": round(write_s, 2),
            "score_s": [round(t, 3) for t in times], "bare_matmul_s": round(bare, 4),
            "throughput_vs_bare_matmul": round(bare / times[-1], 4),
            "top_ids_shape": None if top is None else list(np.shape(top.ids)),
            "store_dir": tmp if args.store_dir else "(temporary, removed)",
            "sdi_core": sdi_core.__version__}


# -------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse(argv)
    plan = {"conformance": f"conformance suite on {args.device} (torch; jax forms {args.jax_forms or 'none'})",
            "cpu_vs_gpu": f"CPU vs {args.device} features, float64 and float32, torch and jax",
            "bench": f"bench_torch_featurize.py on {args.device}, float32 and bfloat16",
            "scoring": f"score_store on a {args.score_rows} x {args.score_dim} store, queries on {args.device}"}
    if args.dry_run:
        for s in args.sections:
            print(f"{s}: {plan[s]}")
        return 0
    have = available(args.device)
    if args.device == "cuda" and not (have["torch"] or have["jax"]):
        print("gpu_check: no CUDA GPU found. " + "; ".join(have["notes"]) + ". Run it on a machine with one NVIDIA "
              "GPU and CUDA builds of torch (and jax); `--device cpu --quick` runs the same code on the CPU as a "
              "smoke test.", file=sys.stderr)
        return EXIT_NO_GPU
    info = common.machine_info()
    report = {"benchmark": "gpu_check", "command": common.command_line(__file__, argv), "device": args.device,
              "available": have, "quick": args.quick, "sections": {}}
    start = time.perf_counter()
    fns = {"conformance": section_conformance, "cpu_vs_gpu": section_cpu_vs_gpu, "bench": section_bench,
           "scoring": section_scoring}
    for s in args.sections:
        t0 = time.perf_counter()
        print(f"=== {s}: {plan[s]}", flush=True)
        try:
            res = fns[s](args, have)
        except Exception as exc:  # noqa: BLE001 - one failed section must not hide the others
            res = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        report["sections"][s] = res
        print(f"=== {s}: {res['status']} in {res['seconds']} s", flush=True)
    total = time.perf_counter() - start
    report["seconds"] = round(total, 1)
    report["within_budget"] = total <= BUDGET_S
    report["machine"] = common.finish_info(info)
    out = args.out or common.results_path(None, "gpu_check", args.quick)
    common.write_json(out, report)
    failed = [s for s, r in report["sections"].items() if r["status"] == "failed"]
    print(json.dumps({s: r["status"] for s, r in report["sections"].items()}),
          f"total {total:.0f} s (budget {BUDGET_S} s); wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
