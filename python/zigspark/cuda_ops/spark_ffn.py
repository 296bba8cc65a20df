"""Launch the CUDA Spark FFN sparse-inference kernels (csrc/spark_ffn/spark_ffn.cu) with raw pointers.

Same contract as ``triton_kernels.spark_ffn.spark_ffn_sparse``: x (tokens, d_model), gate (tokens, d_ff) =
stat_topk(K1·x[:r]) (0 for inactive neurons), K2 (d_ff, d_model − r), VT = Vᵀ (d_ff, d_model), one dtype of
float32 / float16 / bfloat16 -> out (tokens, d_model) in x's dtype, with

    out_t = Σ_{i : gate_ti > 0} GELU(gate_ti)·(K2_i·x_t[r:])·VT_i      (exact GELU; float32 accumulation)

reading only the active neurons' rows of K2 and VT. Deterministic: the same inputs on the same GPU model give
the same bits.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .. import _cuda
from .._alloc import new_output
from ..validation import last_dim_contiguous

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# V -> ((V's version, pointer, shape, dtype), Vᵀ contiguous); weak in V, so a dropped V frees its copy.
_TRANSPOSED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def transposed(V: torch.Tensor) -> torch.Tensor:
    """Vᵀ (d_ff, d_model) with contiguous rows, as the kernel reads it, without transposing V on every call.

    A V stored (d_model, d_ff) row-major — SparkFFN's layout — has Vᵀ rows strided by d_ff; copying it per
    call would read and write all of V, many times the ~density·|V| bytes the sparse kernel reads. So the
    copy is kept (one extra V of memory) until V changes in place (its version counter moves) or is freed.
    A V that is already the transpose of a contiguous Vᵀ costs nothing. Inference tensors have no version
    counter, so they are copied each call.
    """
    vt = V.t()
    if vt.stride(-1) == 1 or vt.shape[-1] <= 1:
        return vt
    if V.is_inference():
        return vt.contiguous()
    state = (V._version, V.data_ptr(), tuple(V.shape), V.dtype)
    hit = _TRANSPOSED.get(V)
    if hit is not None and hit[0] == state:
        return hit[1]
    vt = vt.detach().contiguous()
    _TRANSPOSED[V] = (state, vt)
    return vt


def _rows(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.dim() != 2:
        raise ValueError(f"spark_ffn (cuda): {name} must be 2-D, got shape {tuple(t.shape)}")
    return last_dim_contiguous(t)


def slices_for(tokens: int, d_ff: int, device: torch.device) -> int:
    """Neuron slices per token the kernel runs with on this device (depends on its SM count)."""
    sms = _cuda.multiprocessor_count(device)
    return int(_cuda.extension().spark_ffn_slices(tokens, d_ff, sms))


MAX_FUSED_R = 4096        # the predictor kernel stages 8 tokens' x[:r] in shared memory (csrc: kMaxFusedR)
# The CUDA predictor runs on CUDA cores (one shared-memory read of x per 4–8 multiply-adds): at d_ff 16384,
# r 256 on an H100 its arithmetic (~0.1–0.2 µs per token) overtakes the ~2.5 µs of reading K1 somewhere
# past 10–20 tokens, while F.linear's tensor cores stay bound by the read. So decode batches fuse, larger
# ones take F.linear + stat_topk + the sparse kernel. An estimate, not a measurement: bench_spark's
# "unfused" rows are what should move it.
MAX_FUSED_TOKENS = 16


def fusable(tokens: int, r: int, device: torch.device) -> bool:
    """Whether the cuda backend fuses the predictor at this size (otherwise: F.linear + stat_topk +
    spark_ffn_sparse): few enough tokens, and x[:r] of a tile of them fits the device's shared memory."""
    if r > MAX_FUSED_R or tokens > MAX_FUSED_TOKENS:
        return False
    shared = int(_cuda.extension().spark_ffn_predictor_shared_bytes(tokens, r))
    return shared <= _cuda.shared_memory_optin(device)


def spark_ffn_fused(x: torch.Tensor, K1: torch.Tensor, K2: torch.Tensor, VT: torch.Tensor, z: float, *,
                    slices: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The predictor and statistical top-k fused in: -> (out (tokens, d_model), gate (tokens, d_ff) float32
    = relu(K1·x[:r] − θ), θ = mean + z·std per token)."""
    K1 = _rows("K1", K1)
    tokens, d_ff, r = x.shape[0], K1.shape[0], K1.shape[1]
    if K1.dtype != x.dtype or K1.device != x.device:
        raise TypeError(f"spark_ffn (cuda): K1 is {K1.dtype} on {K1.device} but x is {x.dtype} on {x.device}")
    # p, then the gate, in place; moments: scratch the predictor kernel fully writes before it is read
    gate = new_output((tokens, d_ff), torch.float32, x.device)
    tiles = int(_cuda.extension().spark_ffn_predictor_tiles(d_ff))
    moments = torch.empty((tokens, tiles, 2), dtype=torch.float32, device=x.device)
    out = spark_ffn_sparse(x, gate, K2, VT, r, slices=slices, fused=(K1, moments, float(z)))
    return out, gate


def spark_ffn_sparse(x: torch.Tensor, gate: torch.Tensor, K2: torch.Tensor, VT: torch.Tensor, r: int, *,
                     slices: int | None = None, fused=None) -> torch.Tensor:
    """-> out (tokens, d_model). `slices` overrides the launch plan (tests); default: slices_for(...).
    `fused` = (K1, moments, z) makes `gate` the float32 predictor workspace of spark_ffn_fused."""
    x, gate, K2, VT = (_rows(n, t) for n, t in (("x", x), ("gate", gate), ("K2", K2), ("VT", VT)))
    if x.dtype not in DTYPES:
        raise TypeError(f"spark_ffn (cuda) takes float32, float16 or bfloat16, got {x.dtype}")
    for name, t in (("gate", gate), ("K2", K2), ("VT", VT)):
        if name == "gate" and fused is not None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"spark_ffn (cuda): {name} is {t.dtype} but x is {x.dtype}; they must share one dtype")
        if t.device != x.device:
            raise ValueError(f"spark_ffn (cuda): {name} is on {t.device} but x is on {x.device}")
    tokens, d_model = x.shape
    d_ff = gate.shape[1]
    if gate.shape[0] != tokens or K2.shape != (d_ff, d_model - r) or VT.shape != (d_ff, d_model):
        raise ValueError(f"spark_ffn (cuda): shapes x {tuple(x.shape)}, gate {tuple(gate.shape)}, K2 "
                         f"{tuple(K2.shape)}, VT {tuple(VT.shape)} do not fit (tokens, d_model), (tokens, d_ff), "
                         f"(d_ff, d_model − r) with r = {r}, (d_ff, d_model)")
    out = new_output((tokens, d_model), x.dtype, x.device)
    if tokens == 0:
        return out
    n = slices_for(tokens, d_ff, x.device) if slices is None else int(slices)
    # Scratch, fully overwritten by the kernel before it is read: no poisoning needed.
    partial = torch.empty((tokens, n, d_model), dtype=torch.float32, device=x.device) if n > 1 else None
    _cuda.extension().spark_ffn_forward(
        x=_cuda.ptr(x), gate=_cuda.ptr(gate), k2=_cuda.ptr(K2), vt=_cuda.ptr(VT), out=_cuda.ptr(out),
        partial=_cuda.ptr(partial), tokens=tokens, d_model=d_model, d_ff=d_ff, r=int(r),
        x_row_stride=x.stride(0), gate_row_stride=gate.stride(0), k2_row_stride=K2.stride(0),
        vt_row_stride=VT.stride(0), out_row_stride=out.stride(0), slices=n, dtype=_cuda.dtype_code(x.dtype),
        device=_cuda.device_index(x), stream=_cuda.stream_of(x),
        **({} if fused is None else dict(k1=_cuda.ptr(fused[0]), moments=_cuda.ptr(fused[1]),
                                         k1_row_stride=fused[0].stride(0), z=fused[2])))
    return out
