"""`zigspark check`: every available backend of every op against the float64 reference.

The ops with continuous outputs: stat_topk, selective_scan, causal_conv1d, flash_attention,
attention_received and sparse spark_ffn. spark_attention (its key selection flips within rounding of θ)
and hiprune_select (exact indices) are checked in the test tiers instead.

For each op, backend and dtype: the largest forward and backward error (relative to the largest value)
against the reference run in float64, the same error of the reference run in that dtype (the numerics rule's yardstick: a kernel
passes when its error is at most 2x the reference's own, gradients 3x, plus a small floor), and the time
of one forward + backward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import backends, orders
from .ops.attention import attention_received, flash_attention
from .ops.causal_conv1d import causal_conv1d
from .ops.selective_scan import selective_scan
from .ops.spark import spark_ffn
from .ops.stat_topk import stat_topk

FLOOR = {torch.float32: 2e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float64: 1e-12}  # relative


@dataclass
class OpCase:
    name: str
    op: str                                              # name in the backend registry
    make_inputs: Callable[[torch.device, torch.dtype], list[torch.Tensor]]
    run: Callable[..., torch.Tensor]                     # run(*inputs, backend=...) -> output
    differentiable: bool = True


def _stat_topk_case(large: bool) -> OpCase:
    rows, d = (256, 16384) if large else (64, 1000)

    def make(device, dtype):
        return [torch.randn(rows, d, device=device, dtype=dtype)]

    return OpCase(f"stat_topk {rows}x{d}", "stat_topk", make,
                  lambda x, backend: stat_topk(x, density=0.08, backend=backend))


def _selective_scan_case(large: bool) -> OpCase:
    batch, dim, h, w, n = (2, 256, 32, 32, 16) if large else (1, 16, 8, 12, 16)
    order = orders.zigzag(h, w, path=5)

    def make(device, dtype):
        L = h * w
        return [torch.randn(batch, dim, L, device=device, dtype=dtype),                  # u
                (0.5 * torch.rand(batch, dim, L, device=device)).to(dtype),               # delta
                -(0.5 + torch.rand(dim, n, device=device)),                               # A (float32)
                torch.randn(batch, n, L, device=device, dtype=dtype),                     # B
                torch.randn(batch, n, L, device=device, dtype=dtype),                     # C
                torch.randn(dim, device=device),                                          # D
                torch.randn(batch, dim, L, device=device, dtype=dtype)]                   # z

    def run(u, delta, A, B, C, D, z, backend):
        return selective_scan(u, delta, A, B, C, D, z, delta_softplus=True, order=order, backend=backend)

    return OpCase(f"selective_scan zigzag {h}x{w}", "selective_scan", make, run)


def _causal_conv1d_case(large: bool) -> OpCase:
    batch, dim, h, w = (2, 512, 32, 32) if large else (1, 16, 8, 12)
    order = orders.zigzag(h, w, path=2)

    def make(device, dtype):
        return [torch.randn(batch, dim, h * w, device=device, dtype=dtype),
                torch.randn(dim, 4, device=device, dtype=dtype), torch.randn(dim, device=device, dtype=dtype)]

    return OpCase(f"causal_conv1d zigzag {h}x{w}", "causal_conv1d", make,
                  lambda x, wt, b, backend: causal_conv1d(x, wt, b, "silu", order=order, backend=backend))


def _attention_cases(large: bool) -> list[OpCase]:
    batch, seqlen, heads, kv_heads, head_dim = (2, 2048, 16, 4, 128) if large else (1, 100, 4, 2, 40)

    def make(device, dtype):
        return [torch.randn(batch, seqlen, h, head_dim, device=device, dtype=dtype)
                for h in (heads, kv_heads, kv_heads)]

    return [
        OpCase(f"flash_attention causal {seqlen}", "flash_attention", make,
               lambda q, k, v, backend: flash_attention(q, k, v, causal=True, backend=backend)),
        OpCase(f"attention_received {seqlen}", "attention_received", make,
               lambda q, k, v, backend: attention_received(q, k, exclude_queries=[0], backend=backend),
               differentiable=False),
    ]


def _spark_ffn_case(large: bool) -> OpCase:
    """Sparse inference only (the dense-masked training path is plain PyTorch around stat_topk). Every
    backend gets the same active set: the gate comes from the same stat_topk call in every run."""
    tokens, d_model, d_ff, r = (16, 2048, 8192, 512) if large else (5, 64, 256, 16)

    def make(device, dtype):
        scale = lambda n: n ** -0.5  # noqa: E731
        return [torch.randn(tokens, d_model, device=device, dtype=dtype),
                (torch.randn(d_ff, r, device=device) * scale(r)).to(dtype),
                (torch.randn(d_ff, d_model - r, device=device) * scale(d_model - r)).to(dtype),
                (torch.randn(d_model, d_ff, device=device) * scale(d_ff)).to(dtype)]

    return OpCase(f"spark_ffn sparse {tokens}x{d_model}", "spark_ffn", make,
                  lambda x, K1, K2, V, backend: spark_ffn(x, K1, K2, V, 0.08, sparse=True, backend=backend),
                  differentiable=False)


def cases(large: bool) -> list[OpCase]:
    return [_stat_topk_case(large), _selective_scan_case(large), _causal_conv1d_case(large),
            *_attention_cases(large), _spark_ffn_case(large)]


def _forward_backward(case: OpCase, inputs, backend):
    if not case.differentiable:
        return case.run(*inputs, backend=backend).detach(), [torch.zeros(())]
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = case.run(*leaves, backend=backend)
    # the same upstream gradient for every dtype: drawn in float32 on the CPU, then cast
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), [g.detach() for g in grads]


def _max_err(a, b) -> float:
    """Largest error relative to the largest magnitude of the float64 reference `b`."""
    if not a.numel():
        return 0.0
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _time(fn, device) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    repeats = 5
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def run_checks(device: torch.device, dtypes, large: bool, progress=print) -> list[dict]:
    rows = []
    for case in cases(large):
        for dtype in dtypes:
            torch.manual_seed(0)
            inputs = case.make_inputs(device, dtype)
            ref_out, ref_grads = _forward_backward(case, [t.double() for t in inputs], "reference")
            low_out, low_grads = _forward_backward(case, inputs, "reference")
            ref_err = _max_err(low_out, ref_out)
            ref_gerr = max(_max_err(a, b) for a, b in zip(low_grads, ref_grads))
            for backend in backends.BACKENDS:
                reason = backends.unavailable_reason(case.op, backend, device, dtype)
                row = {"op": case.name, "backend": backend, "dtype": str(dtype).replace("torch.", ""),
                       "device": device.type}
                if reason is not None:
                    rows.append({**row, "status": "unavailable", "reason": reason})
                    continue
                progress(f"  checking {case.name} {row['dtype']} on {backend} ...")
                out, grads = _forward_backward(case, inputs, backend)
                err = _max_err(out, ref_out)
                gerr = max(_max_err(a, b) for a, b in zip(grads, ref_grads))
                floor = FLOOR[dtype]
                ok = err <= 2 * ref_err + floor and gerr <= 3 * ref_gerr + floor
                ms = _time(lambda: _forward_backward(case, inputs, backend), device)
                rows.append({**row, "status": "pass" if ok else "FAIL", "fwd_err": err, "ref_fwd_err": ref_err,
                             "bwd_err": gerr, "ref_bwd_err": ref_gerr, "ms_fwd_bwd": ms})
    return rows


def format_rows(rows: list[dict]) -> str:
    header = f"{'op':<30} {'dtype':<9} {'backend':<10} {'status':<7} {'fwd rel':>9} {'(ref)':>9} " \
             f"{'bwd rel':>9} {'(ref)':>9} {'ms f+b':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if r["status"] == "unavailable":
            lines.append(f"{r['op']:<30} {r['dtype']:<9} {r['backend']:<10} n/a     {r['reason']}")
        else:
            lines.append(f"{r['op']:<30} {r['dtype']:<9} {r['backend']:<10} {r['status']:<7} {r['fwd_err']:>9.2e} "
                         f"{r['ref_fwd_err']:>9.2e} {r['bwd_err']:>9.2e} {r['ref_bwd_err']:>9.2e} "
                         f"{r['ms_fwd_bwd']:>9.2f}")
    return "\n".join(lines)
