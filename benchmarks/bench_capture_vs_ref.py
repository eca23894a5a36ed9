"""sdi_torch featurisation now against an earlier commit's sdi_torch, in one process, interleaved.

The reference backend is exported from git (``git archive REF backends/torch``) into a temporary
package ``sdi_torch_ref`` (its imports are relative, so it runs against today's ``sdi_core``).  At the
issue-3 configuration (LoopedGPT d_model 256, 8 heads, tau 8, T 128, batch 32, float32, whole body
selected, TensorSketch per step) it times:

- ``fwd_bwd``: the plain forward + backward pass (the floor);
- ``ref m=M``: the reference commit's ``Attributor.featurize([batch])``;
- ``new m=M (no row check)``: today's, with ``check_rows=False`` (the capture's own cost);
- ``new m=M``: today's default (the row check featurises two examples alone once per featurize call).

    python benchmarks/bench_capture_vs_ref.py --ref a48f835 --repeats 10
    python benchmarks/bench_capture_vs_ref.py --ref a48f835 --quick

Results go to ``benchmarks/results/capture_vs_ref.json``; each records the load before and after.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import common  # noqa: E402

FULL = dict(d_model=256, heads=8, tau=8, seq=128, vocab=128, batch=32, dims="2048,8192", repeats=10)
QUICK = dict(d_model=32, heads=2, tau=2, seq=16, vocab=32, batch=4, dims="256", repeats=2)


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(ap)
    ap.add_argument("--load-limit", type=float, default=common.QUIET_LOAD,
                    help="results taken above this 1-minute load average are marked invalid")
    ap.add_argument("--ref", required=True, help="git commit whose backends/torch is the reference")
    ap.add_argument("--dims", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.dims = [int(x) for x in str(args.dims).split(",")]
    return args


def import_ref(ref: str, into: str):
    """``backends/torch`` at ``ref`` as the package ``sdi_torch_ref``."""
    blob = subprocess.run(["git", "-C", ROOT, "archive", ref, "backends/torch"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    os.rename(os.path.join(into, "backends", "torch"), os.path.join(into, "sdi_torch_ref"))
    sys.path.insert(0, into)
    return importlib.import_module("sdi_torch_ref.attributor")


def main(argv=None) -> dict:
    args = parse(argv)
    info = common.setup(args.threads, memory=False)
    import torch

    common.set_torch_threads(args.threads)
    import sdi_core
    import sdi_torch
    from sdi_core.reference.looped_transformer import LoopedConfig
    from sdi_torch.models import LoopedGPT, per_example_loss

    with tempfile.TemporaryDirectory() as tmp:
        ref = import_ref(args.ref, tmp)
        torch.manual_seed(0)
        cfg = LoopedConfig(vocab_size=args.vocab, d_model=args.d_model, n_heads=args.heads, tau=args.tau,
                           max_len=args.seq)
        model = LoopedGPT(cfg).eval()
        g = torch.Generator().manual_seed(1)
        batch = {"tokens": torch.randint(0, args.vocab, (args.batch, args.seq), generator=g),
                 "targets": torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)}

        def fwd_bwd():
            model.zero_grad(set_to_none=True)
            per_example_loss(model, batch).sum().backward()
            model.zero_grad(set_to_none=True)

        cands = {"fwd_bwd": fwd_bwd}
        for m in args.dims:
            sk = sdi_core.TensorSketch(dim=m, seed=0)
            a_ref = ref.Attributor(model, model.block, per_example_loss, sk, progress=False)
            a_new = sdi_torch.Attributor(model, model.block, per_example_loss, sk, progress=False, check_rows=False)
            a_chk = sdi_torch.Attributor(model, model.block, per_example_loss, sk, progress=False)
            cands[f"ref m={m}"] = lambda a=a_ref: a.featurize([batch], progress=False)
            cands[f"new m={m} (no row check)"] = lambda a=a_new: a.featurize([batch], progress=False)
            cands[f"new m={m}"] = lambda a=a_chk: a.featurize([batch], progress=False)
        samples = common.interleaved(cands, repeats=args.repeats, warmup=1)
    summary = common.summarize(samples, "fwd_bwd")
    for m in args.dims:
        r = samples[f"ref m={m}"]
        for name in (f"new m={m} (no row check)", f"new m={m}"):
            paired = sorted(t / b for t, b in zip(samples[name], r))
            summary[name]["vs_ref_paired_median"] = paired[len(paired) // 2]
            summary[name]["vs_ref_paired_min"], summary[name]["vs_ref_paired_max"] = paired[0], paired[-1]
    machine = common.finish_info(info)
    out = {"config": {k: getattr(args, k) for k in ("ref", "d_model", "heads", "tau", "seq", "vocab", "batch",
                                                    "dims", "repeats", "threads")},
           "command": common.command_line(__file__, argv), "summary": summary, "machine": machine,
           "load": common.load_validity(machine, args.load_limit)}
    path = args.out or common.results_path(args.out_dir, "capture_vs_ref", args.quick)
    common.write_json(path, out)
    for name, s in summary.items():
        extra = ""
        if "vs_ref_paired_median" in s:
            extra = (f"  vs ref {s['vs_ref_paired_median']:.3f}x ({s['vs_ref_paired_min']:.3f}-"
                     f"{s['vs_ref_paired_max']:.3f})")
        print(f"{name:28s} {s['median_s']:.3f} s  {s['ratio_paired_median']:.2f}x fwd+bwd "
              f"({s['ratio_paired_min']:.2f}-{s['ratio_paired_max']:.2f}){extra}")
    common.report_validity(out["load"])
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
