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
  // Fused predictor (k1 != 0): the forward first writes p = K1·x[:r] (k1: (d_ff, r), row stride k1_row_stride)
  // into `gate`, which is then a float32 (tokens, d_ff) workspace (gate_row_stride in floats), and each token's
  // per-tile (mean, M2) of p into `moments`, float32 (tokens, spark_ffn_predictor_tiles(d_ff), 2) contiguous;
  // the sparse kernel thresholds p at θ = mean + z·std (population std) and leaves the gate relu(p − θ) in
  // `gate`. With k1 == 0, `gate` is the caller's gate in the dtype of x.
  uintptr_t k1 = 0, moments = 0;
  int64_t k1_row_stride = 0;
  double z = 0.0;
  int dtype = 0;
  int device = 0;
  uintptr_t stream = 0;  // cudaStream_t
};

// The number of neuron slices per token the forward is meant to run with, for a GPU of `multiprocessors`
// SMs (a pure function of its arguments: it touches no device).
int64_t spark_ffn_slices(int64_t tokens, int64_t d_ff, int64_t multiprocessors);

// Predictor tiles per token of the fused path (the middle extent of its `moments` workspace).
int64_t spark_ffn_predictor_tiles(int64_t d_ff);

// Shared memory per block (dynamic x tile + static p tile) of the fused predictor for `tokens` tokens and width r.
int64_t spark_ffn_predictor_shared_bytes(int64_t tokens, int64_t r);

void spark_ffn_forward(const SparkFfnForwardArgs& args);

}  // namespace zigspark
