// Loads, stores and block-wide reductions shared by the kernels. Statistics accumulate in Acc<T>:
// float for fp32/fp16/bf16 inputs, double for fp64.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace zigspark {

template <typename T> struct AccT { using type = float; };
template <> struct AccT<double> { using type = double; };
template <typename T> using Acc = typename AccT<T>::type;

__device__ __forceinline__ float load_acc(float v) { return v; }
__device__ __forceinline__ double load_acc(double v) { return v; }
__device__ __forceinline__ float load_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float load_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(Acc<T> v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC contiguous elements moved with one 16-byte (or narrower) memory instruction.
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };
template <int VEC> struct alignas(VEC) MaskPack { bool v[VEC]; };

template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; every thread gets the result. blockDim.x must be a multiple of 32.
template <typename A> __device__ A block_sum(A v) {
  __shared__ A partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // partial[] may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < warps ? partial[lane] : A(0);
  return warp_sum(v);
}

// Welford state of a set of values: count, mean, and sum of squared deviations (M2).
template <typename A> struct Welford {
  A n = 0, mean = 0, m2 = 0;
  __device__ __forceinline__ void add(A x) {
    n += A(1);
    A delta = x - mean;
    mean += delta / n;
    m2 += delta * (x - mean);
  }
  // Chan et al.'s pairwise merge: exact for any split of the data, so the order of the reduction
  // does not change the variance beyond rounding.
  __device__ __forceinline__ void merge(A nb, A meanb, A m2b) {
    A total = n + nb;
    if (total == A(0)) return;
    A delta = meanb - mean;
    A wb = nb / total;
    mean += delta * wb;
    m2 += m2b + delta * delta * n * wb;
    n = total;
  }
};

template <typename A> __device__ Welford<A> block_welford(Welford<A> w) {
  __shared__ A sn[32], smean[32], sm2[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    w.merge(__shfl_xor_sync(0xffffffffu, w.n, offset), __shfl_xor_sync(0xffffffffu, w.mean, offset),
            __shfl_xor_sync(0xffffffffu, w.m2, offset));
  }
  __syncthreads();
  if (lane == 0) { sn[warp] = w.n; smean[warp] = w.mean; sm2[warp] = w.m2; }
  __syncthreads();
  Welford<A> r;
  if (lane < warps) { r.n = sn[lane]; r.mean = smean[lane]; r.m2 = sm2[lane]; }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    r.merge(__shfl_xor_sync(0xffffffffu, r.n, offset), __shfl_xor_sync(0xffffffffu, r.mean, offset),
            __shfl_xor_sync(0xffffffffu, r.m2, offset));
  }
  // The merge is not commutative bit for bit, so lanes may differ in the last ulp: take lane 0's
  // result everywhere, so that every thread thresholds against the very same statistics.
  r.n = __shfl_sync(0xffffffffu, r.n, 0);
  r.mean = __shfl_sync(0xffffffffu, r.mean, 0);
  r.m2 = __shfl_sync(0xffffffffu, r.m2, 0);
  return r;
}

}  // namespace zigspark
