// Selective scan along a scan order (Mamba; ZigMa's zigzag paths), CUDA forward and backward.
//
// Per batch b, channel d and state n, steps t in scan order, pos(t) = order_position(t) (order.cuh):
//     Δ_t = softplus(δ[pos] + bias) (or δ[pos] + bias),   a_t = exp(Δ_t·A_n),   b_t = Δ_t·B_n(t)·u[pos]
//     h_t = a_t·h_{t−1} + b_t,    y[pos] = (Σ_n C_n(t)·h_t + D·u[pos])·silu(z[pos])
// Backward, with g the gradient of y before the gate multiplies it back in, and the adjoint state
//     ∂h_t = g_t·C_n(t) + a_{t+1}·∂h_{t+1}     (∂h of the step after the last is ∂last_state)
//     ∂Δ_t += ∂h_t·a_t·h_{t−1}·A_n + ∂h_t·B_n(t)·u_t,   ∂A_n += ∂h_t·a_t·h_{t−1}·Δ_t
//     ∂u_t += ∂h_t·B_n(t)·Δ_t,   ∂B_n(t) = ∂h_t·Δ_t·u_t,   ∂C_n(t) = g_t·h_t
//
// One block of kThreads per (channel, batch). The sequence is walked in chunks of kThreads·kItems steps;
// each thread owns kItems consecutive steps. For every state n the chunk's recurrence is a block-wide scan
// of affine maps (pair_scan.cuh) seeded with the state carried from the previous chunk; the state entering
// each chunk is saved so that the backward recomputes a chunk from it instead of storing every state.
// Shared B/C (per step or grouped) gradients are summed over channels with float atomics.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/check.h"
#include "common/device_math.cuh"
#include "common/dispatch.cuh"
#include "common/order.cuh"
#include "selective_scan/pair_scan.cuh"
#include "selective_scan/selective_scan.h"

namespace zigspark {
namespace {

constexpr int kThreads = 128;
constexpr int kItems = 4;
constexpr int kChunk = kThreads * kItems;
constexpr int kMaxN = 256;

enum BcMode : int { kConstant = 0, kVariable = 1, kGrouped = 2 };

__device__ __forceinline__ float softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// Offset of B or C for (batch b, channel d, state n) at raster position pos.
template <int MODE>
__device__ __forceinline__ int64_t bc_offset(const SelectiveScanShape& s, int64_t b, int64_t d, int n, int64_t pos) {
  if (MODE == kConstant) return d * s.dstate + n;
  if (MODE == kVariable) return (b * s.dstate + n) * s.length + pos;
  const int64_t g = d / (s.dim / s.groups);
  return ((b * s.groups + g) * s.dstate + n) * s.length + pos;
}

template <typename T>
struct ChunkInputs {
  int64_t pos[kItems];
  float u[kItems], delta[kItems], pre[kItems], z[kItems];
  bool valid[kItems];
};

// Loads this thread's kItems steps of u, δ (and z) through the order; padded steps get Δ = 0, u = 0,
// which makes them the identity map (a = 1, b = 0).
template <typename T>
__device__ void load_chunk(const SelectiveScanParams& p, int64_t b, int64_t d, int64_t t0, bool has_z,
                           ChunkInputs<T>& in) {
  const SelectiveScanShape& s = p.shape;
  const int64_t row = (b * s.dim + d) * s.length;
  const float bias = p.delta_bias ? reinterpret_cast<const float*>(p.delta_bias)[d] : 0.f;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int64_t t = t0 + i;
    in.valid[i] = t < s.length;
    in.pos[i] = in.valid[i] ? order_position(t, p.order) : 0;
    in.u[i] = in.valid[i] ? load_acc(reinterpret_cast<const T*>(p.u)[row + in.pos[i]]) : 0.f;
    const float raw = in.valid[i] ? load_acc(reinterpret_cast<const T*>(p.delta)[row + in.pos[i]]) : 0.f;
    in.pre[i] = raw + bias;
    in.delta[i] = in.valid[i] ? (p.delta_softplus ? softplus(in.pre[i]) : in.pre[i]) : 0.f;
    in.z[i] = (has_z && in.valid[i]) ? load_acc(reinterpret_cast<const T*>(p.z)[row + in.pos[i]]) : 0.f;
  }
}

template <typename T, int B_MODE, int C_MODE>
__device__ __forceinline__ void load_bc(const SelectiveScanParams& p, int64_t b, int64_t d, int n,
                                        const ChunkInputs<T>& in, float* Bv, float* Cv) {
  const T* B = reinterpret_cast<const T*>(p.B);
  const T* C = reinterpret_cast<const T*>(p.C);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    Bv[i] = in.valid[i] ? load_acc(B[bc_offset<B_MODE>(p.shape, b, d, n, in.pos[i])]) : 0.f;
    Cv[i] = in.valid[i] ? load_acc(C[bc_offset<C_MODE>(p.shape, b, d, n, in.pos[i])]) : 0.f;
  }
}

// The states of this thread's steps for state n, seeded with h_chunk (the state entering the chunk): B and
// C loaded, the thread's steps composed into one affine map, a block-wide scan for the maps of the threads
// before it. Returns the state before this thread's first step. Every thread of the block must call it.
template <typename T, int B_MODE, int C_MODE>
__device__ __forceinline__ float chunk_states(const SelectiveScanParams& p, int64_t b, int64_t d, int n, float A_n,
                                              const ChunkInputs<T>& in, float h_chunk, float* Bv, float* Cv,
                                              float* a, float* bt, float* h) {
  load_bc<T, B_MODE, C_MODE>(p, b, d, n, in, Bv, Cv);
  AffineMap mine = affine_identity();
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    a[i] = expf(in.delta[i] * A_n);
    bt[i] = in.delta[i] * in.u[i] * Bv[i];
    mine = affine_then(mine, {a[i], bt[i]});
  }
  const AffineMap before = block_exclusive_scan<kThreads, false>(mine);
  const float h_in = before.a * h_chunk + before.b;
  float hv = h_in;
#pragma unroll
  for (int i = 0; i < kItems; ++i) h[i] = hv = a[i] * hv + bt[i];
  return h_in;
}

// ---- forward -------------------------------------------------------------------------------------------

template <typename T, int B_MODE, int C_MODE, bool HAS_Z>
__global__ void __launch_bounds__(kThreads) scan_fwd_kernel(SelectiveScanParams p) {
  const SelectiveScanShape& s = p.shape;
  const int64_t d = blockIdx.x, b = blockIdx.y;
  const int N = s.dstate;
  __shared__ float carry[kMaxN];  // state entering the current chunk, per n
  for (int n = threadIdx.x; n < N; n += kThreads) carry[n] = 0.f;
  const float* A = reinterpret_cast<const float*>(p.A) + d * N;
  float* ckpt = reinterpret_cast<float*>(p.checkpoints) + (b * s.dim + d) * s.chunks * N;
  const int64_t row = (b * s.dim + d) * s.length;

  for (int64_t c = 0; c < s.chunks; ++c) {
    __syncthreads();  // carry[] of the previous chunk is complete
    for (int n = threadIdx.x; n < N; n += kThreads) ckpt[c * N + n] = carry[n];
    ChunkInputs<T> in;
    load_chunk<T>(p, b, d, c * kChunk + threadIdx.x * kItems, HAS_Z, in);
    float y[kItems] = {};
    for (int n = 0; n < N; ++n) {
      float Bv[kItems], Cv[kItems], a[kItems], bt[kItems], h[kItems];
      chunk_states<T, B_MODE, C_MODE>(p, b, d, n, A[n], in, carry[n], Bv, Cv, a, bt, h);
#pragma unroll
      for (int i = 0; i < kItems; ++i) y[i] += Cv[i] * h[i];
      __syncthreads();  // everyone has read carry[n]
      if (threadIdx.x == kThreads - 1) carry[n] = h[kItems - 1];
    }
    const float Dd = p.D ? reinterpret_cast<const float*>(p.D)[d] : 0.f;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (!in.valid[i]) continue;
      float out = y[i] + Dd * in.u[i];
      if (HAS_Z) out *= in.z[i] * sigmoid(in.z[i]);
      reinterpret_cast<T*>(p.out)[row + in.pos[i]] = from_acc<T>(out);
    }
  }
  __syncthreads();
  for (int n = threadIdx.x; n < N; n += kThreads) reinterpret_cast<float*>(p.last_state)[(b * s.dim + d) * N + n] = carry[n];
}

// ---- backward ------------------------------------------------------------------------------------------

template <typename T, int B_MODE, int C_MODE, bool HAS_Z>
__global__ void __launch_bounds__(kThreads) scan_bwd_kernel(SelectiveScanParams p) {
  const SelectiveScanShape& s = p.shape;
  const int64_t d = blockIdx.x, b = blockIdx.y;
  const int N = s.dstate;
  __shared__ float dh_carry[kMaxN];   // adjoint of the state at the first step of the chunk after this one
  __shared__ float a_after[kMaxN];    // a at the first step of the chunk after this one (1 past the end)
  __shared__ float dA_sum[kMaxN];
  __shared__ float dB_sum[kMaxN], dC_sum[kMaxN];  // constant B/C: summed over the chunks, written once
  __shared__ float first_a[kThreads];  // a of each thread's first step, for its left neighbour
  for (int n = threadIdx.x; n < N; n += kThreads) {
    dh_carry[n] = p.dlast ? reinterpret_cast<const float*>(p.dlast)[(b * s.dim + d) * N + n] : 0.f;
    a_after[n] = 1.f;
    dA_sum[n] = dB_sum[n] = dC_sum[n] = 0.f;
  }
  const float* A = reinterpret_cast<const float*>(p.A) + d * N;
  const float* ckpt = reinterpret_cast<const float*>(p.checkpoints) + (b * s.dim + d) * s.chunks * N;
  const float Dd = p.D ? reinterpret_cast<const float*>(p.D)[d] : 0.f;
  const int64_t row = (b * s.dim + d) * s.length;
  float dD = 0.f;

  for (int64_t c = s.chunks - 1; c >= 0; --c) {
    __syncthreads();
    ChunkInputs<T> in;
    load_chunk<T>(p, b, d, c * kChunk + threadIdx.x * kItems, HAS_Z, in);
    float g[kItems], ddelta[kItems] = {}, du[kItems] = {};
#pragma unroll
    for (int i = 0; i < kItems; ++i)
      g[i] = in.valid[i] ? load_acc(reinterpret_cast<const T*>(p.dout)[row + in.pos[i]]) : 0.f;

    if (HAS_Z) {  // the gate needs y before it: one recompute pass over the states
      float y[kItems] = {};
      for (int n = 0; n < N; ++n) {
        float Bv[kItems], Cv[kItems], a[kItems], bt[kItems], h[kItems];
        chunk_states<T, B_MODE, C_MODE>(p, b, d, n, A[n], in, ckpt[c * N + n], Bv, Cv, a, bt, h);
#pragma unroll
        for (int i = 0; i < kItems; ++i) y[i] += Cv[i] * h[i];
      }
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const float yv = y[i] + Dd * in.u[i], sg = sigmoid(in.z[i]);
        if (in.valid[i])
          reinterpret_cast<T*>(p.dz)[row + in.pos[i]] = from_acc<T>(g[i] * yv * sg * (1.f + in.z[i] * (1.f - sg)));
        g[i] *= in.z[i] * sg;
      }
    }

    for (int n = 0; n < N; ++n) {
      float Bv[kItems], Cv[kItems], a[kItems], bt[kItems], h[kItems];
      const float h_in = chunk_states<T, B_MODE, C_MODE>(p, b, d, n, A[n], in, ckpt[c * N + n], Bv, Cv, a, bt, h);

      // adjoint: ∂h_t = a_{t+1}·∂h_{t+1} + g_t·C_t, from the last step of the chunk backwards
      first_a[threadIdx.x] = a[0];
      __syncthreads();
      const float a_right = threadIdx.x + 1 < kThreads ? first_a[threadIdx.x + 1] : a_after[n];
      float alpha[kItems];
      AffineMap mine_rev = affine_identity();
#pragma unroll
      for (int i = kItems - 1; i >= 0; --i) {
        alpha[i] = i + 1 < kItems ? a[i + 1] : a_right;
        mine_rev = affine_then(mine_rev, {alpha[i], g[i] * Cv[i]});
      }
      const AffineMap after = block_exclusive_scan<kThreads, true>(mine_rev);
      float dh = after.a * dh_carry[n] + after.b;
      float dA_local = 0.f, dB_const = 0.f, dC_const = 0.f;
#pragma unroll
      for (int i = kItems - 1; i >= 0; --i) {
        dh = alpha[i] * dh + g[i] * Cv[i];
        const float ah = a[i] * (i == 0 ? h_in : h[i - 1]);  // a_t·h_{t−1}, without cancellation
        ddelta[i] += dh * ah * A[n] + dh * Bv[i] * in.u[i];
        du[i] += dh * Bv[i] * in.delta[i];
        dA_local += dh * ah * in.delta[i];
        const float dBv = dh * in.delta[i] * in.u[i], dCv = g[i] * h[i];
        if (B_MODE == kConstant) {
          dB_const += dBv;
        } else if (in.valid[i]) {
          atomicAdd(reinterpret_cast<float*>(p.dB) + bc_offset<B_MODE>(s, b, d, n, in.pos[i]), dBv);
        }
        if (C_MODE == kConstant) {
          dC_const += dCv;
        } else if (in.valid[i]) {
          atomicAdd(reinterpret_cast<float*>(p.dC) + bc_offset<C_MODE>(s, b, d, n, in.pos[i]), dCv);
        }
      }
      const float dA_block = block_sum(dA_local);
      const float dB_block = B_MODE == kConstant ? block_sum(dB_const) : 0.f;
      const float dC_block = C_MODE == kConstant ? block_sum(dC_const) : 0.f;
      // block_sum ends with every thread past a barrier: dh_carry[n] and a_after[n] have been read
      if (threadIdx.x == 0) {
        dh_carry[n] = dh;         // ∂h at this chunk's first step
        a_after[n] = a[0];        // a at this chunk's first step
        dA_sum[n] += dA_block;
        dB_sum[n] += dB_block;
        dC_sum[n] += dC_block;
      }
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (!in.valid[i]) continue;
      du[i] += Dd * g[i];
      dD += g[i] * in.u[i];
      if (p.delta_softplus) ddelta[i] *= sigmoid(in.pre[i]);
      reinterpret_cast<float*>(p.du)[row + in.pos[i]] = du[i];
      reinterpret_cast<float*>(p.ddelta)[row + in.pos[i]] = ddelta[i];
    }
  }
  const float dD_block = block_sum(dD);
  if (threadIdx.x == 0 && p.dD) reinterpret_cast<float*>(p.dD)[b * s.dim + d] = dD_block;
  __syncthreads();
  for (int n = threadIdx.x; n < N; n += kThreads) {
    const int64_t at = (b * s.dim + d) * N + n;
    reinterpret_cast<float*>(p.dA)[at] = dA_sum[n];
    if (B_MODE == kConstant) reinterpret_cast<float*>(p.dB)[at] = dB_sum[n];
    if (C_MODE == kConstant) reinterpret_cast<float*>(p.dC)[at] = dC_sum[n];
  }
}

// ---- launch --------------------------------------------------------------------------------------------

template <typename Fn>
void dispatch_bc(int mode, Fn&& fn) {
  switch (mode) {
    case kConstant: fn(std::integral_constant<int, kConstant>{}); break;
    case kVariable: fn(std::integral_constant<int, kVariable>{}); break;
    case kGrouped: fn(std::integral_constant<int, kGrouped>{}); break;
    default: throw std::invalid_argument("zigspark._C: B/C layout code must be 0, 1 or 2, got " + std::to_string(mode));
  }
}

template <bool BACKWARD>
void launch(const SelectiveScanParams& p) {
  const SelectiveScanShape& s = p.shape;
  if (s.batch == 0 || s.dim == 0 || s.length == 0) return;
  if (s.dstate < 1 || s.dstate > kMaxN)
    throw std::invalid_argument("zigspark._C: selective scan supports 1 <= N <= " + std::to_string(kMaxN));
  if (s.batch > 65535) throw std::invalid_argument("zigspark._C: selective scan supports at most 65535 batches");
  if (s.chunks != (s.length + kChunk - 1) / kChunk)
    throw std::invalid_argument("zigspark._C: checkpoints must have ceil(L / " + std::to_string(kChunk) + ") chunks");
  if (p.b_mode != p.c_mode)
    throw std::invalid_argument("zigspark._C: the selective scan kernels need B and C in the same layout");
  DeviceGuard guard(p.device);
  const dim3 grid(unsigned(s.dim), unsigned(s.batch));
  auto stream = reinterpret_cast<cudaStream_t>(p.stream);
  if (p.dtype == int(DType::Float64)) throw std::invalid_argument("zigspark._C: the selective scan kernels take fp32/fp16/bf16");
  dispatch_float_types(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, double>) {
      dispatch_bc(p.b_mode, [&](auto bm) {  // B and C share one layout (3 instantiations, not 9)
        constexpr int BM = decltype(bm)::value;
        if (BACKWARD) {
          if (p.z) scan_bwd_kernel<T, BM, BM, true><<<grid, kThreads, 0, stream>>>(p);
          else scan_bwd_kernel<T, BM, BM, false><<<grid, kThreads, 0, stream>>>(p);
        } else {
          if (p.z) scan_fwd_kernel<T, BM, BM, true><<<grid, kThreads, 0, stream>>>(p);
          else scan_fwd_kernel<T, BM, BM, false><<<grid, kThreads, 0, stream>>>(p);
        }
      });
    }
  });
  check_launch(BACKWARD ? "selective_scan backward kernel launch" : "selective_scan forward kernel launch");
}

}  // namespace

int selective_scan_chunk() { return kChunk; }

void selective_scan_forward(const SelectiveScanParams& params) { launch<false>(params); }

void selective_scan_backward(const SelectiveScanParams& params) { launch<true>(params); }

}  // namespace zigspark
