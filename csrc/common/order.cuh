// Scan orders computed on the fly (the closed forms of python/zigspark/orders.py): step t -> raster
// position. Kernels read and write tokens at order_position(t) and never need a permuted copy.
#pragma once

#include <cstdint>

namespace zigspark {

// Mirrors zigspark.orders.KIND_CODES plus the two launch-only kinds of triton_kernels/orders.py.
enum OrderKind : int { kRaster = 0, kZigzag = 1, kTemporal = 2, kIndex = 3, kIdentity = 4 };

struct OrderArgs {
  int kind = kIdentity;
  int64_t frames = 1, h = 1, w = 1;  // grid; for kIndex/kIdentity only the length matters
  int path = 0;                      // zigzag path 0..7
  int reverse = 0;                   // raster: last first; temporal: frames backward
  const int64_t* index = nullptr;    // kIndex: the permutation (device pointer)
  int64_t length = 0;                // L
};

__host__ __device__ inline int64_t order_position(int64_t t, const OrderArgs& o) {
  switch (o.kind) {
    case kIndex:
      return o.index[t];
    case kRaster:
      return o.reverse ? o.length - 1 - t : t;
    case kZigzag: {
      const int64_t hw = o.h * o.w, frame = t / hw, s = t % hw;
      int64_t r, c;
      if (o.path % 2 == 1) {  // column-wise snake
        c = s / o.h;
        r = s % o.h;
        if (c % 2 == 1) r = o.h - 1 - r;
      } else {                // row-wise snake
        r = s / o.w;
        c = s % o.w;
        if (r % 2 == 1) c = o.w - 1 - c;
      }
      if (o.path >= 4) r = o.h - 1 - r;             // starts at a bottom corner
      if ((o.path / 2) % 2 == 1) c = o.w - 1 - c;   // starts at a right corner
      return frame * hw + r * o.w + c;
    }
    case kTemporal: {
      const int64_t s = t / o.frames;
      int64_t f = t % o.frames;
      if (o.reverse) f = o.frames - 1 - f;
      return f * o.h * o.w + s;
    }
    default:
      return t;
  }
}

}  // namespace zigspark
