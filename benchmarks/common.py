"""Shared benchmark machinery: timing, the device's measured copy bandwidth, provenance, result files.

GPU times come from triton.testing.do_bench (CUDA events, median of many runs, L2 flushed between runs)
with the inputs rotated so that consecutive calls do not find their data in cache. CPU times come from
torch.utils.benchmark (median of blocked runs). Each result file carries the device, library versions and
the git commit, and is named <bench>-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def provenance(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
        # code changes only: result files and the report they feed are outputs, not what was measured
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                     ":(exclude)benchmarks/results", ":(exclude)BENCHMARKS.md"], capture_output=True,
                                    text=True, cwd=Path(__file__).parent.parent).stdout.strip())
    except OSError:
        commit, dirty = None, None
    if commit is None and os.environ.get("ZIGSPARK_COMMIT"):
        # a copy of the working tree without .git (the GPU machine): the commit is named by whoever sent it
        commit, dirty = os.environ["ZIGSPARK_COMMIT"], None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": commit,
        "dirty_worktree": dirty,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    return info


def time_ms(fn, inputs: list, device: torch.device) -> float:
    """Median milliseconds of fn(*inputs[i]) with i rotating over the input sets."""
    state = {"i": 0}

    def call():
        args = inputs[state["i"] % len(inputs)]
        state["i"] += 1
        return fn(*args)

    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(call, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])[0])
    from torch.utils import benchmark

    # Timer runs on one thread unless told otherwise; time with the threads the provenance records.
    timer = benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=0.3).median * 1e3


def rotation(make, nbytes_per_set: int, device: torch.device) -> list:
    """Enough input sets to exceed the last-level cache (GPU), or a single one (CPU)."""
    if device.type != "cuda":
        return [make()]
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    count = max(1, min(8, -(-2 * l2 // max(1, nbytes_per_set))))
    return [make() for _ in range(count)]


def copy_bandwidth_gbs(device: torch.device, nbytes: int | None = None) -> float:
    """Measured device copy bandwidth, GB/s counting bytes read plus bytes written."""
    if nbytes is None:
        nbytes = 1 << 30 if device.type == "cuda" else 1 << 27
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda a, b: b.copy_(a), [(src, dst)], device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def write_result(bench: str, device: torch.device, payload: dict) -> tuple[Path, dict]:
    """Write results/<bench>-<device>-<date>.json with provenance; returns the path and what was written."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    date = _dt.date.today().isoformat()
    path = RESULTS / f"{bench}-{slug(device_name(device))}-{date}.json"
    data = {"benchmark": bench, "provenance": provenance(device), **payload}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path, data


_collected: list[list] = []


def result_rows() -> list:
    """A list for a benchmark's result rows. The rows gathered so far are written even when the run is
    stopped by SIGINT (a time limit), so a cut-off run still leaves what it measured."""
    rows: list = []
    _collected.append(rows)
    return rows


def cli(doc: str, bench: str, sizes: dict, argv=None, after=None) -> int:
    """The command line every benchmark shares: --device, --quick (tiny sizes, no result file).

    sizes maps "quick", "cuda" and "cpu" to a function device -> payload; the payload is written as
    results/<bench>-<device>-<date>.json (then `after(data, path)` runs, e.g. to plot it).
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, no result file (smoke test)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    _collected.clear()  # the rows of this run only, when one process runs several benchmarks
    try:
        payload = sizes["quick" if args.quick else device.type](device)
    except KeyboardInterrupt:
        rows = [row for rows in _collected for row in rows]
        if args.quick or not rows:
            raise
        path, _ = write_result(bench, device, {"interrupted": "stopped by SIGINT (a time limit) before every "
                                                              "configuration ran", "results": rows})
        print(f"interrupted: wrote the {len(rows)} rows measured so far to {path}")
        return 130
    if not args.quick:
        path, data = write_result(bench, device, payload)
        extra = after(data, path) if after else None
        print(f"wrote {path}" + (f" and {extra}" if extra else ""))
    return 0


def time_few_ms(fn, device: torch.device, reps: int = 5, warmup: int = 1) -> float:
    """Median milliseconds of `reps` calls of fn() after `warmup` calls, for calls too long to repeat the
    hundreds of times do_bench does (a training step, a whole sampling run). CUDA: events on the current
    stream around each call; CPU: perf_counter."""
    import statistics
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cpu_load() -> float | None:
    """1-minute load average of the machine (CPU timings on a shared machine are only as good as this)."""
    import os

    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None
