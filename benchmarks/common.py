"""Shared helpers of the cross-cutting benchmark scripts: timing, memory, machine description, reports.

The benchmark machines are small and shared, so absolute seconds mean little.
Every number these scripts report as a claim is a *ratio* against a baseline
measured in the same process, in the same rounds:

- :func:`interleaved` runs all candidates once per round, in an order that
  rotates from round to round, after a warm-up call of each.  A burst of load
  from another process then hits one round of every candidate rather than all
  rounds of one.
- :func:`summarize` reports, per candidate, the best and median time and two
  ratios to the baseline: best over best, and the median over rounds of the
  *paired* ratio (candidate time over baseline time in the same round).  The
  paired median is the headline: it cancels slow drifts in machine load.
- :func:`setup` sets ``OMP_WAIT_POLICY=PASSIVE`` (unless already set) before
  torch is imported: with the default spin-waiting, an OpenMP thread that
  waits for a descheduled sibling burns its time slice, and on an
  oversubscribed machine a 2-thread forward+backward was measured 10-50x
  slower than with passive waiting, drowning every ratio in scheduler noise.
- :func:`peak_memory` measures the peak resident memory a call adds on top of
  what the process held before it (Linux ``VmHWM`` after resetting it via
  ``/proc/self/clear_refs``).  ``setup(memory=True)`` makes glibc return large
  freed blocks to the OS at once (``mallopt``), so the peak is not hidden by
  memory an earlier call freed but the allocator kept.
- Time and peak memory are measured in **separate processes**
  (:func:`measure_separately`, ``--measure both``): the memory instrumentation
  (small mmap threshold, trimming, ``clear_refs``) slows allocation and would
  compress the time ratios.
- Every result records the load before and after (:func:`load_snapshot`,
  :func:`finish_info`): the load averages, and the cores' worth of CPU that
  *other* processes used just before (an idle probe) and during the
  measurement.  A measurement waits for the 1-minute load average to fall to
  :data:`QUIET_LOAD` (0.5 on the 2-core machines) before it starts;
  :func:`load_record` marks it invalid when the load average at its start,
  or the other processes' CPU just before or during it, exceeds that; such
  numbers are not quoted.  (The load average at the end cannot decide: a
  2-thread benchmark raises it to about 2 by itself.)

Scripts call :func:`setup` first, then build their candidates.  Nothing here
imports torch or jax; framework-specific synchronisation (``block_until_ready``)
belongs in the candidate callables.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# glibc mallopt parameters (malloc.h): below this size blocks come from the heap.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


# ----------------------------------------------------------------------------- setup


def setup(threads: int | None = 2, *, memory: bool = True) -> dict:
    """Prepare the process for measuring and return a description of the machine.

    Args:
        threads: intra-op threads for torch (when it is imported later, call
            :func:`set_torch_threads`) and the BLAS/OpenMP environment; None
            leaves the defaults.
        memory: configure the allocator for :func:`peak_memory` (pass False
            in a process that measures time only).

    Returns:
        :func:`machine_info` at the start of the run.
    """
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(var, str(threads))
    # Read when the OpenMP runtime starts (first torch import): waiting threads sleep instead of spinning.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "torch" in sys.modules:
        print("common.setup: torch was imported before setup(); OMP_WAIT_POLICY may not take effect",
              file=sys.stderr)
    if memory:
        _configure_malloc()
    info = machine_info()
    info["memory_instrumentation"] = bool(memory)
    return info


def _configure_malloc() -> bool:
    """Serve every block above 64 KiB by mmap so that freeing it returns it to the OS at once."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, 64 * 1024) == 1
        return bool(ok)
    except OSError:  # not glibc: peaks may then be underestimated after large frees
        return False


def set_torch_threads(threads: int | None) -> None:
    """``torch.set_num_threads`` when torch is imported and ``threads`` is given."""
    if threads is not None and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))


def machine_info(probe_s: float = 2.0) -> dict:
    """CPU model, cores, memory, load, Python and library versions (whichever are imported).

    ``probe_s``: seconds of idle probe of other processes' CPU use (:func:`load_snapshot`), 0 for none.
    """
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            if m:
                cpu = m.group(1).strip()
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"MemTotal:\s+(\d+) kB", f.read())
            if m:
                mem_gib = round(int(m.group(1)) / 2**20, 1)
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    versions = {"python": sys.version.split()[0]}
    for mod in ("numpy", "scipy", "torch", "jax", "jaxlib"):
        if mod in sys.modules:
            versions[mod] = getattr(sys.modules[mod], "__version__", "?")
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "versions": versions,
        "load_average": _loadavg(),
        "load_start": load_snapshot(probe_s),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "pid": os.getpid(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


QUIET_LOAD = 0.5  # 1-minute load average at the start, and cores of *other* processes' CPU, above which a measurement does not count

# Why not the load average alone: a 2-thread benchmark raises the 1-minute load
# average to about 2 by itself, so the load at the end says nothing about other
# processes.  What invalidates a measurement is CPU taken by *other* processes,
# so that is measured too: machine busy time (/proc/stat) minus this process's
# own CPU time (itself and its waited-for children), over the wall time.


def _machine_busy_s() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (user+nice+system+irq+softirq+steal)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    import resource

    own = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        own += ru.ru_utime + ru.ru_stime
    return own


def _counters() -> dict:
    return {"wall": time.monotonic(), "busy_s": _machine_busy_s(), "own_s": _own_cpu_s()}


def _other_cores(a: Mapping[str, Any], b: Mapping[str, Any]) -> float | None:
    """Cores' worth of CPU that processes other than this one (and its waited children) used between two counters."""
    if a.get("busy_s") is None or b.get("busy_s") is None:
        return None
    wall = max(b["wall"] - a["wall"], 1e-9)
    return max(0.0, (b["busy_s"] - a["busy_s"]) - (b["own_s"] - a["own_s"])) / wall


# Longest wait (s) for the 1-minute load average to fall to QUIET_LOAD before a measurement;
# the test suite sets SDI_BENCH_QUIET_WAIT_S=0 (its smoke runs are never quiet and need not be).
QUIET_WAIT_S = float(os.environ.get("SDI_BENCH_QUIET_WAIT_S", "600"))


def load_snapshot(probe_s: float = 0.0, limit: float = QUIET_LOAD, wait_s: float | None = None) -> dict:
    """Counters at one end of a measurement.

    With ``probe_s`` > 0 (the start of a measurement) it first waits, up to
    ``wait_s`` seconds (default :data:`QUIET_WAIT_S`), for the 1-minute load average to fall to ``limit``
    (the previous measurement of the same script, or a test run that just
    ended, is still in the average), then sleeps ``probe_s`` seconds and
    records what other processes used meanwhile.

    Returns:
        ``{"loadavg": [1, 5, 15 min], "wall": s, "busy_s": s, "own_s": s, "other_cores_idle_probe": cores or None}``;
        ``busy_s`` is None where ``/proc/stat`` cannot be read.
    """
    probe = None
    if probe_s > 0:
        deadline = time.monotonic() + (QUIET_WAIT_S if wait_s is None else wait_s)
        load = _loadavg()
        if load is not None and load[0] > limit:
            print(f"waiting for the 1-minute load average ({load[0]:.2f}) to fall to {limit} ...", flush=True)
        while load is not None and load[0] > limit and time.monotonic() < deadline:
            time.sleep(5.0)
            load = _loadavg()
        a = _counters()
        time.sleep(probe_s)
        other = _other_cores(a, _counters())
        probe = None if other is None else round(other, 3)
    return {"loadavg": _loadavg(), **_counters(), "other_cores_idle_probe": probe}


def load_record(start: Mapping[str, Any] | None, end: Mapping[str, Any] | None, limit: float = QUIET_LOAD) -> dict:
    """Whether the measurement between two :func:`load_snapshot` calls counts.

    ``valid`` iff the 1-minute load average was at most ``limit`` when it
    started, other processes used at most ``limit`` cores on average during
    it and, where ``start`` carries an idle probe, at most ``limit`` cores
    just before it.  The load average at the end is recorded but does not
    decide: the measurement itself raises it.  None (unknown) where the
    counters cannot be read.

    Returns:
        ``{"load_before", "load_after"`` (1/5/15-minute load averages),
        ``"other_cores_before"``, ``"other_cores_during"``,
        ``"load_limit", "valid", "reason"}``.
    """
    before = start.get("loadavg") if start else None
    after = end.get("loadavg") if end else None
    rec = {"load_before": before, "load_after": after, "other_cores_before": None, "other_cores_during": None,
           "load_limit": limit, "valid": None, "reason": "the CPU counters could not be read"}
    during = _other_cores(start, end) if start and end else None
    if during is None or before is None:
        return rec
    rec["other_cores_during"] = round(during, 3)
    rec["other_cores_before"] = probe = start.get("other_cores_idle_probe")
    problems = [f"the 1-minute load average was {before[0]:.2f} at the start"] if before[0] > limit else []
    if probe is not None and probe > limit:
        problems.append(f"other processes used {probe:.2f} cores just before")
    if during > limit:
        problems.append(f"other processes used {during:.2f} cores during the measurement")
    rec["valid"] = not problems
    rec["reason"] = "; ".join(problems) + f" (limit {limit})" if problems else None
    return rec


def finish_info(info: dict) -> dict:
    """``info`` with the versions of libraries imported since :func:`setup` and the load counters at the end."""
    out = dict(info)
    out["versions"] = machine_info(probe_s=0.0)["versions"]
    out["load_average_end"] = _loadavg()
    out["load_end"] = load_snapshot()
    if "torch" in sys.modules:
        out["torch_threads"] = sys.modules["torch"].get_num_threads()
    return out


# ------------------------------------------------------------------ load and runs

def load_validity(info: Mapping[str, Any], limit: float = QUIET_LOAD) -> dict:
    """:func:`load_record` of a run from its :func:`machine_info` / :func:`finish_info` snapshots.

    Returns:
        the :func:`load_record` dict (``valid`` False also when the counters could not be read).
    """
    rec = load_record(info.get("load_start"), info.get("load_end"), limit)
    if rec["valid"] is None:
        rec["valid"] = False
    return rec


def add_measure_args(ap) -> None:
    """``--measure``, ``--load-limit`` (and the hidden ``--json-out`` of a child run) for an argparse parser."""
    ap.add_argument("--measure", choices=("both", "time", "memory"), default="both",
                    help="both (default): time and peak memory, each in its own process; or one of them here")
    ap.add_argument("--load-limit", type=float, default=QUIET_LOAD,
                    help=f"results taken above this 1-minute load average are marked invalid (default {QUIET_LOAD})")
    ap.add_argument("--json-out", default=None, help=argparse.SUPPRESS)


def measure_separately(script: str, argv: Sequence[str] | None) -> dict[str, dict]:
    """Run ``script`` again with ``--measure time`` and with ``--measure memory``, each in a fresh process.

    Returns:
        ``{"time": payload, "memory": payload}``: what each child wrote to its ``--json-out``.
    """
    import subprocess
    import tempfile

    args = list(sys.argv[1:] if argv is None else argv)
    clean, skip = [], False
    for a in args:  # drop --measure X / --json-out X given to the parent
        if skip:
            skip = False
            continue
        if a in ("--measure", "--json-out"):
            skip = True
            continue
        if a.startswith(("--measure=", "--json-out=")):
            continue
        clean.append(a)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for what in ("time", "memory"):
            path = Path(tmp) / f"{what}.json"
            cmd = [sys.executable, os.path.abspath(script), *clean, "--measure", what, "--json-out", str(path)]
            print(f"--- {what} run (its own process): {' '.join(cmd[1:])}", flush=True)
            proc = subprocess.run(cmd)
            if proc.returncode != 0:
                raise SystemExit(f"the {what} run of {os.path.basename(script)} failed ({proc.returncode})")
            with open(path) as f:
                out[what] = json.load(f)
    return out


def run_measurements(script: str, argv: Sequence[str] | None, args, measure: Callable[[Any, str], dict]):
    """The ``--measure`` protocol of a script: ``{"time": payload or None, "memory": payload or None}``.

    ``--measure both`` runs ``script`` twice in fresh processes (:func:`measure_separately`);
    ``--measure time|memory`` calls ``measure(args, what)`` here.  In a child
    (``--json-out`` given) the payload is written there and None is returned.
    """
    if args.measure == "both":
        return measure_separately(script, argv)
    part = measure(args, args.measure)
    if args.json_out:
        write_json(args.json_out, part)
        return None
    return {"time": part if args.measure == "time" else None, "memory": part if args.measure == "memory" else None}


def report_validity(validity: Mapping[str, Any]) -> None:
    """Print the other processes' load of a run, and a loud line when it is invalid."""
    print(f"load: other processes {fmt_cores(validity.get('other_cores_before'))} cores before, "
          f"{fmt_cores(validity.get('other_cores_during'))} during (limit {validity.get('load_limit')})", flush=True)
    if not validity.get("valid"):
        print(f"INVALID RESULT (not to be quoted): {validity.get('reason')}", flush=True)


def fmt_cores(x: float | None) -> str:
    """Cores' worth of CPU for a one-line report ('?' when unknown)."""
    return "?" if x is None else f"{x:.2f}"


# ---------------------------------------------------------------------------- timing


def interleaved(
    candidates: Mapping[str, Callable[[], Any]],
    *,
    repeats: int = 3,
    warmup: int = 1,
) -> dict[str, list[float]]:
    """Wall-clock seconds of every candidate, ``repeats`` rounds, order rotated per round.

    Args:
        candidates: name -> zero-argument callable that runs the work to
            completion (synchronise asynchronous frameworks inside it).
        repeats: rounds; each round times every candidate once.
        warmup: untimed calls of each candidate first (JIT compilation,
            caches, hash tables).

    Returns:
        name -> list of ``repeats`` seconds, in round order.
    """
    names = list(candidates)
    if not names:
        raise ValueError("interleaved: no candidates to time")
    for _ in range(warmup):
        for n in names:
            candidates[n]()
    samples: dict[str, list[float]] = {n: [0.0] * repeats for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            gc.collect()
            t0 = time.perf_counter()
            candidates[n]()
            samples[n][r] = time.perf_counter() - t0
    return samples


def summarize(samples: Mapping[str, Sequence[float]], baseline: str) -> dict[str, dict]:
    """Best and median seconds and ratios to ``baseline`` for every candidate.

    Returns:
        name -> ``{"best_s", "median_s", "ratio_best", "ratio_paired_median",
        "ratio_paired_min", "ratio_paired_max", "times_s"}``; ratios are
        candidate / baseline (the baseline's own are 1).
    """
    if baseline not in samples:
        raise ValueError(f"summarize: baseline {baseline!r} not among {list(samples)}")
    base = samples[baseline]
    best_base = min(base)
    out = {}
    for name, ts in samples.items():
        paired = [t / b for t, b in zip(ts, base)]
        out[name] = {
            "best_s": min(ts),
            "median_s": statistics.median(ts),
            "ratio_best": min(ts) / best_base,
            "ratio_paired_median": statistics.median(paired),
            "ratio_paired_min": min(paired),
            "ratio_paired_max": max(paired),
            "times_s": list(ts),
        }
    return out


# ---------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"{field}:\s+(\d+) kB", f.read())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5": reset the peak resident set size (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_memory_supported() -> bool:
    """Whether :func:`peak_memory` can measure on this system (Linux with a resettable VmHWM)."""
    return _status_kib("VmHWM") is not None and _reset_peak()


def peak_memory(fn: Callable[[], Any]) -> tuple[Any, int | None]:
    """Run ``fn`` once; return its result and the peak resident bytes it added (None if unsupported).

    The peak counts everything the call allocated and still held at its
    highest point, its result included, above the resident size before the
    call.  Measure each candidate in its own call, after a warm-up, so that
    one-time allocations (JIT caches, hash tables) are not counted.
    """
    gc.collect()
    before = _status_kib("VmRSS")
    if before is None or not _reset_peak():
        return fn(), None
    out = fn()
    peak = _status_kib("VmHWM")
    return out, max(0, (peak - before)) * 1024


def mib(nbytes: float | None) -> float | None:
    """Bytes -> MiB (None stays None)."""
    return None if nbytes is None else nbytes / 2**20


# --------------------------------------------------------------------------- reports


def fmt(value: Any, spec: str = "") -> str:
    """Format a table cell: None -> "-", floats with ``spec``, the rest with ``str``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return format(value, spec) if spec else f"{value:.4g}"
    return format(value, spec) if spec else str(value)


def table(rows: Iterable[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table of ``rows``; ``columns`` are ``(key, header, format spec)``."""
    rows = list(rows)
    cells = [[fmt(r.get(k), spec) for k, _, spec in columns] for r in rows]
    heads = [h for _, h, _ in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]
    line = lambda vals: "| " + " | ".join(v.rjust(w) for v, w in zip(vals, widths)) + " |"
    out = [line(heads), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"]
    out += [line(c) for c in cells]
    return "\n".join(out)


def results_path(out_dir: str | os.PathLike | None, name: str, quick: bool, ext: str = "json") -> Path:
    """``<out_dir>/<name>.<ext>``, or ``<name>_quick.<ext>`` in quick mode (quick runs never overwrite results)."""
    d = Path(out_dir) if out_dir is not None else RESULTS_DIR
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{name}{'_quick' if quick else ''}.{ext}"


def write_json(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON (NaN written as null) and return the path."""
    path = Path(path)

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, Mapping):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 1) == 0:
            return clean(x.item())
        if hasattr(x, "tolist"):
            return clean(x.tolist())
        return x

    with open(path, "w") as f:
        json.dump(clean(dict(payload)), f, indent=1)
        f.write("\n")
    return path


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces this run, relative to the repository root."""
    args = list(sys.argv[1:] if argv is None else argv)
    script = os.path.basename(script)
    return " ".join(["python", f"benchmarks/{script}"] + args)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 110})
    return plt


def add_common_args(ap) -> None:
    """``--quick``, ``--out-dir``, ``--threads`` and ``--repeats`` for an argparse parser."""
    ap.add_argument("--quick", action="store_true", help="a few seconds: tiny grid, for the test suite")
    ap.add_argument("--out-dir", default=None, help="folder for JSON and PNG output (default benchmarks/results)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per configuration (default per mode)")
