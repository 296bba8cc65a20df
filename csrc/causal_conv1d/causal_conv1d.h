// Host entry points of the depthwise causal conv1d kernels. Pure C++ (no CUDA, no torch types).
#pragma once

#include <cstdint>

#include "common/order.cuh"

namespace zigspark {

// x, out: (batch, dim, length) contiguous, dtype code `dtype`; weight (dim, width) and bias (dim,) float32
// contiguous, bias 0 when absent; 2 <= width <= 4.
struct CausalConv1dForwardArgs {
  uintptr_t x = 0, weight = 0, bias = 0, out = 0;
  int64_t batch = 0, dim = 0, length = 0;
  int width = 0;
  int dtype = 0;     // DType code of x and out
  bool silu = false;
  OrderArgs order;
  int device = 0;
  uintptr_t stream = 0;  // cudaStream_t
};

// dout, x, dx: (batch, dim, length) in `dtype`; weight, bias as in the forward. dweight (dim, width) and
// dbias (dim,) are float32, zero-filled by the caller (accumulated with atomics); dbias 0 when bias is.
struct CausalConv1dBackwardArgs {
  uintptr_t dout = 0, x = 0, weight = 0, bias = 0;
  uintptr_t dx = 0, dweight = 0, dbias = 0;
  int64_t batch = 0, dim = 0, length = 0;
  int width = 0;
  int dtype = 0;
  bool silu = false;
  OrderArgs order;
  int device = 0;
  uintptr_t stream = 0;
};

void causal_conv1d_forward(const CausalConv1dForwardArgs& args);
void causal_conv1d_backward(const CausalConv1dBackwardArgs& args);

}  // namespace zigspark
