// Host entry points of the Spark FFN sparse-inference kernels. Pure C++ (no CUDA, no torch types).
#pragma once

#include <cstdint>

namespace zigspark {

// x (tokens, d_model), gate (tokens, d_ff) = stat_topk(K1·x[:r]) (0 for inactive neurons), K2 (d_ff, d_model − r),
// vt = Vᵀ (d_ff, d_model), out (tokens, d_model): one dtype (0 float32, 1 float16, 2 bfloat16), last dimension
// contiguous, row strides in elements. `slices` ≥ 1 blocks share the neurons of one token; for slices > 1,
// `partial` is a float32 (tokens, slices, d_model) contiguous workspace (not read, fully overwritten), else 0.
struct SparkFfnForwardArgs {
  uintptr_t x = 0, gate = 0, k2 = 0, vt = 0, out = 0, partial = 0;
  int64_t tokens = 0, d_model = 0, d_ff = 0, r = 0;
  int64_t x_row_stride = 0, gate_row_stride = 0, k2_row_stride = 0, vt_row_stride = 0, out_row_stride = 0;
  int64_t slices = 1;
  int dtype = 0;
  int device = 0;
  uintptr_t stream = 0;  // cudaStream_t
};

// The number of neuron slices per token the forward is meant to run with, for a GPU of `multiprocessors`
// SMs (a pure function of its arguments: it touches no device).
int64_t spark_ffn_slices(int64_t tokens, int64_t d_ff, int64_t multiprocessors);

void spark_ffn_forward(const SparkFfnForwardArgs& args);

}  // namespace zigspark
