// Block-wide scans of the affine maps h -> a·h + b that a linear recurrence is made of.
//
// Composing "first (a1, b1), then (a2, b2)" gives (a1·a2, a2·b1 + b2). A forward scan gives each thread
// the composition of all maps of the threads before it (exclusive prefix); a reverse scan gives the
// composition of the maps of the threads after it, applied from the last thread backwards (exclusive
// suffix), which is what an adjoint recurrence running from the end of the sequence needs.
#pragma once

namespace zigspark {

struct AffineMap {
  float a, b;
};

__device__ __forceinline__ AffineMap affine_identity() { return {1.f, 0.f}; }

// first `x`, then `y`
__device__ __forceinline__ AffineMap affine_then(AffineMap x, AffineMap y) { return {x.a * y.a, y.a * x.b + y.b}; }

// Exclusive scan over the threads of the block (blockDim.x = kThreads, a multiple of 32, <= 1024).
// REVERSE = false: result = map(thread 0) then ... then map(thread tid - 1).
// REVERSE = true:  result = map(last thread) then ... then map(thread tid + 1).
template <int kThreads, bool REVERSE>
__device__ AffineMap block_exclusive_scan(AffineMap m) {
  constexpr int kWarps = kThreads / 32;
  __shared__ AffineMap warp_total[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  // inclusive scan inside the warp, in the scan direction
  AffineMap inc = m;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    AffineMap other;
    other.a = REVERSE ? __shfl_down_sync(0xffffffffu, inc.a, offset) : __shfl_up_sync(0xffffffffu, inc.a, offset);
    other.b = REVERSE ? __shfl_down_sync(0xffffffffu, inc.b, offset) : __shfl_up_sync(0xffffffffu, inc.b, offset);
    const bool has = REVERSE ? lane + offset < 32 : lane >= offset;
    if (has) inc = affine_then(other, inc);  // `other` covers threads earlier in the scan direction
  }
  // exclusive inside the warp
  AffineMap exc;
  exc.a = REVERSE ? __shfl_down_sync(0xffffffffu, inc.a, 1) : __shfl_up_sync(0xffffffffu, inc.a, 1);
  exc.b = REVERSE ? __shfl_down_sync(0xffffffffu, inc.b, 1) : __shfl_up_sync(0xffffffffu, inc.b, 1);
  if (REVERSE ? lane == 31 : lane == 0) exc = affine_identity();
  // totals of the warps, combined in the scan direction
  __syncthreads();  // warp_total may still be read by a previous call
  if (REVERSE ? lane == 0 : lane == 31) warp_total[warp] = inc;
  __syncthreads();
  AffineMap before = affine_identity();
  if (REVERSE) {
    for (int w2 = kWarps - 1; w2 > warp; --w2) before = affine_then(before, warp_total[w2]);
  } else {
    for (int w2 = 0; w2 < warp; ++w2) before = affine_then(before, warp_total[w2]);
  }
  return affine_then(before, exc);
}

}  // namespace zigspark
