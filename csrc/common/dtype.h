// Dtype codes shared by the binding and the kernels; python/zigspark/_cuda.py mirrors them.
#pragma once

namespace zigspark {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

inline const char* dtype_name(int code) {
  switch (code) {
    case 0: return "float32";
    case 1: return "float16";
    case 2: return "bfloat16";
    case 3: return "float64";
    default: return "unknown";
  }
}

}  // namespace zigspark
