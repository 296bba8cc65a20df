// Host entry points of the statistical top-k kernels. Pure C++: no CUDA and no torch types, so the
// pybind11 binding stays a thin translation of Python integers into these structs.
#pragma once

#include <cstdint>

namespace zigspark {

struct StatTopkForwardArgs {
  uintptr_t x, y, mask, mean, std;  // device pointers; mask may be 0 (not requested)
  int64_t rows, d;                  // rows of length d, last dimension contiguous
  int64_t x_row_stride, y_row_stride, mask_row_stride;  // in elements
  int dtype;                        // DType code of x and y; mean/std are float64 for float64, else float32
  double z;                         // Φ⁻¹(1 − k/d)
  int device;
  uintptr_t stream;                 // cudaStream_t
};

struct StatTopkBackwardArgs {
  uintptr_t grad_y, x, mean, std, grad_x;
  int64_t rows, d;
  int64_t grad_y_row_stride, x_row_stride, grad_x_row_stride;
  int dtype;
  double z;
  int device;
  uintptr_t stream;
};

void stat_topk_forward(const StatTopkForwardArgs& args);
void stat_topk_backward(const StatTopkBackwardArgs& args);

}  // namespace zigspark
