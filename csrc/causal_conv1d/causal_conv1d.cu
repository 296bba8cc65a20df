// Depthwise causal conv1d along a scan order (the conv before the scan in a Mamba block), CUDA forward
// and backward.
//
// For batch b, channel d, weight w_d of width K (2..4), steps t in scan order and pos(t) = order_position(t)
// (order.cuh), with x at steps before 0 taken as 0:
//     pre_t = bias_d + Σ_{k<K} w_{d,k}·x[b,d,pos(t − (K−1) + k)],     out[b,d,pos(t)] = silu(pre_t) or pre_t
// Backward, with g_t = ∂L/∂out[pos(t)]·silu'(pre_t)  (silu'(p) = σ(p)·(1 + p·(1 − σ(p))); g_t = dout without
// the activation), and g at steps ≥ L taken as 0:
//     ∂x[pos(s)] = Σ_{j<K} w_{d,K−1−j}·g_{s+j},   ∂w_{d,k} = Σ_{b,t} g_t·x[pos(t − (K−1) + k)],   ∂bias_d = Σ_{b,t} g_t.
//
// One block per (batch·channel row, chunk of C = threads·kItems steps); blocks of one row are adjacent in
// the grid. A block gathers the chunk's x through the order into shared memory once, with its K−1 step
// halo on the left (and, in the backward, K−1 more on the right), and keeps the gathered positions so
// that each order position is computed once per block. Thread i handles local steps i, i + threads, ...
// so that global accesses of consecutive threads are consecutive steps and shared reads are conflict free.
// The backward is one kernel: it recomputes g for the chunk plus its K−1 step right halo (the pre-
// activation needs x up to 2(K−1) steps around the chunk), then writes ∂x and reduces the block's
// contributions to ∂w and ∂bias, which it adds with one float atomic per (channel, tap). Arithmetic is in
// Acc<T> (float, double for fp64); weight and bias are float32 and converted to Acc<T> on load.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "causal_conv1d/causal_conv1d.h"
#include "common/check.h"
#include "common/device_math.cuh"
#include "common/dispatch.cuh"
#include "common/order.cuh"

namespace zigspark {
namespace {

constexpr int kBlockThreads = 128;              // threads per block (fewer for short sequences)
constexpr int kItems = 4;                     // steps per thread
constexpr int kMaxChunk = kBlockThreads * kItems;

template <typename A> __device__ __forceinline__ A sigmoid(A v) { return A(1) / (A(1) + exp(-v)); }

// Threads per block for sequences of `length` steps: a multiple of 32, at most kBlockThreads.
int threads_for_length(int64_t length) {
  int64_t t = (length + kItems - 1) / kItems;
  t = (t + 31) / 32 * 32;
  return int(std::min<int64_t>(std::max<int64_t>(t, 32), kBlockThreads));
}

// ---- forward ---------------------------------------------------------------------------------------

template <typename T, int K, bool SILU>
__global__ void __launch_bounds__(kBlockThreads)
    conv_fwd_kernel(const T* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ bias,
                    T* __restrict__ out, int64_t dim, int64_t chunks, OrderArgs order) {
  using A = Acc<T>;
  constexpr int H = K - 1;                     // left halo
  __shared__ A xs[kMaxChunk + H];              // xs[i]: x at step t0 − H + i
  __shared__ int64_t ps[kMaxChunk];            // ps[i]: pos(t0 + i)
  const int64_t L = order.length;
  const int chunk = int(blockDim.x) * kItems;
  const int64_t row = int64_t(blockIdx.x) / chunks;  // b·dim + d
  const int64_t t0 = (int64_t(blockIdx.x) % chunks) * chunk;
  const int64_t d = row % dim;
  x += row * L;
  out += row * L;

  for (int i = threadIdx.x; i < chunk + H; i += blockDim.x) {
    const int64_t t = t0 - H + i;
    const bool valid = t >= 0 && t < L;
    const int64_t p = valid ? order_position(t, order) : 0;
    xs[i] = valid ? load_acc(x[p]) : A(0);
    if (i >= H) ps[i - H] = p;
  }
  A w[K];
#pragma unroll
  for (int k = 0; k < K; ++k) w[k] = A(weight[d * K + k]);
  const A b0 = bias != nullptr ? A(bias[d]) : A(0);
  __syncthreads();

#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int i = j * int(blockDim.x) + int(threadIdx.x);
    if (t0 + i < L) {
      A pre = b0;
#pragma unroll
      for (int k = 0; k < K; ++k) pre += w[k] * xs[i + k];
      out[ps[i]] = from_acc<T>(SILU ? pre * sigmoid(pre) : pre);
    }
  }
}

// ---- backward --------------------------------------------------------------------------------------

template <typename T, int K, bool SILU>
__global__ void __launch_bounds__(kBlockThreads)
    conv_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ x, const float* __restrict__ weight,
                    const float* __restrict__ bias, T* __restrict__ dx, float* __restrict__ dweight,
                    float* __restrict__ dbias, int64_t dim, int64_t chunks, OrderArgs order) {
  using A = Acc<T>;
  constexpr int H = K - 1;
  __shared__ A xs[kMaxChunk + 2 * H];          // xs[i]: x at step s0 − H + i
  __shared__ A gs[kMaxChunk + H];              // gs[i]: g at step s0 + i (0 beyond L)
  __shared__ int64_t ps[kMaxChunk + H];        // ps[i]: pos(s0 + i)
  const int64_t L = order.length;
  const int chunk = int(blockDim.x) * kItems;
  const int64_t row = int64_t(blockIdx.x) / chunks;
  const int64_t s0 = (int64_t(blockIdx.x) % chunks) * chunk;
  const int64_t d = row % dim;
  x += row * L;
  dout += row * L;
  dx += row * L;

  // Gather x over [s0 − H, s0 + C + H) and dout over [s0, s0 + C + H).
  for (int i = threadIdx.x; i < chunk + 2 * H; i += blockDim.x) {
    const int64_t t = s0 - H + i;
    const bool valid = t >= 0 && t < L;
    const int64_t p = valid ? order_position(t, order) : 0;
    xs[i] = valid ? load_acc(x[p]) : A(0);
    if (i >= H) {
      ps[i - H] = p;
      gs[i - H] = valid ? load_acc(dout[p]) : A(0);
    }
  }
  A w[K];
#pragma unroll
  for (int k = 0; k < K; ++k) w[k] = A(weight[d * K + k]);
  __syncthreads();

  if constexpr (SILU) {  // g_t = dout_t·silu'(pre_t), with pre_t recomputed from the gathered x
    const A b0 = bias != nullptr ? A(bias[d]) : A(0);
    for (int i = threadIdx.x; i < chunk + H; i += blockDim.x) {
      if (s0 + i < L) {
        A pre = b0;
#pragma unroll
        for (int k = 0; k < K; ++k) pre += w[k] * xs[i + k];
        const A sig = sigmoid(pre);
        gs[i] *= sig * (A(1) + pre * (A(1) - sig));
      }
    }
    __syncthreads();
  }

  A dw[K], db = A(0);
#pragma unroll
  for (int k = 0; k < K; ++k) dw[k] = A(0);
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int i = j * int(blockDim.x) + int(threadIdx.x);
    if (s0 + i < L) {
      A acc = A(0);
#pragma unroll
      for (int m = 0; m < K; ++m) acc += w[K - 1 - m] * gs[i + m];
      dx[ps[i]] = from_acc<T>(acc);
      const A g = gs[i];
      db += g;
#pragma unroll
      for (int k = 0; k < K; ++k) dw[k] += g * xs[i + k];
    }
  }
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const A total = block_sum(dw[k]);
    if (threadIdx.x == 0) atomicAdd(dweight + d * K + k, float(total));
  }
  if (dbias != nullptr) {
    const A total = block_sum(db);
    if (threadIdx.x == 0) atomicAdd(dbias + d, float(total));
  }
}

// ---- launch -------------------------------------------------------------------------------------------

template <typename Fn>
void dispatch_width(int width, Fn&& fn) {
  switch (width) {
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    default:
      throw std::invalid_argument("zigspark._C: causal_conv1d supports widths 2..4, got " + std::to_string(width));
  }
}

template <typename Fn>
void dispatch_bool(bool value, Fn&& fn) {
  if (value) fn(std::true_type{});
  else fn(std::false_type{});
}

struct Grid {
  int threads;
  int64_t chunks;
  unsigned blocks;
};

// Validates the shape and order; returns false when there is nothing to do.
bool plan(int64_t batch, int64_t dim, int64_t length, int width, const OrderArgs& order, Grid& grid) {
  if (width < 2 || width > 4)
    throw std::invalid_argument("zigspark._C: causal_conv1d supports widths 2..4, got " + std::to_string(width));
  if (batch < 0 || dim < 0 || length < 0) throw std::invalid_argument("zigspark._C: causal_conv1d: negative size");
  if (order.length != length)
    throw std::invalid_argument("zigspark._C: causal_conv1d: order length differs from the sequence length");
  if (order.kind == kIndex && order.index == nullptr)
    throw std::invalid_argument("zigspark._C: causal_conv1d: an index order needs order_index");
  if (batch == 0 || dim == 0 || length == 0) return false;
  grid.threads = threads_for_length(length);
  grid.chunks = (length + int64_t(grid.threads) * kItems - 1) / (int64_t(grid.threads) * kItems);
  const int64_t rows = batch * dim;
  if (rows > 0x7fffffff / grid.chunks)
    throw std::invalid_argument("zigspark._C: causal_conv1d: batch·dim·ceil(L/" +
                                std::to_string(grid.threads * kItems) + ") exceeds 2^31−1 blocks");
  grid.blocks = unsigned(rows * grid.chunks);
  return true;
}

template <typename T>
void forward_typed(const CausalConv1dForwardArgs& a, const Grid& g) {
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  const T* x = reinterpret_cast<const T*>(a.x);
  const float* weight = reinterpret_cast<const float*>(a.weight);
  const float* bias = reinterpret_cast<const float*>(a.bias);
  T* out = reinterpret_cast<T*>(a.out);
  dispatch_width(a.width, [&](auto width) {
    dispatch_bool(a.silu, [&](auto silu) {
      conv_fwd_kernel<T, decltype(width)::value, decltype(silu)::value><<<g.blocks, g.threads, 0, stream>>>(
          x, weight, bias, out, a.dim, g.chunks, a.order);
    });
  });
  check_launch("causal_conv1d forward kernel launch");
}

template <typename T>
void backward_typed(const CausalConv1dBackwardArgs& a, const Grid& g) {
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  const T* dout = reinterpret_cast<const T*>(a.dout);
  const T* x = reinterpret_cast<const T*>(a.x);
  const float* weight = reinterpret_cast<const float*>(a.weight);
  const float* bias = reinterpret_cast<const float*>(a.bias);
  T* dx = reinterpret_cast<T*>(a.dx);
  float* dweight = reinterpret_cast<float*>(a.dweight);
  float* dbias = reinterpret_cast<float*>(a.dbias);
  dispatch_width(a.width, [&](auto width) {
    dispatch_bool(a.silu, [&](auto silu) {
      conv_bwd_kernel<T, decltype(width)::value, decltype(silu)::value><<<g.blocks, g.threads, 0, stream>>>(
          dout, x, weight, bias, dx, dweight, dbias, a.dim, g.chunks, a.order);
    });
  });
  check_launch("causal_conv1d backward kernel launch");
}

}  // namespace

void causal_conv1d_forward(const CausalConv1dForwardArgs& args) {
  Grid grid;
  if (!plan(args.batch, args.dim, args.length, args.width, args.order, grid)) return;
  DeviceGuard guard(args.device);
  dispatch_float_types(args.dtype, [&](auto tag) { forward_typed<decltype(tag)>(args, grid); });
}

void causal_conv1d_backward(const CausalConv1dBackwardArgs& args) {
  Grid grid;
  if (!plan(args.batch, args.dim, args.length, args.width, args.order, grid)) return;
  DeviceGuard guard(args.device);
  dispatch_float_types(args.dtype, [&](auto tag) { backward_typed<decltype(tag)>(args, grid); });
}

}  // namespace zigspark
