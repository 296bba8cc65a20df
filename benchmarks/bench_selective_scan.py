"""Benchmark the selective scan along a zigzag order.

Compared, forward and forward + backward:
  * zigspark-<backend> with order=zigzag path (the order applied inside the op),
  * gather + the same backend's raster scan + scatter (what public ZigMa code does),
  * the sequential PyTorch loop (mamba-ssm's selective_scan_ref style), forward only at long L,
  * mamba-ssm's selective_scan_fn (gather + scan + scatter) when mamba_ssm is importable.

GPU sizes follow ZigMa (dim 1536, N 16, L 1024 / 4096 / 16384); the CPU run uses L 1024 to show the
reference against the loop at dim 16, 64 and 256 (issue #3 asks >= 10x there).

    python benchmarks/bench_selective_scan.py [--quick]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import zigspark  # noqa: E402
from zigspark import backends, orders  # noqa: E402
from zigspark.reference.selective_scan import sequential_selective_scan  # noqa: E402


def make_inputs(batch, dim, length, n, device, dtype):
    return dict(
        u=torch.randn(batch, dim, length, device=device, dtype=dtype),
        delta=(0.5 * torch.rand(batch, dim, length, device=device)).to(dtype),
        A=-(0.5 + torch.rand(dim, n, device=device)),
        B=torch.randn(batch, n, length, device=device, dtype=dtype),
        C=torch.randn(batch, n, length, device=device, dtype=dtype),
        D=torch.randn(dim, device=device),
        z=torch.randn(batch, dim, length, device=device, dtype=dtype),
        delta_bias=0.1 * torch.randn(dim, device=device),
    )


def fused(backend, order):
    return lambda x: zigspark.selective_scan(**x, delta_softplus=True, order=order, backend=backend)


def permuted(scan, order):
    """What public ZigMa code does: copy the per-step inputs into scan order, scan, copy back."""
    idx, inv = order.indices(), order.inverse_indices()

    def run(x):
        device = x["u"].device
        g = {k: (v.index_select(-1, idx.to(device)) if k in ("u", "delta", "z", "B", "C") else v)
             for k, v in x.items()}
        return scan(g).index_select(-1, inv.to(device))

    return run


def gather_scan_scatter(backend, order):
    return permuted(lambda g: zigspark.selective_scan(**g, delta_softplus=True, backend=backend), order)


def sequential(order):
    return permuted(lambda g: sequential_selective_scan(**g, delta_softplus=True)[0], order)


def mamba_ssm_baseline(order):
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return permuted(lambda g: selective_scan_fn(**g, delta_softplus=True), order)


def with_backward(fn):
    def run(x):
        leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in x.items()}
        out = fn(leaves)
        out.float().sum().backward()
        return out

    return run


def implementations(device, dtype, order, length):
    impls = {}
    for backend in backends.BACKENDS:
        if backends.unavailable_reason("selective_scan", backend, device, dtype) is None:
            if backend == "reference" and device.type == "cuda" and length > 4096:
                continue  # the oracle at ZigMa's longest sequence only costs the benchmark its time limit
            impls[f"zigspark-{backend} fused order"] = fused(backend, order)
            impls[f"zigspark-{backend} gather+scan+scatter"] = gather_scan_scatter(backend, order)
    baseline = mamba_ssm_baseline(order)
    if baseline is not None and device.type == "cuda":
        impls["mamba-ssm gather+scan+scatter"] = baseline
    if length <= 4096:
        impls["sequential loop"] = sequential(order)
    return impls


def run(device, configs, dtypes, progress=print) -> dict:
    results = []
    for dtype in dtypes:
        for batch, dim, length, n in configs:
            side = int(math.isqrt(length))
            order = orders.zigzag(side, length // side, path=3)
            inputs = common.rotation(lambda: make_inputs(batch, dim, length, n, device, dtype),
                                     3 * batch * dim * length * dtype.itemsize, device)
            inputs = [(x,) for x in inputs]
            io_bytes = batch * length * (4 * dim + 2 * n) * dtype.itemsize  # u, delta, z, out + B, C
            times = {}
            for name, fn in implementations(device, dtype, order, length).items():
                row = {"dtype": str(dtype).replace("torch.", ""), "batch": batch, "dim": dim, "L": length, "N": n,
                       "impl": name}
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                row["fwd_ms"] = common.time_ms(fn, inputs, device)
                row["fwd_gbs"] = io_bytes / (row["fwd_ms"] * 1e-3) / 1e9
                if name != "sequential loop" or length <= 1024:
                    row["fwd_bwd_ms"] = common.time_ms(with_backward(fn), inputs, device)
                if device.type == "cuda":
                    row["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
                times[name] = row
                results.append(row)
                progress(f"  {row['dtype']:<8} b{batch} d{dim} L{length} N{n} {name:<40} fwd {row['fwd_ms']:9.3f} ms"
                         + (f"  fwd+bwd {row['fwd_bwd_ms']:9.3f} ms" if "fwd_bwd_ms" in row else ""))
            loop = times.get("sequential loop")
            for row in times.values():
                if loop:
                    row["fwd_speedup_vs_loop"] = loop["fwd_ms"] / row["fwd_ms"]
                    if "fwd_bwd_ms" in row and "fwd_bwd_ms" in loop:
                        row["fwd_bwd_speedup_vs_loop"] = loop["fwd_bwd_ms"] / row["fwd_bwd_ms"]
    return {"order": "zigzag path 3", "delta_softplus": True, "results": results}


def main(argv=None) -> int:
    return common.cli(__doc__, "selective_scan", {
        "quick": lambda device: run(device, [(1, 8, 64, 4)], [torch.float32]),
        "cuda": lambda device: run(device, [(2, 1536, 1024, 16), (2, 1536, 4096, 16), (1, 1536, 16384, 16)],
                                   [torch.bfloat16]),
        "cpu": lambda device: run(device, [(1, 16, 1024, 16), (1, 64, 1024, 16), (1, 256, 1024, 16)],
                                  [torch.float32]),
    }, argv)

if __name__ == "__main__":
    raise SystemExit(main())
