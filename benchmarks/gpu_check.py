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
- ``scoring`` (written with issue 15): ``--n-train`` synthetic step-summed
  float32 rows of width ``--dim`` in a store on disk (default 1,000,000 x
  4096: 16 GB), scored by the public :func:`sdi_core.scoring.score_store`
  against ``--n-query`` x ``--steps`` torch query features on the GPU, top-k
  per query and step and in total, under ``--budget``; against the baseline
  of the whole train matrix already in GPU memory times the query matrix into
  a preallocated output (one ``torch.matmul``), in interleaved rounds, with
  the streamed top-k checked against that product and the peak GPU memory of
  each.

Without a GPU the script stops with exit status 2 and says so, unless
``--quick`` (or ``--device cpu``) is given: then the same code runs on the
CPU at small sizes, which checks the script and is no GPU result (the tests
do this).
Exit status 1 when a section failed.  The summary goes to
``benchmarks/results/gpu_check.json`` (``gpu_check_quick.json`` with ``--quick``).

    python benchmarks/gpu_check.py                       # on a machine with one NVIDIA GPU
    python benchmarks/gpu_check.py --sections cpu_vs_gpu,scoring --n-train 200000
    python benchmarks/gpu_check.py --quick               # seconds; on the CPU where there is no GPU
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


SCORING_QUICK = dict(n_train=6_000, dim=256, n_query=16, steps=4, shard_rows=2_000, budget="32MiB")


def parse(argv):
    from bench_scoring import workload_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    ap.add_argument("--device", default=None, choices=("cuda", "cpu"),
                    help="cuda (default; with --quick and no GPU: cpu); cpu runs the same code on the CPU")
    ap.add_argument("--jax-forms", default="unrolled", help="JAX conformance models: unrolled, scan, or none")
    ap.add_argument("--load-limit", type=float, default=None,
                    help="load limit passed to the benchmark (default 0.25 per usable CPU: the GPU run is not CPU bound)")
    ap.add_argument("--out", default=None, help="summary JSON path (default <out-dir>/gpu_check[_quick].json)")
    ap.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    workload_args(ap, n_train=1_000_000, dim=4096, budget="8GiB", shard_rows=100_000)
    args = ap.parse_args(argv)
    if args.quick:
        for key, value in SCORING_QUICK.items():
            if getattr(args, key) == ap.get_default(key):
                setattr(args, key, value)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad or not args.sections:
        ap.error(f"unknown section(s) {bad}; choose from {', '.join(SECTIONS)}")
    args.jax_forms = [f.strip() for f in args.jax_forms.split(",") if f.strip() and f.strip() != "none"]
    bad = [f for f in args.jax_forms if f not in ("unrolled", "scan")]
    if bad:
        ap.error(f"--jax-forms: unknown {bad}; choose from unrolled, scan, none")
    if args.n_train < 1 or args.dim < 2:
        ap.error("--n-train must be >= 1 and --dim >= 2")
    if args.load_limit is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
        args.load_limit = max(common.QUIET_LOAD, 0.25 * cpus)
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

    import array_api_compat.torch as tx
    from bench_scoring import query_of, synthetic_store
    from sdi_core import Features
    from sdi_core.scoring import parse_bytes, score_store

    cuda = args.device == "cuda"
    dev = torch.device(args.device)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    with synthetic_store(args) as (store, write_s):
        query_np = query_of(args, store)
        query = Features([{"loop": tx.asarray(query_np.data[0]["loop"], device=dev)}], query_np.layout,
                         query_np.checkpoints, query_np.steps)
        budget = parse_bytes(args.budget)
        load_before = common.load_snapshot(probe_s=1.0)
        train = torch.cat([torch.from_numpy(np.array(b[0]["loop"]).reshape(-1, args.dim)).to(dev)
                           for _, _, b in store.iter_blocks(args.shard_rows)])
        q_mat = query.data[0]["loop"].reshape(-1, args.dim)
        out = torch.empty((args.n_train, q_mat.shape[0]), dtype=torch.float32, device=dev)
        peaks, last = {}, {}

        def bare():
            torch.matmul(train, q_mat.T, out=out)
            sync()

        def streamed():
            last["res"] = score_store(store, query, k=args.k, budget=budget)  # results are NumPy: synchronised

        for name, fn in (("bare_matmul", bare), ("streamed", streamed)):  # warm-up and peak device memory
            if cuda:
                sync()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            fn()
            peaks[name] = (torch.cuda.max_memory_allocated() - base) if cuda else None
        samples = common.interleaved({"bare_matmul": bare, "streamed": streamed}, repeats=args.repeats, warmup=0)
        summary = common.summarize(samples, baseline="bare_matmul")
        res = last["res"]
        cols = np.linspace(0, q_mat.shape[0] - 1, 8).astype(int)
        top = torch.topk(out[:, torch.as_tensor(cols, device=dev)], args.k, dim=0).indices.cpu().numpy()
        verified = all(set(top[:, i]) == set(res.slot_topk.indices[c // args.steps, c % args.steps])
                       for i, c in enumerate(cols))
        s = summary["streamed"]
        return {
            "status": "ok" if verified else "failed",
            "gpu_result": bool(cuda),
            "device": torch.cuda.get_device_name(0) if cuda else "cpu (no CUDA: checks the script, not a GPU result)",
            "workload": {"n_train": args.n_train, "dim": args.dim, "n_query": args.n_query, "steps": args.steps,
                         "k": args.k, "budget_bytes": budget, "store_bytes": int(store.nbytes)},
            "baseline": "torch.matmul(train[N, dim] on the device, query[dim, n_query*steps]) into a preallocated output",
            "throughput_vs_bare_matmul": {"paired_median": 1 / s["ratio_paired_median"], "best_over_best": 1 / s["ratio_best"]},
            "timings": summary,
            "peak_device_bytes": peaks,
            "block_rows": res.block_rows,
            "scored_on": {"namespace": res.meta["namespace"], "device": res.meta["device"]},
            "topk_matches_baseline_product": bool(verified),
            "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "store_write_s": write_s,
            **common.load_record(load_before, common.load_snapshot()),
        }


# -------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse(argv)
    if args.device is None:
        args.device = "cuda" if (available("cuda")["torch"] or available("cuda")["jax"]) or not args.quick else "cpu"
    plan = {"conformance": f"conformance suite on {args.device} (torch; jax forms {args.jax_forms or 'none'})",
            "cpu_vs_gpu": f"CPU vs {args.device} features, float64 and float32, torch and jax",
            "bench": f"bench_torch_featurize.py on {args.device}, float32 and bfloat16",
            "scoring": f"score_store on a {args.n_train} x {args.dim} store, queries on {args.device}"}
    if args.dry_run:
        for s in args.sections:
            print(f"{s}: {plan[s]}")
        return 0
    have = available(args.device)
    if args.device == "cuda" and not (have["torch"] or have["jax"]):
        print("gpu_check: no CUDA GPU found. " + "; ".join(have["notes"]) + ". Run it on a machine with one NVIDIA "
              "GPU and CUDA builds of torch (and jax); `--quick` (or `--device cpu`) runs the same code on the CPU "
              "as a smoke test.", file=sys.stderr)
        return EXIT_NO_GPU
    info = common.setup(args.threads, memory=False)
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
    out = args.out or common.results_path(args.out_dir, "gpu_check", args.quick)
    common.write_json(out, report)
    failed = [s for s, r in report["sections"].items() if r["status"] == "failed"]
    print(json.dumps({s: r["status"] for s, r in report["sections"].items()}),
          f"total {total:.0f} s (budget {BUDGET_S} s); wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
