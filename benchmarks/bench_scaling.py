"""Scaling: how time (and, on a GPU, peak memory) grows with the sequence length.

selective_scan along a zigzag path over L (batch, dim and N fixed) and flash_attention over N = seqlen
(batch, heads and head_dim fixed), every zigspark backend that runs on the device, forward and forward +
backward. For each (op, backend, metric) the exponent p of  metric ≈ c · size^p  is the least-squares slope
of log metric against log size,

    p = Σ (x_i − x̄)(y_i − ȳ) / Σ (x_i − x̄)²,      x = log size, y = log metric,

fitted over all sizes (`exponent`) and over the larger half of them (`exponent_upper`: small sizes pay fixed
per-call costs, so the upper half is the asymptotic figure). Expected: the scan linear in time and memory
(p ≈ 1); attention quadratic in time (p ≈ 2) and linear in memory (p ≈ 1: no N×N matrix is kept).

Peak memory is measured on CUDA only: torch.cuda.max_memory_allocated during one forward + backward, minus
what was allocated before it (the inputs). PyTorch's CPU allocator keeps no peak statistic, so CPU result
files hold times only.

    python benchmarks/bench_scaling.py [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_selective_scan import make_inputs as make_scan_inputs  # noqa: E402

import zigspark  # noqa: E402
from zigspark import backends, orders  # noqa: E402


def fit_exponent(sizes, values) -> float | None:
    """Least-squares slope of log(values) against log(sizes); None with fewer than two points."""
    pts = [(math.log(s), math.log(v)) for s, v in zip(sizes, values) if s > 0 and v and v > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx > 0 else None


def grid_for(length: int) -> tuple[int, int]:
    """A token grid h × w = length, as square as the factors allow (the zigzag path needs the grid)."""
    h = math.isqrt(length)
    while length % h:
        h -= 1
    return h, length // h


def scan_case(batch, dim, n, length, device, dtype):
    order = orders.zigzag(*grid_for(length), path=3)
    x = make_scan_inputs(batch, dim, length, n, device, dtype)

    def call(backend, inputs):
        return zigspark.selective_scan(**inputs, delta_softplus=True, order=order, backend=backend)

    return x, call


def attention_case(batch, heads, head_dim, seqlen, device, dtype):
    x = {name: torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=dtype) for name in "qkv"}

    def call(backend, inputs):
        return zigspark.flash_attention(inputs["q"], inputs["k"], inputs["v"], backend=backend)

    return x, call


def forward_backward(call, backend):
    def run(inputs):
        leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
        call(backend, leaves).float().sum().backward()

    return run


def peak_memory_mib(fn, inputs, device) -> float:
    """Peak memory one call allocates beyond what exists before it (CUDA only)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn(inputs)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def sweep(op, size_key, sizes, make, fixed, device, dtype, reference_max, progress) -> list[dict]:
    rows = []
    for backend in backends.BACKENDS:
        if backends.unavailable_reason(op, backend, device, dtype) is not None:
            continue
        for size in sizes:
            if backend == "reference" and size > reference_max:
                continue  # the oracle at the largest sizes would only spend the time limit
            inputs, call = make(size)
            row = {"op": op, "backend": backend, "impl": f"zigspark-{backend}", **fixed, size_key: size,
                   "dtype": str(dtype).replace("torch.", "")}
            row["fwd_ms"] = common.time_ms(lambda x: call(backend, x), [(inputs,)], device)
            row["fwd_bwd_ms"] = common.time_ms(forward_backward(call, backend), [(inputs,)], device)
            if device.type == "cuda":
                row["fwd_bwd_peak_mem_mib"] = peak_memory_mib(forward_backward(call, backend), inputs, device)
            rows.append(row)
            progress(f"  {op:<15} {row['impl']:<20} {size_key} {size:>6}  fwd {row['fwd_ms']:9.3f} ms  "
                     f"fwd+bwd {row['fwd_bwd_ms']:9.3f} ms"
                     + (f"  peak {row['fwd_bwd_peak_mem_mib']:8.1f} MiB" if "fwd_bwd_peak_mem_mib" in row else ""))
    return rows


def fits(rows: list[dict]) -> list[dict]:
    out = []
    groups = dict.fromkeys((r["op"], r["backend"]) for r in rows)
    for op, backend in groups:
        mine = [r for r in rows if r["op"] == op and r["backend"] == backend]
        size_key = "L" if op == "selective_scan" else "seqlen"
        for metric in ("fwd_ms", "fwd_bwd_ms", "fwd_bwd_peak_mem_mib"):
            pts = sorted((r[size_key], r[metric]) for r in mine if metric in r)
            if len(pts) < 2:
                continue
            upper = pts[len(pts) // 2:] if len(pts) >= 6 else pts[-3:]
            out.append({"op": op, "backend": backend, "metric": metric, "size": size_key,
                        "sizes": f"{pts[0][0]}–{pts[-1][0]}", "points": len(pts),
                        "exponent": fit_exponent(*zip(*pts)), "exponent_upper": fit_exponent(*zip(*upper)),
                        "upper_sizes": f"{upper[0][0]}–{upper[-1][0]}"})
    return out


def run(device, scan, attention, dtype, progress=print) -> dict:
    """scan / attention: dicts of the fixed sizes, the swept sizes and the reference's largest size."""
    load = common.cpu_load() if device.type == "cpu" else None
    rows = sweep("selective_scan", "L", scan["L"],
                 lambda length: scan_case(scan["batch"], scan["dim"], scan["N"], length, device, dtype),
                 {"batch": scan["batch"], "dim": scan["dim"], "N": scan["N"]}, device, dtype,
                 scan["reference_max"], progress)
    rows += sweep("flash_attention", "seqlen", attention["seqlen"],
                  lambda n: attention_case(attention["batch"], attention["heads"], attention["head_dim"], n,
                                           device, dtype),
                  {"batch": attention["batch"], "heads": attention["heads"], "head_dim": attention["head_dim"]},
                  device, dtype, attention["reference_max"], progress)
    fitted = fits(rows)
    for f in fitted:
        progress(f"  fit {f['op']:<15} {f['backend']:<9} {f['metric']:<20} p = {f['exponent']:.2f} "
                 f"(sizes {f['sizes']}), upper half p = {f['exponent_upper']:.2f} ({f['upper_sizes']})")
    payload = {"memory": "peak of forward + backward beyond the inputs (CUDA)" if device.type == "cuda"
               else "not measured: the CPU allocator keeps no peak statistic"}
    if load is not None:  # CPU timings on a shared machine are only as good as its load
        payload.update(cpu_load_1min_before=load, cpu_load_1min_after=common.cpu_load())
    return {**payload, "results": rows, "fits": fitted}


def plot(payload: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = payload["results"]
    panels = [("selective_scan", "L", "fwd_ms"), ("selective_scan", "L", "fwd_bwd_ms"),
              ("flash_attention", "seqlen", "fwd_ms"), ("flash_attention", "seqlen", "fwd_bwd_ms")]
    if any("fwd_bwd_peak_mem_mib" in r for r in rows):
        panels += [("selective_scan", "L", "fwd_bwd_peak_mem_mib"),
                   ("flash_attention", "seqlen", "fwd_bwd_peak_mem_mib")]
    cols = 2
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(10, 3.4 * -(-len(panels) // cols)),
                             squeeze=False)
    exps = {(f["op"], f["backend"], f["metric"]): f["exponent"] for f in payload["fits"]}
    for ax, (op, size_key, metric) in zip(axes.flat, panels):
        last = [(1, 1)]
        for backend in dict.fromkeys(r["backend"] for r in rows if r["op"] == op):
            pts = sorted((r[size_key], r[metric]) for r in rows
                         if r["op"] == op and r["backend"] == backend and metric in r)
            if not pts:
                continue
            p = exps.get((op, backend, metric))
            ax.plot(*zip(*pts), marker="o", label=f"zigspark-{backend}" + (f" (p = {p:.2f})" if p else ""))
            last = pts
        expected = 2 if op == "flash_attention" and "mem" not in metric else 1
        (x1, y1) = last[-1]
        guide = [x for x, _ in last]
        ax.plot(guide, [y1 * (x / x1) ** expected for x in guide], color="gray", linestyle="--", linewidth=1,
                label=f"slope {expected} (expected)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(size_key)
        ax.set_ylabel("MiB" if "mem" in metric else "ms")
        ax.set_title(f"{op}: {metric}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"scaling, {payload['provenance']['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    return common.cli(__doc__, "scaling", {
        "quick": lambda device: run(
            device, dict(batch=1, dim=4, N=4, L=[64, 256], reference_max=256),
            dict(batch=1, heads=1, head_dim=16, seqlen=[32, 128], reference_max=128), torch.float32),
        "cuda": lambda device: run(
            device, dict(batch=2, dim=1536, N=16, L=[1024, 2048, 4096, 8192, 16384, 32768, 65536],
                         reference_max=4096),
            dict(batch=1, heads=16, head_dim=128, seqlen=[1024, 2048, 4096, 8192, 16384, 32768],
                 reference_max=4096), torch.bfloat16),
        "cpu": lambda device: run(
            device, dict(batch=1, dim=16, N=16, L=[256, 512, 1024, 2048, 4096, 8192, 16384], reference_max=16384),
            dict(batch=1, heads=2, head_dim=64, seqlen=[256, 512, 1024, 2048, 4096], reference_max=4096),
            torch.float32),
    }, argv, after=lambda data, path: plot(data, path.with_suffix(".png")))


if __name__ == "__main__":
    raise SystemExit(main())
