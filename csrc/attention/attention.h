// Host entry point of the flash attention forward kernels. Pure C++ (no CUDA, no torch types).
#pragma once

#include <cstdint>

namespace zigspark {

// q (batch, seqlen_q, heads, head_dim), k and v (batch, seqlen_k, kv_heads, head_dim), out like q: all in
// dtype `dtype` (0 float32, 1 float16, 2 bfloat16; float64 is rejected), last dimension contiguous, the
// other strides arbitrary (in elements). lse (batch, heads, seqlen_q) float32 contiguous, natural log.
// heads must be a multiple of kv_heads; 1 <= head_dim <= 256. v = out = 0 computes lse only.
struct AttentionForwardArgs {
  uintptr_t q = 0, k = 0, v = 0, out = 0, lse = 0;
  int64_t batch = 0, seqlen_q = 0, seqlen_k = 0, heads = 0, kv_heads = 0, head_dim = 0;
  int64_t q_stride_b = 0, q_stride_s = 0, q_stride_h = 0;
  int64_t k_stride_b = 0, k_stride_s = 0, k_stride_h = 0;
  int64_t v_stride_b = 0, v_stride_s = 0, v_stride_h = 0;
  int64_t out_stride_b = 0, out_stride_s = 0, out_stride_h = 0;
  float scale = 1.0f;
  bool causal = false;  // key j visible to query i iff j <= i + seqlen_k - seqlen_q
  int dtype = 0;        // DType code of q, k, v and out
  int device = 0;
  uintptr_t stream = 0;  // cudaStream_t
};

void attention_forward(const AttentionForwardArgs& args);

}  // namespace zigspark
