"""Benchmark flash attention and attention_received.

Attention: every zigspark backend against torch SDPA (whichever kernel PyTorch picks, and on a GPU its flash
kernel alone) and eager attention, forward and forward + backward, causal and not, head_dim 64 and 128.
TFLOP/s counts 4·B·S²·H·D for the forward, 2.5× that for the backward, half of it when causal; % is of the
device's measured bf16 matmul peak. attention_received: against eager softmax-then-sum, with the same
masking, time and peak memory above the inputs (peak_mem_mib). The Triton kernels tune their
tiles on first use of each shape bucket (before timing starts); the tiles they picked are in the JSON.

    python benchmarks/bench_attention.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import zigspark  # noqa: E402
from zigspark import backends  # noqa: E402


def eager(q, k, v, causal):
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    s = qh @ kh.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return (torch.softmax(s.float(), -1).to(q.dtype) @ vh).transpose(1, 2)


def sdpa(q, k, v, causal):
    return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                            is_causal=causal).transpose(1, 2)


def sdpa_flash(q, k, v, causal):
    """SDPA restricted to its FlashAttention kernel: the issue's bar (#4) is that kernel, not the dispatcher."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return sdpa(q, k, v, causal)


def eager_received(q, k, causal):
    s = q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return torch.softmax(s.float(), -1).sum(2).mean(1)


def matmul_peak_tflops(device) -> float:
    n = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / (common.time_ms(torch.matmul, [(a, b)], device) * 1e-3) / 1e12


def run(device, configs, dtype, progress=print) -> dict:
    peak = matmul_peak_tflops(device)
    progress(f"{common.device_name(device)}: measured matmul peak {peak:.1f} TFLOP/s")
    results = common.result_rows()
    for batch, seqlen, heads, head_dim, causal in configs:
        make = lambda: tuple(torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=dtype)  # noqa: E731
                             for _ in range(3))
        inputs = common.rotation(make, 3 * batch * seqlen * heads * head_dim * dtype.itemsize, device)
        impls = {"torch SDPA": lambda q, k, v: sdpa(q, k, v, causal)}
        if device.type == "cuda":
            impls["torch SDPA flash"] = lambda q, k, v: sdpa_flash(q, k, v, causal)
        if seqlen <= 8192:
            impls["eager"] = lambda q, k, v: eager(q, k, v, causal)
        for backend in backends.BACKENDS:
            if backends.unavailable_reason("flash_attention", backend, device, dtype) is None:
                impls[f"zigspark-{backend}"] = (lambda b: lambda q, k, v: zigspark.flash_attention(
                    q, k, v, causal=causal, backend=b))(backend)
        flops = 4 * batch * seqlen ** 2 * heads * head_dim * (0.5 if causal else 1.0)
        for name, fn in impls.items():
            row = {"batch": batch, "seqlen": seqlen, "heads": heads, "head_dim": head_dim, "causal": causal,
                   "dtype": str(dtype).replace("torch.", ""), "impl": name}
            row["fwd_ms"] = common.time_ms(fn, inputs, device)
            row["fwd_tflops"] = flops / (row["fwd_ms"] * 1e-3) / 1e12

            def fwd_bwd(q, k, v, fn=fn):
                leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
                fn(*leaves).float().sum().backward()

            row["fwd_bwd_ms"] = common.time_ms(fwd_bwd, inputs, device)
            row["fwd_bwd_tflops"] = 3.5 * flops / (row["fwd_bwd_ms"] * 1e-3) / 1e12
            row["fwd_pct_peak"] = 100 * row["fwd_tflops"] / peak
            row["fwd_bwd_pct_peak"] = 100 * row["fwd_bwd_tflops"] / peak
            results.append(row)
            progress(f"  b{batch} s{seqlen} h{heads} d{head_dim} {'causal' if causal else 'full':<6} {name:<18} "
                     f"fwd {row['fwd_ms']:8.3f} ms {row['fwd_tflops']:7.2f} TFLOP/s  fwd+bwd {row['fwd_bwd_ms']:8.3f} ms")
        received = {"eager softmax-sum": eager_received}
        for backend in backends.BACKENDS:
            if backends.unavailable_reason("attention_received", backend, device, dtype) is None:
                received[f"zigspark-{backend} received"] = (lambda b: lambda q, k, causal: zigspark.attention_received(
                    q, k, causal=causal, backend=b))(backend)
        for name, fn in received.items():
            if name.startswith("eager") and seqlen > 8192:
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            ms = common.time_ms(lambda q, k, v, fn=fn: fn(q, k, causal), inputs, device)
            row = {"batch": batch, "seqlen": seqlen, "heads": heads, "head_dim": head_dim, "causal": causal,
                   "dtype": str(dtype).replace("torch.", ""), "impl": name, "received_ms": ms}
            if device.type == "cuda":
                row["peak_mem_mib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
            results.append(row)
            progress(f"  b{batch} s{seqlen} h{heads} d{head_dim} received {name:<26} {ms:8.3f} ms")
    return {"matmul_peak_tflops": peak, "results": results, "tuned_tiles": tuned_tiles()}


def tuned_tiles() -> dict:
    """The Triton tiles that tuning picked in this run, per kernel and shape bucket (empty when none tuned), as
    the table zigspark.tuning.use_tiles takes."""
    import zigspark.tuning

    return zigspark.tuning.tiles()


def main(argv=None) -> int:
    cuda_configs = [(16, 512, 16, 128, False), (4, 2048, 16, 128, False), (2, 4096, 16, 128, False),
                    (2, 4096, 16, 128, True), (1, 16384, 16, 128, True), (2, 4096, 16, 64, False)]
    return common.cli(__doc__, "attention", {
        "quick": lambda device: run(device, [(1, 64, 2, 32, True)], torch.float32),
        "cuda": lambda device: run(device, cuda_configs, torch.bfloat16),
        "cpu": lambda device: run(device, [(1, 512, 4, 64, False), (1, 1024, 4, 64, True)], torch.float32),
    }, argv)

if __name__ == "__main__":
    raise SystemExit(main())
