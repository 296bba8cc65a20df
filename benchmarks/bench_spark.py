"""Benchmark the Spark FFN (sparse inference) against the dense gated FFN of equal parameter count, and
(on a GPU) Spark attention against dense attention.

FFN: decode batches of 1 / 4 / 16 tokens and a prefill batch; every available zigspark backend of the
sparse path (on a GPU "spark sparse cuda", csrc/spark_ffn, and "spark sparse triton", each also "unfused":
F.linear predictor + stat_topk + the sparse kernels on the gate, which the fused path folds into two of its
launches), the dense-masked path, and the dense GEGLU baseline (SparkFFN.dense_equivalent()). The Spark paper's 1.40× GPU decode
speedup is the bar.

Attention (GPU sizes; CPU runs time the FFN alone, --quick adds one tiny decode and one tiny prefill row): every available backend of
zigspark.spark_attention, forward and forward + backward, against torch SDPA and zigspark.flash_attention
on the same q, k, v (dense attention over all keys: what Spark attention's key selection has to beat);
and decode (one query per sequence against 4k–32k keys, forward only), where Triton's split-key kernels
read K[r:] and V only for the kept keys. Rows carry the mean number of keys kept per query.

    python benchmarks/bench_spark.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import zigspark  # noqa: E402
from zigspark import backends  # noqa: E402
from zigspark.nn import SparkFFN  # noqa: E402


def unfused(layer, x, backend):
    """The sparse FFN in three steps: F.linear predictor, stat_topk, then the backend's sparse kernels on the
    gate (zigspark::spark_ffn_sparse) — what spark_ffn(sparse=True) fuses into its kernels."""
    gate = zigspark.stat_topk(torch.nn.functional.linear(x[:, :layer.r], layer.K1), density=0.08, backend=backend)
    return torch.ops.zigspark.spark_ffn_sparse(x, gate, layer.K2, layer.V, layer.r, backend)


def run(device, d_model, d_ff, token_counts, dtype, progress=print) -> dict:
    layer = SparkFFN(d_model, d_ff, density=0.08).to(device=device, dtype=dtype).eval()
    dense = layer.dense_equivalent().to(device=device, dtype=dtype).eval()
    results = common.result_rows()
    for tokens in token_counts:
        inputs = [(torch.randn(tokens, d_model, device=device, dtype=dtype),)]
        impls = {"dense GEGLU (equal params)": dense,
                 "spark dense-masked": lambda x: zigspark.spark_ffn(x, layer.K1, layer.K2, layer.V, 0.08)}
        for backend in backends.BACKENDS:  # cuda, triton, reference: a row for each that can run here
            if backends.unavailable_reason("spark_ffn", backend, device, dtype) is None:
                if backend == "reference" and tokens > 16:
                    continue  # the per-token reference loop is the oracle, not a contender at prefill
                impls[f"spark sparse {backend}"] = (lambda b: lambda x: zigspark.spark_ffn(
                    x, layer.K1, layer.K2, layer.V, 0.08, sparse=True, backend=b))(backend)
                if backend != "reference":  # what fusing the predictor and threshold saves
                    impls[f"spark sparse {backend} unfused"] = (lambda b: lambda x: unfused(layer, x, b))(backend)
        times = {}
        with torch.no_grad():
            _, mask = zigspark.spark_ffn(*inputs[0], layer.K1, layer.K2, layer.V, 0.08, return_mask=True)
            active = mask.float().mean().item()      # measured fraction of active neurons
            # multiply-adds ×2 per token: the dense FFN's three d×h matrices; the dense-masked Spark FFN's
            # predictor, K2 and V in full; the sparse one's predictor in full and K2, V for active neurons only
            r, hidden = layer.r, dense.gate.out_features
            flops = {"dense GEGLU (equal params)": 6 * d_model * hidden,
                     "spark dense-masked": 2 * d_ff * (r + (d_model - r) + d_model)}
            sparse_flops = 2 * d_ff * (r + active * (2 * d_model - r))
            for name, fn in impls.items():
                ms = common.time_ms(fn, inputs, device)
                times[name] = ms
                results.append({"tokens": tokens, "d_model": d_model, "d_ff": d_ff, "density": 0.08,
                                "dtype": str(dtype).replace("torch.", ""), "impl": name, "ms": ms,
                                "flops": tokens * flops.get(name, sparse_flops), "measured_density": active})
                progress(f"  tokens {tokens:>5} {name:<28} {ms:9.3f} ms")
        for row in results[-len(times):]:
            row["speedup_vs_dense"] = times["dense GEGLU (equal params)"] / row["ms"]
    # fields that describe a row rather than define its case (benchmarks/report.py)
    return {"results": results, "info_fields": ["flops", "measured_density", "mean_kept", "fwd_flops"]}


def sdpa(q, k, v, causal):
    return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                            is_causal=causal).transpose(1, 2)


def run_attention(device, configs, dtype, progress=print) -> list[dict]:
    """Spark attention backends vs dense attention; configs are (batch, seqlen_q, seqlen, heads, head_dim,
    top_k, causal), seqlen the keys. seqlen_q < seqlen only without causal (SDPA's causal mask is aligned
    top-left, zigspark's bottom-right), and forward only: decode."""
    results = common.result_rows()
    for batch, seqlen_q, seqlen, heads, head_dim, top_k, causal in configs:
        assert seqlen_q == seqlen or not causal, "decode rows are non-causal (the masks align differently)"
        make = lambda: tuple(torch.randn(batch, s, heads, head_dim, device=device, dtype=dtype)  # noqa: E731
                             for s in (seqlen_q, seqlen, seqlen))
        inputs = common.rotation(make, (seqlen_q + 2 * seqlen) * batch * heads * head_dim * dtype.itemsize, device)
        impls = {"dense torch SDPA": lambda q, k, v: sdpa(q, k, v, causal)}
        if backends.unavailable_reason("flash_attention", "triton", device, dtype) is None:
            impls["dense zigspark-triton flash"] = lambda q, k, v: zigspark.flash_attention(
                q, k, v, causal=causal, backend="triton")
        for backend in backends.BACKENDS:
            if backends.unavailable_reason("spark_attention", backend, device, dtype) is None:
                if backend == "reference" and seqlen > 4096:
                    continue  # the chunked reference is the oracle, not a contender at long sequences
                impls[f"spark attention {backend}"] = (lambda b: lambda q, k, v: zigspark.spark_attention(
                    q, k, v, top_k, causal=causal, backend=b))(backend)
        kept = None
        if any(name.startswith("spark") for name in impls):
            with torch.no_grad():
                _, counts = zigspark.spark_attention(*inputs[0], top_k, causal=causal, return_kept=True)
            kept = counts.double().mean().item()
        # forward FLOPs: 4·D per visible pair for dense attention; Spark scores every visible pair on the r
        # predictor dims (2·r) and only kept pairs on the rest and the values (2·(D − r) + 2·D)
        visible = (seqlen + 1) / 2 if causal else seqlen
        r = head_dim // 4
        dense_flops = 4 * batch * heads * seqlen_q * visible * head_dim
        spark_flops = None if kept is None else \
            2 * batch * heads * seqlen_q * (visible * r + kept * (2 * head_dim - r))
        for name, fn in impls.items():
            row = {"batch": batch, "seqlen_q": seqlen_q, "seqlen": seqlen, "heads": heads, "head_dim": head_dim,
                   "top_k": top_k, "causal": causal, "dtype": str(dtype).replace("torch.", ""), "impl": name,
                   "mean_kept": kept if name.startswith("spark") else None,
                   "fwd_flops": spark_flops if name.startswith("spark") else dense_flops}
            with torch.no_grad():
                row["fwd_ms"] = common.time_ms(fn, inputs, device)

            def fwd_bwd(q, k, v, fn=fn):
                leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
                fn(*leaves).float().sum().backward()

            row["fwd_bwd_ms"] = common.time_ms(fwd_bwd, inputs, device) if seqlen_q == seqlen else None
            results.append(row)
            both = "" if row["fwd_bwd_ms"] is None else f"  fwd+bwd {row['fwd_bwd_ms']:8.3f} ms"
            progress(f"  b{batch} q{seqlen_q} s{seqlen} h{heads} d{head_dim} top{top_k} "
                     f"{'causal' if causal else 'full':<6} {name:<28} fwd {row['fwd_ms']:8.3f} ms{both}")
    return results


def run_cuda(device) -> dict:
    payload = run(device, 2048, 16384, [1, 4, 16, 2048], torch.bfloat16)
    decode = [(b, 1, s, 16, 128, 256, False) for b in (1, 8) for s in (4096, 32768)]
    prefill = [(4, 2048, 2048, 16, 64, 256, True), (2, 4096, 4096, 16, 128, 256, True),
               (2, 4096, 4096, 16, 128, 256, False), (1, 16384, 16384, 16, 128, 256, True),
               (1, 32768, 32768, 16, 128, 256, True)]  # 32k last: if cut off, the rest stay
    attention = decode + prefill
    payload["results"] += run_attention(device, attention, torch.bfloat16)
    return payload


def run_quick(device) -> dict:
    """Tiny sizes of every row kind, so that each code path runs (the decode row splits its 512 keys in two)."""
    payload = run(device, 32, 128, [1, 2], torch.float32)
    payload["results"] += run_attention(device, [(1, 1, 512, 2, 16, 8, False), (1, 32, 32, 2, 16, 4, True)],
                                        torch.float32)
    return payload


def main(argv=None) -> int:
    return common.cli(__doc__, "spark_ffn", {
        "quick": run_quick,
        "cuda": run_cuda,
        "cpu": lambda device: run(device, 512, 2048, [1, 4, 16], torch.float32),
    }, argv)

if __name__ == "__main__":
    raise SystemExit(main())
