"""Benchmark the selective scan along a zigzag order.

Compared, forward and forward + backward:
  * zigspark-<backend> with order=zigzag path (the order applied inside the op),
  * gather + the same backend's raster scan + scatter (what public ZigMa code does),
  * the sequential PyTorch loop (mamba-ssm's selective_scan_ref style), forward only at long L,
  * mamba-ssm's selective_scan_fn (gather + scan + scatter) when mamba_ssm is importable;
and at one size per device the same with the causal conv1d (width 4, silu) before the scan, as a Mamba
block runs them ("conv+scan" rows): both ops along the order, against gather + raster conv + raster scan
+ scatter (and mamba-ssm's causal_conv1d_fn + selective_scan_fn when both are importable). The conv is not
fused into the scan kernel: in a Mamba block x_proj reads the conv's output, so it is written to memory
either way (docs/ARCHITECTURE.md says why). fwd_pct_copy is the forward's GB/s against the device's
measured copy bandwidth.

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
from zigspark.reference.causal_conv1d import causal_conv1d as reference_causal_conv1d  # noqa: E402
from zigspark.reference.selective_scan import sequential_selective_scan  # noqa: E402


CONV_WIDTH = 4


def make_inputs(batch, dim, length, n, device, dtype, conv=False):
    extra = {} if not conv else dict(conv_weight=0.5 * torch.randn(dim, CONV_WIDTH, device=device),
                                     conv_bias=0.1 * torch.randn(dim, device=device))
    return extra | dict(
        u=torch.randn(batch, dim, length, device=device, dtype=dtype),
        delta=(0.5 * torch.rand(batch, dim, length, device=device)).to(dtype),
        A=-(0.5 + torch.rand(dim, n, device=device)),
        B=torch.randn(batch, n, length, device=device, dtype=dtype),
        C=torch.randn(batch, n, length, device=device, dtype=dtype),
        D=torch.randn(dim, device=device),
        z=torch.randn(batch, dim, length, device=device, dtype=dtype),
        delta_bias=0.1 * torch.randn(dim, device=device),
    )


def scan_inputs(x):
    return {k: v for k, v in x.items() if not k.startswith("conv_")}


def with_conv(scan, conv):
    """u = silu(causal_conv1d(u)) first, as a Mamba block does; `conv(x, weight, bias)` along the same order."""
    return lambda x: scan({**scan_inputs(x), "u": conv(x["u"], x["conv_weight"], x["conv_bias"])})


def fused(backend, order):
    return lambda x: zigspark.selective_scan(**scan_inputs(x), delta_softplus=True, order=order, backend=backend)


def fused_conv(backend, order):
    conv = lambda u, w, b: zigspark.causal_conv1d(u, w, b, "silu", order=order, backend=backend)  # noqa: E731
    return with_conv(fused(backend, order), conv)


def permuted(scan, order):
    """What public ZigMa code does: copy the per-step inputs into scan order, scan, copy back."""
    idx, inv = order.indices(), order.inverse_indices()

    def run(x):
        device = x["u"].device
        g = {k: (v.index_select(-1, idx.to(device)) if k in ("u", "delta", "z", "B", "C") else v)
             for k, v in x.items()}
        return scan(g).index_select(-1, inv.to(device))

    return run


def gather_conv_scan_scatter(backend, order):
    conv = lambda u, w, b: zigspark.causal_conv1d(u, w, b, "silu", backend=backend)  # noqa: E731
    scan = lambda g: zigspark.selective_scan(**g, delta_softplus=True, backend=backend)  # noqa: E731
    return permuted(with_conv(scan, conv), order)


def gather_scan_scatter(backend, order):
    return permuted(lambda g: zigspark.selective_scan(**scan_inputs(g), delta_softplus=True, backend=backend),
                    order)


def sequential(order):
    return permuted(lambda g: sequential_selective_scan(**scan_inputs(g), delta_softplus=True)[0], order)


def mamba_ssm_baseline(order):
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return permuted(lambda g: selective_scan_fn(**scan_inputs(g), delta_softplus=True), order)


def mamba_ssm_conv_baseline(order):
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    conv = lambda u, w, b: causal_conv1d_fn(u, w, b, activation="silu")  # noqa: E731
    return permuted(with_conv(lambda g: selective_scan_fn(**g, delta_softplus=True), conv), order)


def with_backward(fn):
    def run(x):
        leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in x.items()}
        out = fn(leaves)
        out.float().sum().backward()
        return out

    return run


def implementations(device, dtype, order, length, conv=False):
    impls = {}
    for backend in backends.BACKENDS:
        if backends.unavailable_reason("selective_scan", backend, device, dtype) is None:
            if backend == "reference" and device.type == "cuda" and length > 4096:
                continue  # the oracle at ZigMa's longest sequence only costs the benchmark its time limit
            impls[f"zigspark-{backend} fused order"] = fused(backend, order)
            impls[f"zigspark-{backend} gather+scan+scatter"] = gather_scan_scatter(backend, order)
            # on a GPU the reference's conv+scan rows would only spend the benchmark's time limit
            if (conv and backends.unavailable_reason("causal_conv1d", backend, device, dtype) is None
                    and not (backend == "reference" and device.type == "cuda")):
                impls[f"zigspark-{backend} conv+scan fused order"] = fused_conv(backend, order)
                impls[f"zigspark-{backend} gather+conv+scan+scatter"] = gather_conv_scan_scatter(backend, order)
    baselines = {"mamba-ssm gather+scan+scatter": mamba_ssm_baseline(order)}
    if conv:
        baselines["mamba-ssm gather+conv+scan+scatter"] = mamba_ssm_conv_baseline(order)
    impls.update({name: fn for name, fn in baselines.items() if fn is not None and device.type == "cuda"})
    if length <= 4096:
        impls["sequential loop"] = sequential(order)
        if conv and device.type != "cuda":  # on a GPU it would only spend the benchmark's time limit
            conv_ref = lambda u, w, b: reference_causal_conv1d(u, w, b, silu=True)  # noqa: E731
            impls["sequential loop+conv"] = permuted(with_conv(lambda g: sequential_selective_scan(
                **g, delta_softplus=True)[0], conv_ref), order)
    return impls


def run(device, configs, dtypes, progress=print) -> dict:
    """configs: (batch, dim, L, N, conv): conv=True adds the conv+scan rows at that size."""
    results = common.result_rows()
    copy_gbs = common.copy_bandwidth_gbs(device)
    for dtype in dtypes:
        for batch, dim, length, n, conv in configs:
            side = int(math.isqrt(length))
            order = orders.zigzag(side, length // side, path=3)
            inputs = common.rotation(lambda: make_inputs(batch, dim, length, n, device, dtype, conv),
                                     3 * batch * dim * length * dtype.itemsize, device)
            inputs = [(x,) for x in inputs]
            # the fewest bytes any of them can move: u (or the conv's x), delta, z, out, and B, C
            io_bytes = batch * length * (4 * dim + 2 * n) * dtype.itemsize
            times = {}
            for name, fn in implementations(device, dtype, order, length, conv).items():
                row = {"dtype": str(dtype).replace("torch.", ""), "batch": batch, "dim": dim, "L": length, "N": n,
                       "conv": "conv" in name, "impl": name}
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                row["fwd_ms"] = common.time_ms(fn, inputs, device)
                row["fwd_gbs"] = io_bytes / (row["fwd_ms"] * 1e-3) / 1e9
                row["fwd_pct_copy"] = 100 * row["fwd_gbs"] / copy_gbs
                if not name.startswith("sequential loop") or length <= 1024:
                    row["fwd_bwd_ms"] = common.time_ms(with_backward(fn), inputs, device)
                if device.type == "cuda":
                    row["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
                times[name] = row
                results.append(row)
                progress(f"  {row['dtype']:<8} b{batch} d{dim} L{length} N{n} {name:<40} fwd {row['fwd_ms']:9.3f} ms"
                         + (f"  fwd+bwd {row['fwd_bwd_ms']:9.3f} ms" if "fwd_bwd_ms" in row else ""))
            for name, row in times.items():
                # the (#3) bars: the sequential loop, and gather + mamba-ssm's scan + scatter
                mamba = "mamba-ssm gather+conv+scan+scatter" if row["conv"] else "mamba-ssm gather+scan+scatter"
                for label, other in (("loop", "sequential loop+conv" if row["conv"] else "sequential loop"),
                                     ("mamba_ssm", mamba)):
                    base = times.get(other)
                    if base is None or name == other:
                        continue
                    row[f"fwd_speedup_vs_{label}"] = base["fwd_ms"] / row["fwd_ms"]
                    if "fwd_bwd_ms" in row and "fwd_bwd_ms" in base:
                        row[f"fwd_bwd_speedup_vs_{label}"] = base["fwd_bwd_ms"] / row["fwd_bwd_ms"]
    return {"order": "zigzag path 3", "delta_softplus": True, "conv_width": CONV_WIDTH,
            "copy_bandwidth_gbs": copy_gbs, "results": results}


def main(argv=None) -> int:
    return common.cli(__doc__, "selective_scan", {
        "quick": lambda device: run(device, [(1, 8, 64, 4, True)], [torch.float32]),
        "cuda": lambda device: run(device, [(2, 1536, 1024, 16, False), (2, 1536, 4096, 16, True),
                                            (1, 1536, 16384, 16, False), (8, 2048, 1024, 16, False)],
                                   [torch.bfloat16]),
        "cpu": lambda device: run(device, [(1, 16, 1024, 16, False), (1, 64, 1024, 16, False),
                                           (1, 256, 1024, 16, True)], [torch.float32]),
    }, argv)

if __name__ == "__main__":
    raise SystemExit(main())
