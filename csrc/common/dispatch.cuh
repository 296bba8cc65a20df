// Runtime dtype code -> C++ element type, for kernels templated on the element type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

#include "common/dtype.h"

namespace zigspark {

// Calls fn(T{}) with T the element type named by `dtype`.
template <typename Fn>
void dispatch_float_types(int dtype, Fn&& fn) {
  switch (dtype) {
    case int(DType::Float32): fn(float{}); break;
    case int(DType::Float16): fn(__half{}); break;
    case int(DType::BFloat16): fn(__nv_bfloat16{}); break;
    case int(DType::Float64): fn(double{}); break;
    default:
      throw std::invalid_argument(std::string("zigspark._C: unsupported dtype code ") + std::to_string(dtype) +
                                  " (expected 0=float32, 1=float16, 2=bfloat16, 3=float64)");
  }
}

}  // namespace zigspark
