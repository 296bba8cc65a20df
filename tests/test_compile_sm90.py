"""compile tier: every Triton kernel compiled ahead of time for Hopper (sm_90a), on the CPU (tests/aot.py).

The ops run on CPU tensors with backend="triton" and tuning on, so their own launch logic chooses the
configurations, at shapes large enough to take the tiles a GPU run takes (the benchmarks' and the gpu tier's
buckets); every launch compiles instead of running. A case fails when a kernel does not compile, asks for
more shared memory than one Hopper block has, or spills more than SPILL_LIMIT bytes per thread. What this
cannot show: whether the compiled code is right (the interpret tier) or fast (the benchmarks, on a GPU).
"""

from __future__ import annotations

import pytest
import torch

import zigspark
from zigspark import orders

pytestmark = pytest.mark.compile
aot = pytest.importorskip("aot", reason="tests/aot.py needs triton")

# ptxas may spill a little around a loop (a few words is harmless); more than this is a tile to fix.
SPILL_LIMIT = 64
HALF = (torch.float16, torch.bfloat16)


def _grad(*tensors):
    return [t.detach().requires_grad_(True) for t in tensors]


def case_stat_topk():
    for dtype in (torch.float32, *HALF, torch.float64):
        for d in (1000, 4096, 16384, 65536):              # register-resident rows, then streamed ones
            (x,) = _grad(torch.randn(4, d, dtype=dtype))
            zigspark.stat_topk(x, density=0.08, backend="triton").sum().backward()
        zigspark.stat_topk(torch.randn(4, 4096, dtype=dtype), density=0.08, return_mask=True, backend="triton")


def _scan_inputs(dtype, batch, dim, length, n, bc, groups=2):
    u, delta, z = (torch.randn(batch, dim, length, dtype=dtype) for _ in range(3))
    A, D, bias = -torch.rand(dim, n), torch.randn(dim), torch.randn(dim)
    if bc == "constant":
        B, C = torch.randn(dim, n), torch.randn(dim, n)
    elif bc == "variable":
        B, C = (torch.randn(batch, n, length, dtype=dtype) for _ in range(2))
    else:
        B, C = (torch.randn(batch, groups, n, length, dtype=dtype) for _ in range(2))
    return u, delta, A, B, C, D, z, bias


def case_selective_scan():
    grid = (32, 32)
    for dtype in (torch.float32, *HALF):
        for n, bc in ((16, "variable"), (16, "constant"), (16, "grouped"), (1, "variable"), (64, "variable"),
                      (128, "variable"), (256, "variable")):
            u, delta, A, B, C, D, z, bias = _grad(*_scan_inputs(dtype, 2, 64, grid[0] * grid[1], n, bc))
            out, last = zigspark.selective_scan(u, delta, A, B, C, D, z, bias, True, True,
                                                order=orders.zigzag(*grid, 3), backend="triton")
            torch.autograd.backward([out, last], [torch.ones_like(out), torch.ones_like(last)])
    # without the optional inputs; raster, video and index orders; one step
    u, delta, A, B, C, *_ = _grad(*_scan_inputs(torch.bfloat16, 2, 64, 2 * 16 * 16, 16, "variable"))
    for order in (None, orders.temporal(2, 16, 16, backward=True), orders.zigzag(16, 16, 5, frames=2),
                  torch.randperm(2 * 16 * 16)):
        zigspark.selective_scan(u, delta, A, B, C, order=order, backend="triton").sum().backward()
    u, delta, A, B, C, *_ = _grad(*_scan_inputs(torch.bfloat16, 1, 64, 1, 16, "variable"))
    zigspark.selective_scan(u, delta, A, B, C, backend="triton").sum().backward()


def case_causal_conv1d():
    for dtype in (torch.float32, *HALF):
        for width in (2, 3, 4):
            x, w, b = _grad(torch.randn(2, 96, 1024, dtype=dtype), torch.randn(96, width, dtype=dtype),
                            torch.randn(96, dtype=dtype))
            zigspark.causal_conv1d(x, w, b, "silu", order=orders.zigzag(32, 32, 5), backend="triton").sum().backward()
            zigspark.causal_conv1d(x, w, None, None, order=torch.randperm(1024), backend="triton").sum().backward()


def case_flash_attention():
    # GQA compiles are the heaviest (group == 1 is specialised away under MHA), so most cases are GQA; each
    # head_dim bucket (64, 128, 256), causal and not, in fp16; the rest once. A case compiles every tuning
    # candidate of the forward, both backward kernels and the received sums (with and without query weights).
    cases = [(torch.float16, d, causal, 1) for d in (64, 128, 256) for causal in (False, True)]
    cases += [(torch.float16, 64, True, 4), (torch.float16, 40, False, 4), (torch.bfloat16, 128, True, 1)]
    cases += [(torch.float32, d, True, 1) for d in (64, 128, 256)]
    for dtype, head_dim, causal, kv_heads in cases:
        q = torch.randn(2, 512, 4, head_dim, dtype=dtype)
        k, v = (torch.randn(2, 512, kv_heads, head_dim, dtype=dtype) for _ in range(2))
        q, k, v = _grad(q, k, v)
        zigspark.flash_attention(q, k, v, causal=causal, backend="triton").sum().backward()
        zigspark.attention_received(q, k, causal=causal, backend="triton")
        zigspark.attention_received(q, k, causal=causal, exclude_queries=[0], backend="triton")


def case_spark_ffn():
    for dtype in (torch.float32, *HALF):
        d, f, r = 1024, 4096, 256
        K1, K2, V = torch.randn(f, r, dtype=dtype), torch.randn(f, d - r, dtype=dtype), torch.randn(d, f, dtype=dtype)
        for tokens in (1, 16, 512):
            x = torch.randn(tokens, d, dtype=dtype)
            zigspark.spark_ffn(x, K1, K2, V, 0.08, sparse=True, backend="triton")   # predictor fused in
            gate = torch.relu(torch.randn(tokens, f, dtype=dtype) - 1.4)          # a caller's own gate
            torch.ops.zigspark.spark_ffn_sparse(x, gate, K2, V, r, "triton")


def case_spark_attention():
    for dtype in (torch.float32, *HALF):
        for head_dim in (64, 128):
            for causal in (True, False):
                q, k, v = _grad(*(torch.randn(1, 1024, 4, head_dim, dtype=dtype) for _ in range(3)))
                zigspark.spark_attention(q, k, v, top_k=256, causal=causal, backend="triton").sum().backward()
    for dtype in (torch.float32, *HALF):              # decode: the split-key kernels
        for head_dim in (64, 128, 256) if dtype != torch.float32 else (64, 128):  # fp32 past 128 spills (_TILES)
            q = torch.randn(1, 1, 4, head_dim, dtype=dtype)
            k, v = (torch.randn(1, 4096, 4, head_dim, dtype=dtype) for _ in range(2))
            zigspark.spark_attention(q, k, v, top_k=256, causal=True, backend="triton")
            if head_dim == 128:
                zigspark.spark_attention(q, k, v, top_k=256, causal=True, renormalize_gate=True, backend="triton")
    for dtype in (torch.float32, torch.float16):      # the renormalised gate's variants (RENORM=True)
        q, k, v = _grad(*(torch.randn(1, 1024, 4, 128, dtype=dtype) for _ in range(3)))
        zigspark.spark_attention(q, k, v, top_k=256, causal=True, renormalize_gate=True, std_correction=1,
                                 backend="triton").sum().backward()


def case_token_prune():
    from zigspark.triton_kernels.token_prune import prune_tokens_bwd

    for dtype in (torch.float32, *HALF):
        for grid in ((24, 24), (48, 60), (64, 64), (1, 577)):
            n = grid[0] * grid[1]
            obj, deep = torch.rand(16, n).to(dtype), torch.rand(16, n).to(dtype)
            zigspark.hiprune_select(obj, deep, grid, n // 9, backend="triton")
            zigspark.hiprune_select(obj, deep, grid, n // 2, wrap_rows=True, always_keep=[0], backend="triton")
    for dtype in (torch.float32, *HALF, torch.float64):
        for channels in (64, 1024, 4096):                 # each row-block width
            (x,) = _grad(torch.randn(8, 576, channels, dtype=dtype))
            keep_idx = torch.randint(0, 576, (8, 64))
            zigspark.prune_tokens(x, keep_idx, backend="triton").sum().backward()
            prune_tokens_bwd(torch.randn(8, 64, channels, dtype=dtype), keep_idx, 576, unique=True)


CASES = {name[len("case_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}
KERNELS = {   # every kernel an op launches must have been compiled by its case
    "stat_topk": {"_stat_topk_fwd_kernel", "_stat_topk_bwd_kernel"},
    "selective_scan": {"_selective_scan_fwd_kernel", "_selective_scan_bwd_kernel"},
    "causal_conv1d": {"_conv_fwd_kernel", "_conv_grad_pre_kernel", "_conv_bwd_kernel"},
    "flash_attention": {"_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel",
                        "_attn_received_kernel"},
    "spark_ffn": {"_predictor_kernel", "_theta_kernel", "_active_values_kernel", "_project_kernel",
                  "_sum_splits_kernel"},
    "spark_attention": {"_stats_kernel", "_fwd_kernel", "_attn_bwd_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel",
                        "_split_stats_kernel", "_split_fwd_kernel", "_split_merge_kernel"},
    "token_prune": {"_hiprune_kernel", "_gather_rows_kernel", "_scatter_rows_kernel"},
}


def checked_compiles(record, what, capsys):
    """The compiles of a case, sorted, with their spills printed; fails if any did not compile or asks for
    more shared memory than a Hopper block has."""
    compiled = sorted(record.compiled.values(), key=str)
    with capsys.disabled():
        print(f"\n{what}: {len(compiled)} compiles for sm_90a, {sum(c.seconds for c in compiled):.0f} s")
        for c in compiled:
            if c.spill_bytes:
                print(f"  spills: {c}")
    assert not record.failed, "\n".join(record.failed.values())
    too_big = [str(c) for c in compiled if c.shared_bytes > aot.HOPPER_SHARED_BYTES]
    assert not too_big, "more shared memory than a Hopper block has:\n" + "\n".join(too_big)
    return compiled


@pytest.mark.parametrize("op", sorted(CASES))
def test_triton_kernels_compile_for_hopper(op, capsys):
    with aot.compiling() as record:
        CASES[op]()
    compiled = checked_compiles(record, op, capsys)
    assert KERNELS[op] <= record.kernels(), f"never launched: {sorted(KERNELS[op] - record.kernels())}"
    spilling = [str(c) for c in compiled if c.spill_bytes > SPILL_LIMIT]
    assert not spilling, f"spills over {SPILL_LIMIT} B per thread:\n" + "\n".join(spilling)


def test_wide_row_attention_compiles_for_hopper(monkeypatch, capsys):
    """The int64 row addressing (WIDE) that samples of 2³¹ elements or more take compiles for sm_90a, for
    flash attention and Spark attention at one fp16 size. Its spills are printed, not limited: it is the
    rare path, and some dK/dV tiles spill with it (up to 184 B at head_dim 40) where the ordinary path
    does not."""
    from zigspark.triton_kernels import attention

    monkeypatch.setattr(attention, "WIDE_FROM", 0)
    with aot.compiling() as record:
        q, k, v = _grad(*(torch.randn(1, 1024, 4, 64, dtype=torch.float16) for _ in range(3)))
        zigspark.flash_attention(q, k, v, causal=True, backend="triton").sum().backward()
        zigspark.attention_received(q, k, causal=True, backend="triton")
        zigspark.spark_attention(q, k, v, top_k=256, causal=True, backend="triton").sum().backward()
    compiled = checked_compiles(record, "wide rows", capsys)
    assert compiled and all("WIDE=True" in c.config for c in compiled), [str(c) for c in compiled]
