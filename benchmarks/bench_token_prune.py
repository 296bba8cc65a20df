"""Benchmark HiPrune token selection + gather, and the cost of the scores it needs.

Selection + gather for N = 576, 2880, 4096 patch tokens and batch 1–64, per backend; the gather alone
(prune_tokens, forward and forward + backward) per backend; and scoring: the
attention each token receives at one layer from zigspark.attention_received against eager attention
maps (softmax, then the sum over queries), which is what the official HiPrune code needs.

    python benchmarks/bench_token_prune.py [--quick]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import zigspark  # noqa: E402
from zigspark import backends  # noqa: E402

GRIDS = {576: (24, 24), 2880: (48, 60), 4096: (64, 64)}


def eager_scores(q, k):
    p = torch.softmax((q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)).float() / math.sqrt(q.shape[-1]), -1)
    return p.sum(2).mean(1)


def run(device, token_counts, batches, dtype, heads=16, head_dim=64, progress=print) -> dict:
    results = common.result_rows()
    for n in token_counts:
        grid = GRIDS.get(n, (1, n))
        keep = n // 9
        for batch in batches:
            obj, deep = torch.rand(batch, n, device=device), torch.rand(batch, n, device=device)
            x = torch.randn(batch, n, 1024, device=device, dtype=dtype)
            for backend in backends.BACKENDS:
                if (backends.unavailable_reason("hiprune_select", backend, device, obj.dtype) is not None
                        or backends.unavailable_reason("prune_tokens", backend, device, x.dtype) is not None):
                    continue

                def select_gather(o, d, t, b=backend):   # both steps on backend b, as the row's label says
                    return zigspark.prune_tokens(t, zigspark.hiprune_select(o, d, grid, keep, backend=b), backend=b)

                ms = common.time_ms(select_gather, [(obj, deep, x)], device)
                results.append({"N": n, "batch": batch, "keep": keep, "impl": f"hiprune select+gather {backend}",
                                "ms": ms})
                progress(f"  N {n:>5} batch {batch:>3} select+gather {backend:<10} {ms:9.3f} ms")
            idx = zigspark.hiprune_select(obj, deep, grid, keep)
            for backend in backends.BACKENDS:                   # the gather alone, forward and backward
                if backends.unavailable_reason("prune_tokens", backend, device, x.dtype) is not None:
                    continue
                leaf = x.detach().requires_grad_(True)

                def gather(t, b=backend):
                    return zigspark.prune_tokens(t, idx, backend=b)

                def gather_backward(t, b=backend):
                    zigspark.prune_tokens(t, idx, backend=b).sum().backward()

                row = {"N": n, "batch": batch, "keep": keep, "impl": f"prune_tokens gather {backend}",
                       "fwd_ms": common.time_ms(gather, [(x,)], device),
                       "fwd_bwd_ms": common.time_ms(gather_backward, [(leaf,)], device)}
                results.append(row)
                progress(f"  N {n:>5} batch {batch:>3} gather {backend:<10} {row['fwd_ms']:9.3f} ms"
                         f"  fwd+bwd {row['fwd_bwd_ms']:9.3f} ms")
        q = torch.randn(min(batches), n, heads, head_dim, device=device, dtype=dtype)
        k = torch.randn_like(q)
        for name, fn in (("eager attention maps", eager_scores),
                         ("zigspark.attention_received", lambda a, b: zigspark.attention_received(a, b))):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            ms = common.time_ms(fn, [(q, k)], device)
            row = {"N": n, "batch": min(batches), "impl": f"scores: {name}", "ms": ms}
            if device.type == "cuda":
                row["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            results.append(row)
            progress(f"  N {n:>5} scores {name:<30} {ms:9.3f} ms")
    return {"results": results}


def main(argv=None) -> int:
    return common.cli(__doc__, "token_prune", {
        "quick": lambda device: run(device, [64], [1], torch.float32, heads=2, head_dim=16),
        "cuda": lambda device: run(device, [576, 2880, 4096], [1, 8, 64], torch.bfloat16),
        "cpu": lambda device: run(device, [576, 2880], [1, 8], torch.float32, heads=4),
    }, argv)


if __name__ == "__main__":
    raise SystemExit(main())
