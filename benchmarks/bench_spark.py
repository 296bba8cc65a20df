"""Benchmark the Spark FFN (sparse inference) against the dense gated FFN of equal parameter count.

Decode batches of 1 / 4 / 16 tokens and a prefill batch; every available zigspark backend of the sparse
path, the dense-masked path, and the dense GEGLU baseline (SparkFFN.dense_equivalent()). The Spark
paper's 1.40× GPU decode speedup is the bar.

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


def run(device, d_model, d_ff, token_counts, dtype, progress=print) -> dict:
    layer = SparkFFN(d_model, d_ff, density=0.08).to(device=device, dtype=dtype).eval()
    dense = layer.dense_equivalent().to(device=device, dtype=dtype).eval()
    results = []
    for tokens in token_counts:
        inputs = [(torch.randn(tokens, d_model, device=device, dtype=dtype),)]
        impls = {"dense GEGLU (equal params)": dense,
                 "spark dense-masked": lambda x: zigspark.spark_ffn(x, layer.K1, layer.K2, layer.V, 0.08)}
        for backend in backends.BACKENDS:
            if backends.unavailable_reason("spark_ffn", backend, device, dtype) is None:
                if backend == "reference" and tokens > 16:
                    continue  # the per-token reference loop is the oracle, not a contender at prefill
                impls[f"spark sparse {backend}"] = (lambda b: lambda x: zigspark.spark_ffn(
                    x, layer.K1, layer.K2, layer.V, 0.08, sparse=True, backend=b))(backend)
        times = {}
        with torch.no_grad():
            for name, fn in impls.items():
                ms = common.time_ms(fn, inputs, device)
                times[name] = ms
                results.append({"tokens": tokens, "d_model": d_model, "d_ff": d_ff, "density": 0.08,
                                "dtype": str(dtype).replace("torch.", ""), "impl": name, "ms": ms})
                progress(f"  tokens {tokens:>5} {name:<28} {ms:9.3f} ms")
        for row in results[-len(times):]:
            row["speedup_vs_dense"] = times["dense GEGLU (equal params)"] / row["ms"]
    return {"results": results}


def main(argv=None) -> int:
    return common.cli(__doc__, "spark_ffn", {
        "quick": lambda device: run(device, 32, 128, [1, 2], torch.float32),
        "cuda": lambda device: run(device, 2048, 16384, [1, 4, 16, 2048], torch.bfloat16),
        "cpu": lambda device: run(device, 512, 2048, [1, 4, 16], torch.float32),
    }, argv)

if __name__ == "__main__":
    raise SystemExit(main())
