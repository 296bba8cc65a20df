"""`zigspark check`: every available backend of every op against the float64 reference.

For each op, backend and dtype: the largest forward and backward error against the reference run in
float64, the same error of the reference run in that dtype (the numerics rule's yardstick: a kernel
passes when its error is at most 2x the reference's own, gradients 3x, plus a small floor), and the time
of one forward + backward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import backends
from .ops.stat_topk import stat_topk

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


@dataclass
class OpCase:
    name: str
    op: str                                              # name in the backend registry
    make_inputs: Callable[[torch.device, torch.dtype], list[torch.Tensor]]
    run: Callable[..., torch.Tensor]                     # run(*inputs, backend=...) -> output


def _stat_topk_case(large: bool) -> OpCase:
    rows, d = (256, 16384) if large else (64, 1000)

    def make(device, dtype):
        return [torch.randn(rows, d, device=device, dtype=dtype)]

    return OpCase(f"stat_topk {rows}x{d}", "stat_topk", make,
                  lambda x, backend: stat_topk(x, density=0.08, backend=backend))


def cases(large: bool) -> list[OpCase]:
    return [_stat_topk_case(large)]


def _forward_backward(case: OpCase, inputs, backend):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = case.run(*leaves, backend=backend)
    torch.manual_seed(1)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), [g.detach() for g in grads]


def _max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


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
    header = f"{'op':<22} {'dtype':<9} {'backend':<10} {'status':<7} {'fwd err':>9} {'(ref)':>9} " \
             f"{'bwd err':>9} {'(ref)':>9} {'ms f+b':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if r["status"] == "unavailable":
            lines.append(f"{r['op']:<22} {r['dtype']:<9} {r['backend']:<10} n/a     {r['reason']}")
        else:
            lines.append(f"{r['op']:<22} {r['dtype']:<9} {r['backend']:<10} {r['status']:<7} {r['fwd_err']:>9.2e} "
                         f"{r['ref_fwd_err']:>9.2e} {r['bwd_err']:>9.2e} {r['ref_bwd_err']:>9.2e} "
                         f"{r['ms_fwd_bwd']:>9.2f}")
    return "\n".join(lines)
