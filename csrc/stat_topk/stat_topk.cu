// Statistical top-k (Spark Transformer, arXiv 2506.06644), CUDA forward and backward.
//
// For a row x of length d and a target of k survivors, with z = Φ⁻¹(1 − k/d):
//     μ = (1/d) Σ x_i,   σ = sqrt((1/d) Σ (x_i − μ)²),   θ = μ + z·σ,
//     y_i = relu(x_i − θ),   m_i = [x_i > θ].
// Backward, with g = ∂L/∂y and S = Σ_j g_j m_j (θ depends on every x_i through μ and σ):
//     ∂θ/∂x_i = 1/d + z·(x_i − μ)/(d·σ)
//     ∂L/∂x_i = g_i m_i − S·∂θ/∂x_i          (the σ term is dropped when σ = 0, where S = 0 too).
//
// One block per row. Rows of up to RESIDENT_ITEMS·1024 elements are loaded once into registers with
// 16-byte vector loads, reduced (two-pass mean and variance, exact), and written: x is read once and y
// written once. Longer or unaligned rows stream: one pass for Welford statistics, one to write; the
// second read of the row usually hits L1/L2 since the same block just read it.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/check.h"
#include "common/device_math.cuh"
#include "common/dispatch.cuh"
#include "common/row_launch.cuh"
#include "stat_topk/stat_topk.h"

namespace zigspark {
namespace {

constexpr int kForwardResidentItems = 16;   // values per thread kept in registers (forward)
constexpr int kBackwardResidentItems = 8;   // backward keeps x and g: half as many

template <typename A> __device__ __forceinline__ A threshold(A mean, A sigma, A z) { return fma(z, sigma, mean); }
template <typename A> __device__ __forceinline__ A inverse_std(A sigma) { return sigma > A(0) ? A(1) / sigma : A(0); }

template <typename T, int VEC> __device__ __forceinline__ void load_pack(const T* p, Acc<T>* out) {
  Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = load_acc(pk.v[j]);
}

template <typename T, int VEC> __device__ __forceinline__ void store_pack(T* p, const Acc<T>* in) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int j = 0; j < VEC; ++j) pk.v[j] = from_acc<T>(in[j]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

template <typename T, int VEC>
__device__ __forceinline__ void write_output(const Acc<T>* v, Acc<T> theta, T* y, bool* mask) {
  using A = Acc<T>;
  A out[VEC];
  MaskPack<VEC> mp;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const A diff = v[j] - theta;
    out[j] = (diff > A(0) || diff != diff) ? diff : A(0);  // NaN in the row stays NaN, as in the reference
    mp.v[j] = v[j] > theta;
  }
  store_pack<T, VEC>(y, out);
  if (mask != nullptr) *reinterpret_cast<MaskPack<VEC>*>(mask) = mp;
}

// ---- forward ---------------------------------------------------------------------------------------

template <typename T, int VEC, int CHUNKS>
__global__ void __launch_bounds__(kMaxThreads)
    fwd_resident(const T* __restrict__ x, T* __restrict__ y, bool* __restrict__ mask, Acc<T>* __restrict__ mean_out,
                 Acc<T>* __restrict__ std_out, int64_t d, int64_t sx, int64_t sy, int64_t sm, Acc<T> z) {
  using A = Acc<T>;
  const int64_t row = blockIdx.x;
  x += row * sx;
  y += row * sy;
  if (mask != nullptr) mask += row * sm;

  A v[CHUNKS][VEC];
  A sum = 0;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t base = (int64_t(c) * blockDim.x + threadIdx.x) * VEC;
    if (base < d) {
      load_pack<T, VEC>(x + base, v[c]);
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum += v[c][j];
    }
  }
  const A mean = block_sum(sum) / A(d);
  A sq = 0;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t base = (int64_t(c) * blockDim.x + threadIdx.x) * VEC;
    if (base < d) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) sq += (v[c][j] - mean) * (v[c][j] - mean);
    }
  }
  const A sigma = sqrt(block_sum(sq) / A(d));
  const A theta = threshold(mean, sigma, z);
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t base = (int64_t(c) * blockDim.x + threadIdx.x) * VEC;
    if (base < d) write_output<T, VEC>(v[c], theta, y + base, mask ? mask + base : nullptr);
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    std_out[row] = sigma;
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    fwd_streaming(const T* __restrict__ x, T* __restrict__ y, bool* __restrict__ mask, Acc<T>* __restrict__ mean_out,
                  Acc<T>* __restrict__ std_out, int64_t d, int64_t sx, int64_t sy, int64_t sm, Acc<T> z) {
  using A = Acc<T>;
  const int64_t row = blockIdx.x;
  x += row * sx;
  y += row * sy;
  if (mask != nullptr) mask += row * sm;

  Welford<A> w;
  for (int64_t base = int64_t(threadIdx.x) * VEC; base < d; base += int64_t(blockDim.x) * VEC) {
    A v[VEC];
    load_pack<T, VEC>(x + base, v);
    // Exact statistics of the pack, then one merge: one division per pack instead of per element.
    A pack_mean = 0, pack_m2 = 0;
#pragma unroll
    for (int j = 0; j < VEC; ++j) pack_mean += v[j];
    pack_mean /= A(VEC);
#pragma unroll
    for (int j = 0; j < VEC; ++j) pack_m2 += (v[j] - pack_mean) * (v[j] - pack_mean);
    w.merge(A(VEC), pack_mean, pack_m2);
  }
  w = block_welford(w);
  const A mean = w.mean;
  const A sigma = sqrt(max(w.m2 / A(d), A(0)));
  const A theta = threshold(mean, sigma, z);
  for (int64_t base = int64_t(threadIdx.x) * VEC; base < d; base += int64_t(blockDim.x) * VEC) {
    A v[VEC];
    load_pack<T, VEC>(x + base, v);
    write_output<T, VEC>(v, theta, y + base, mask ? mask + base : nullptr);
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    std_out[row] = sigma;
  }
}

// ---- backward --------------------------------------------------------------------------------------

template <typename T, int VEC>
__device__ __forceinline__ void write_grad(const Acc<T>* xv, const Acc<T>* gv, Acc<T> theta, Acc<T> mean,
                                           Acc<T> s_over_d, Acc<T> z_inv_std, T* dx) {
  using A = Acc<T>;
  A out[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const A gm = xv[j] > theta ? gv[j] : A(0);
    out[j] = gm - s_over_d * (A(1) + z_inv_std * (xv[j] - mean));
  }
  store_pack<T, VEC>(dx, out);
}

template <typename T, int VEC, int CHUNKS>
__global__ void __launch_bounds__(kMaxThreads)
    bwd_resident(const T* __restrict__ g, const T* __restrict__ x, const Acc<T>* __restrict__ mean_in,
                 const Acc<T>* __restrict__ std_in, T* __restrict__ dx, int64_t d, int64_t sg, int64_t sx,
                 int64_t sdx, Acc<T> z) {
  using A = Acc<T>;
  const int64_t row = blockIdx.x;
  g += row * sg;
  x += row * sx;
  dx += row * sdx;
  const A mean = mean_in[row], sigma = std_in[row];
  const A theta = threshold(mean, sigma, z);

  A xv[CHUNKS][VEC], gv[CHUNKS][VEC];
  A s = 0;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t base = (int64_t(c) * blockDim.x + threadIdx.x) * VEC;
    if (base < d) {
      load_pack<T, VEC>(x + base, xv[c]);
      load_pack<T, VEC>(g + base, gv[c]);
#pragma unroll
      for (int j = 0; j < VEC; ++j) s += xv[c][j] > theta ? gv[c][j] : A(0);
    }
  }
  const A s_over_d = block_sum(s) / A(d);
  const A z_inv_std = z * inverse_std(sigma);
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t base = (int64_t(c) * blockDim.x + threadIdx.x) * VEC;
    if (base < d) write_grad<T, VEC>(xv[c], gv[c], theta, mean, s_over_d, z_inv_std, dx + base);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    bwd_streaming(const T* __restrict__ g, const T* __restrict__ x, const Acc<T>* __restrict__ mean_in,
                  const Acc<T>* __restrict__ std_in, T* __restrict__ dx, int64_t d, int64_t sg, int64_t sx,
                  int64_t sdx, Acc<T> z) {
  using A = Acc<T>;
  const int64_t row = blockIdx.x;
  g += row * sg;
  x += row * sx;
  dx += row * sdx;
  const A mean = mean_in[row], sigma = std_in[row];
  const A theta = threshold(mean, sigma, z);
  A s = 0;
  for (int64_t base = int64_t(threadIdx.x) * VEC; base < d; base += int64_t(blockDim.x) * VEC) {
    A xv[VEC], gv[VEC];
    load_pack<T, VEC>(x + base, xv);
    load_pack<T, VEC>(g + base, gv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) s += xv[j] > theta ? gv[j] : A(0);
  }
  const A s_over_d = block_sum(s) / A(d);
  const A z_inv_std = z * inverse_std(sigma);
  for (int64_t base = int64_t(threadIdx.x) * VEC; base < d; base += int64_t(blockDim.x) * VEC) {
    A xv[VEC], gv[VEC];
    load_pack<T, VEC>(x + base, xv);
    load_pack<T, VEC>(g + base, gv);
    write_grad<T, VEC>(xv, gv, theta, mean, s_over_d, z_inv_std, dx + base);
  }
}

// ---- launch -------------------------------------------------------------------------------------------

template <typename T>
void forward_typed(const StatTopkForwardArgs& a) {
  using A = Acc<T>;
  constexpr int kVec = 16 / sizeof(T);
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  const T* x = reinterpret_cast<const T*>(a.x);
  T* y = reinterpret_cast<T*>(a.y);
  bool* mask = reinterpret_cast<bool*>(a.mask);
  A* mean = reinterpret_cast<A*>(a.mean);
  A* sigma = reinterpret_cast<A*>(a.std);
  const A z = A(a.z);
  const dim3 grid(unsigned(a.rows));
  const bool vectorizable =
      rows_vectorizable<kVec>(a.d, {{x, a.x_row_stride}, {y, a.y_row_stride}}, mask, a.mask_row_stride);
  launch_rows<kVec, kForwardResidentItems>(
      a.d, vectorizable,
      [&](auto chunks, int threads) {
        fwd_resident<T, kVec, decltype(chunks)::value><<<grid, threads, 0, stream>>>(
            x, y, mask, mean, sigma, a.d, a.x_row_stride, a.y_row_stride, a.mask_row_stride, z);
      },
      [&](auto vec, int threads) {
        fwd_streaming<T, decltype(vec)::value><<<grid, threads, 0, stream>>>(
            x, y, mask, mean, sigma, a.d, a.x_row_stride, a.y_row_stride, a.mask_row_stride, z);
      });
  check_launch("stat_topk forward kernel launch");
}

template <typename T>
void backward_typed(const StatTopkBackwardArgs& a) {
  using A = Acc<T>;
  constexpr int kVec = 16 / sizeof(T);
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  const T* g = reinterpret_cast<const T*>(a.grad_y);
  const T* x = reinterpret_cast<const T*>(a.x);
  T* dx = reinterpret_cast<T*>(a.grad_x);
  const A* mean = reinterpret_cast<const A*>(a.mean);
  const A* sigma = reinterpret_cast<const A*>(a.std);
  const A z = A(a.z);
  const dim3 grid(unsigned(a.rows));
  const bool vectorizable = rows_vectorizable<kVec>(
      a.d, {{g, a.grad_y_row_stride}, {x, a.x_row_stride}, {dx, a.grad_x_row_stride}});
  launch_rows<kVec, kBackwardResidentItems>(
      a.d, vectorizable,
      [&](auto chunks, int threads) {
        bwd_resident<T, kVec, decltype(chunks)::value><<<grid, threads, 0, stream>>>(
            g, x, mean, sigma, dx, a.d, a.grad_y_row_stride, a.x_row_stride, a.grad_x_row_stride, z);
      },
      [&](auto vec, int threads) {
        bwd_streaming<T, decltype(vec)::value><<<grid, threads, 0, stream>>>(
            g, x, mean, sigma, dx, a.d, a.grad_y_row_stride, a.x_row_stride, a.grad_x_row_stride, z);
      });
  check_launch("stat_topk backward kernel launch");
}

}  // namespace

void stat_topk_forward(const StatTopkForwardArgs& args) {
  if (args.rows == 0 || args.d == 0) return;
  if (args.rows > 0x7fffffff) throw std::invalid_argument("zigspark._C: stat_topk supports at most 2^31-1 rows");
  DeviceGuard guard(args.device);
  dispatch_float_types(args.dtype, [&](auto tag) { forward_typed<decltype(tag)>(args); });
}

void stat_topk_backward(const StatTopkBackwardArgs& args) {
  if (args.rows == 0 || args.d == 0) return;
  if (args.rows > 0x7fffffff) throw std::invalid_argument("zigspark._C: stat_topk supports at most 2^31-1 rows");
  DeviceGuard guard(args.device);
  dispatch_float_types(args.dtype, [&](auto tag) { backward_typed<decltype(tag)>(args); });
}

}  // namespace zigspark
