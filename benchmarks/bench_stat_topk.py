"""Benchmark statistical top-k: every backend against torch.topk + scattered mask and the reference.

Rows of 1k to 64k elements. Forward: time, GB/s (x read once + y written once) and % of the device's
measured copy bandwidth; forward + backward time too. Goal on a GPU (issue #2): >= 10x faster than
torch.topk + mask at 16k-long rows and >= 80% of copy bandwidth.

    python benchmarks/bench_stat_topk.py [--quick] [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import zigspark  # noqa: E402
from zigspark import backends  # noqa: E402

DENSITY = 0.08


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """The baseline: exact top-k by selection, then scatter the kept values into zeros."""
    values, idx = torch.topk(x, k, dim=-1, sorted=False)
    return torch.zeros_like(x).scatter_(-1, idx, values)


def fwd_bwd(fn):
    def run(x, g):
        x = x.detach().requires_grad_(True)
        y = fn(x)
        y.backward(g)
        return x.grad

    return run


def implementations(device: torch.device, dtype: torch.dtype, d: int):
    k = int(DENSITY * d)
    impls = {"torch.topk+mask": lambda x: topk_mask(x, k)}
    for backend in backends.BACKENDS:
        if backends.unavailable_reason("stat_topk", backend, device, dtype) is None:
            impls[f"zigspark-{backend}"] = (lambda b: lambda x: zigspark.stat_topk(x, density=DENSITY, backend=b))(
                backend)
    return impls


def run(device: torch.device, dtypes, sizes, total_elements: int, with_backward: bool, progress=print) -> dict:
    bandwidth = common.copy_bandwidth_gbs(device)
    progress(f"{common.device_name(device)}: measured copy bandwidth {bandwidth:.0f} GB/s (read + write)")
    rows_out = common.result_rows()
    for dtype in dtypes:
        for d in sizes:
            rows = max(1, total_elements // d)
            nbytes = rows * d * dtype.itemsize
            sets = common.rotation(lambda: (torch.randn(rows, d, device=device, dtype=dtype),
                                            torch.randn(rows, d, device=device, dtype=dtype)), 2 * nbytes, device)
            times = {}
            for name, fn in implementations(device, dtype, d).items():
                ms = common.time_ms(lambda x, g: fn(x), sets, device)
                row = {"dtype": str(dtype).replace("torch.", ""), "rows": rows, "d": d, "impl": name,
                       "fwd_ms": ms, "fwd_gbs": 2 * nbytes / (ms * 1e-3) / 1e9}
                row["fwd_pct_copy_bw"] = 100 * row["fwd_gbs"] / bandwidth
                if with_backward:
                    row["fwd_bwd_ms"] = common.time_ms(fwd_bwd(fn), sets, device)
                times[name] = ms
                rows_out.append(row)
                progress(f"  {row['dtype']:<8} {rows:>6}x{d:<6} {name:<18} fwd {ms:8.3f} ms {row['fwd_gbs']:8.1f} GB/s "
                         f"({row['fwd_pct_copy_bw']:5.1f}% of copy)"
                         + (f"  fwd+bwd {row['fwd_bwd_ms']:8.3f} ms" if with_backward else ""))
            for row in rows_out[-len(times):]:
                row["speedup_vs_topk"] = times["torch.topk+mask"] / row["fwd_ms"]
                row["speedup_vs_reference"] = times["zigspark-reference"] / row["fwd_ms"]
    return {"copy_bandwidth_gbs": bandwidth, "density": DENSITY, "results": rows_out}


def plot(payload: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    dtypes = sorted({r["dtype"] for r in payload["results"]})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        rows = [r for r in payload["results"] if r["dtype"] == dtype]
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = sorted((r["d"], r["fwd_gbs"]) for r in rows if r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.axhline(payload["copy_bandwidth_gbs"], color="gray", linestyle="--", label="copy bandwidth")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("row length d")
        ax.set_ylabel("forward GB/s (read x + write y)")
        ax.set_title(f"stat_topk {dtype}, {payload['provenance']['device']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    sizes = [1024, 4096, 16384, 65536]
    return common.cli(__doc__, "stat_topk", {
        "quick": lambda device: run(device, [torch.float32], [1024, 4096], 1 << 14, with_backward=False),
        "cuda": lambda device: run(device, [torch.float32, torch.bfloat16], sizes, 1 << 26, with_backward=True),
        "cpu": lambda device: run(device, [torch.float32], sizes, 1 << 22, with_backward=True),
    }, argv, after=lambda data, path: plot(data, path.with_suffix(".png")))


if __name__ == "__main__":
    raise SystemExit(main())
