// Spark FFN sparse inference (Spark Transformer, arXiv 2506.06644), CUDA forward.
//
// Math. For token t with input x_t ∈ R^d, predictor width r, the thresholded gate g_t = stat_topk(K1·x_t[:r])
// (g_ti > 0 exactly for the active neurons, 0 otherwise), K2 ∈ R^{f×(d−r)} and Vᵀ ∈ R^{f×d}:
//
//     a_ti  = GELU(g_ti) · (K2_i · x_t[r:])              for the active i  (GELU exact: ½v(1 + erf(v/√2)),
//     out_t = Σ_{i : g_ti > 0} a_ti · Vᵀ_i                                  F.gelu's default)
//
// With the predictor fused (args.k1 set), the gate is computed too: p_t = K1·x_t[:r], θ_t = mean(p_t) + z·std(p_t)
// (population std, z = Φ⁻¹(1 − density)), g_t = relu(p_t − θ_t) — statistical top-k without its own launch.
//
// An inactive neuron contributes GELU(0) = 0 in the dense-masked computation, so skipping it changes nothing
// but the rounding. Only the active neurons' rows of K2 and Vᵀ are read: about density·f of the f rows, which
// is the whole point at decode, where the FFN is bound by the bytes of weights it reads. Inputs are float32,
// float16 or bfloat16; all arithmetic is float32 (FMA, no fast-math) and the output is rounded to x's dtype once.
//
// Design. The f neurons of a token are cut into `slices` contiguous ranges and one block of 256 threads
// (8 warps) runs per (token, slice). Small batches (decode) get many slices so that the GPU is full; large
// ones (prefill) get few, down to one (spark_ffn_slices). A block walks its slice in chunks of 1024 neurons:
//   1. compaction — each thread reads 4 gates of the chunk; a warp ballot and popc of the lanes below give
//      each active neuron its rank within its warp, the per-(round, warp) counts in shared memory give the
//      warp's offset; the active neurons' indices and gates land in a shared list in neuron order.
//   2. dot products — warp w takes list entries w, w + 8, ...: the K2 row is read with 16-byte vector loads
//      (4 in flight per lane), x_t[r:] from shared memory where it was staged once in float32, one float32
//      partial per lane, a shuffle reduction, and lane 0 overwrites the entry's gate with a = GELU(g)·dot.
//      A K2 row of width d − r need not start on a 16-byte boundary (d − r need not be a multiple of the
//      pack, and r is arbitrary): each row peels its own misaligned head and tail (< one pack each) with
//      scalar loads, so every row keeps its vector body.
//   3. accumulation — thread i owns the output columns of packs i, i + 256, ...; it adds a_j·Vᵀ_j for the
//      list entries j in order (4 rows' loads in flight) to its float32 accumulators, which live in shared
//      memory across chunks (no register array sized by d_model). Vᵀ rather than V, so that an active
//      neuron's output weights are one contiguous row (the Python side keeps a transposed copy of V). All
//      rows of Vᵀ share one column phase, so this needs d_model a multiple of the pack (and aligned rows);
//      otherwise it runs with scalar loads.
//   4. output — with one slice the block rounds its accumulators straight into out; with several it writes
//      them to the float32 workspace partial[t, slice, :], and a second kernel sums the slices of each token
//      in slice order and rounds into out.
// Why a two-pass reduction and not float atomics into a workspace: it is deterministic (every sum is taken
// in a fixed order, so a rerun, or a different interleaving of blocks, gives the same bits), it needs no
// zero-filled buffer (hence no memset launch), and its cost, tokens·slices·d_model·8 bytes of workspace
// traffic, stays below about (4 blocks per SM + tokens)·d_model·8 bytes because slices shrink as the batch
// grows (and is nothing once one slice per token fills the GPU) — small next to the active weights. (A
// "last block of the token reduces" scheme would save the second launch but needs a zeroed counter per
// token; at decode, CUDA graphs hide launches anyway.) The slice plan depends on the SM count, so results
// are bit-reproducible per GPU model, not across models.
//
// The fused predictor. θ needs all of a token's p, which independent blocks cannot share within a launch, so
// it is split across the two launches: the predictor kernel computes p for a tile of NT ≤ 8 tokens × 64
// neurons (block of 8 warps; each warp takes its 8 neurons together, its lanes striding over r in 16-byte
// packs of K1 with the NT tokens' x[:r] staged in shared memory, so each K1 row is read once per NT tokens
// and each shared read of x feeds 4–8 multiply-adds) and writes p in
// float32 with each token's exact mean and M2 over the tile; the slice kernel first merges its token's tile
// moments (mean = count-weighted mean of the tile means, M2 = Σ M2_tile + Σ count·(mean_tile − mean)²: no
// cancellation, fixed order) into θ, then compacts on p − θ and writes the gate over p for the caller's
// mask. That saves stat_topk's launch and its read and write of the gate. The predictor runs on CUDA cores,
// which suits decode; at prefill a tensor-core GEMM does it better, so the Python side fuses only small
// batches (cuda_ops/spark_ffn.py).
//
// Shared-memory handoffs per chunk, each behind one __syncthreads in block-uniform code: counts → offsets,
// list (indices, gates) → dot products, a values → accumulation; the next chunk rewrites the list only after
// its first barrier, which every thread reaches after finishing its accumulation reads. The accumulators
// and the staged x need no more barriers: a thread only ever touches its own accumulator columns, and x is
// written before the first barrier. Not fused across tokens: tokens of a batch activate different neurons,
// so at prefill the same row is read once per token that uses it (from L2 when it is hot).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/check.h"
#include "common/device_math.cuh"
#include "common/dispatch.cuh"
#include "common/dtype.h"
#include "spark_ffn/spark_ffn.h"

namespace zigspark {
namespace {

constexpr int kThreads = 256;                 // threads per block
constexpr int kWarps = kThreads / 32;
constexpr int kRounds = 4;                    // gates each thread inspects per chunk
constexpr int kChunk = kThreads * kRounds;    // neurons compacted at a time: the capacity of the shared list
constexpr int kUnroll = 4;                    // 16-byte loads in flight per thread in the two weight loops
constexpr int kMinSlice = 128;                // fewer neurons per block leave most of its warps idle
// The slice plan aims at this many blocks per SM, and __launch_bounds__ holds the kernel to the 64 registers
// that let them all be resident (ptxas: 58–64, no spills, sm_80 and sm_90a; the fused-threshold float32 variant
// with scalar columns, the rare path, spills 12 bytes on sm_90a). 32 warps per SM with 4 16-byte
// loads in flight per lane keep ~64 KiB of weight reads in flight per SM, well above what HBM needs.
constexpr int kBlocksPerSm = 4;
constexpr int kReduceThreads = 256;
constexpr int kPredNeurons = 64;              // neurons per predictor tile: one (mean, M2) per token and tile
constexpr int kPredTokens = kWarps;           // most tokens per predictor tile: warp w reduces token w's moments
// Tokens per predictor block: the batch rounded up to 1, 2, 4 or 8.
constexpr int predictor_tile_tokens(int64_t tokens) { return tokens > 4 ? 8 : tokens > 2 ? 4 : tokens > 1 ? 2 : 1; }
constexpr int kMaxFusedR = 4096;              // the tile's x[:r] in shared memory: 8·4096 floats = 128 KiB
// std ≤ this·|mean| counts as σ = 0: the tile means and M2 carry float32 rounding of ~16 ulp of the mean.
constexpr float kConstantSpread = 1.0f / 65536;
// The slice kernel's static shared memory: the list and the counts.
constexpr size_t kStaticSmemBytes = kChunk * (sizeof(int) + sizeof(float)) + kRounds * kWarps * sizeof(int);

template <typename T>
struct Params {
  const T* x;           // (tokens, d_model), row stride sx
  const T* gate;        // (tokens, d_ff), row stride sg
  const T* k2;          // (d_ff, width), row stride sk2
  const T* vt;          // (d_ff, d_model), row stride svt
  T* out;               // (tokens, d_model), row stride sout: written when slices == 1
  float* partial;       // (tokens, slices, d_model) contiguous: written when slices > 1
  int64_t sx, sg, sk2, svt, sout;
  int d_model, width, r;  // width = d_model − r
  int64_t d_ff;
  int slices, slice_size;
  float* predictor;       // fused path: (tokens, d_ff) float32 p, row stride sg, overwritten by the gate
  const float* moments;   // fused path: (tokens, tiles, 2) per-tile (mean, M2) of p
  int tiles;
  float z;
};

// The predictor kernel's launch: p = K1·x[:r] for a tile of tokens × neurons, with the tile moments.
template <typename T>
struct PredictorParams {
  const T* x;           // (tokens, d_model), row stride sx; the first r columns are read
  const T* k1;          // (d_ff, r), row stride sk1
  float* predictor;     // (tokens, d_ff), row stride sp
  float* moments;       // (tokens, tiles, 2)
  int64_t sx, sk1, sp, tokens, d_ff;
  int r, tiles;
};

__host__ __device__ constexpr int round_up(int v, int m) { return (v + m - 1) / m * m; }

__device__ __forceinline__ float gelu_erf(float v) { return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); }

// N contiguous elements through the read-only path: one 16-byte load when the pack is 16 bytes (the caller
// guarantees the alignment), plain loads otherwise.
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_readonly(const T* p) {
  if constexpr (sizeof(Pack<T, N>) == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    Pack<T, N> out;
    static_assert(sizeof(raw) == sizeof(out), "pack size");
    memcpy(&out, &raw, sizeof(out));
    return out;
  } else {
    return *reinterpret_cast<const Pack<T, N>*>(p);
  }
}

// N consecutive floats of shared memory; with kAligned p is 16-byte aligned and N a multiple of 4.
template <int N, bool kAligned>
__device__ __forceinline__ void load_shared(const float* p, float (&out)[N]) {
  if constexpr (kAligned && N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const float4 v = *reinterpret_cast<const float4*>(p + i);
      out[i] = v.x; out[i + 1] = v.y; out[i + 2] = v.z; out[i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = p[i];
  }
}

// ---- step 2: the dot product of one K2 row with x_t[r:], by one warp ---------------------------------

// Σ over the packs p = lane, lane + 32, ... < packs of body[p·VEC + e]·xs[p·VEC + e], body 16-byte aligned.
// kXAligned: xs is 16-byte aligned too, so x comes in float4s (else scalar reads, which conflict in banks —
// only rows whose misaligned head is not a multiple of 4 elements take that path).
template <typename T, bool kXAligned>
__device__ __forceinline__ float dot_packs(const T* __restrict__ body, const float* __restrict__ xs, int packs,
                                           int lane) {
  constexpr int VEC = 16 / sizeof(T);
  float sum = 0.0f;
  auto fma_pack = [&](const Pack<T, VEC>& w, int p) {
    float xv[VEC];
    load_shared<VEC, kXAligned>(xs + p * VEC, xv);
#pragma unroll
    for (int e = 0; e < VEC; ++e) sum = fmaf(load_acc(w.v[e]), xv[e], sum);
  };
  int p = lane;
  for (; p + 32 * (kUnroll - 1) < packs; p += 32 * kUnroll) {
    Pack<T, VEC> w[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) w[u] = load_readonly<T, VEC>(body + (p + 32 * u) * VEC);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) fma_pack(w[u], p + 32 * u);
  }
#pragma unroll 1
  for (; p < packs; p += 32) fma_pack(load_readonly<T, VEC>(body + p * VEC), p);
  return sum;
}

// This lane's share of row·xs over `width` elements. The row starts anywhere (aligned to its element):
// `head` elements up to the next 16-byte boundary and the `< VEC` left after the last whole pack are
// scalar, one element per lane; the body in between is read in 16-byte packs.
template <typename T>
__device__ __forceinline__ float row_dot_lane(const T* __restrict__ row, const float* __restrict__ xs, int width,
                                              int lane) {
  constexpr int VEC = 16 / sizeof(T);
  const int misaligned = int((reinterpret_cast<uintptr_t>(row) & 15u) / sizeof(T));
  const int head = min(width, misaligned == 0 ? 0 : VEC - misaligned);
  const int packs = (width - head) / VEC;
  float sum = 0.0f;
  if (lane < head) sum = load_acc(row[lane]) * xs[lane];
  // xs + head is 16-byte aligned exactly when head is a multiple of 4 floats (always, when rows are aligned).
  sum += (head & 3) == 0 ? dot_packs<T, true>(row + head, xs + head, packs, lane)
                         : dot_packs<T, false>(row + head, xs + head, packs, lane);
  const int tail = head + packs * VEC + lane;
  if (tail < width) sum = fmaf(load_acc(row[tail]), xs[tail], sum);
  return sum;
}

// ---- step 3: acc[c] += Σ_j a_j·Vᵀ[index_j, c] over this thread's columns ----------------------------

// CV columns per pack: 16 / sizeof(T) with kVecCols (d_model a multiple of it, Vᵀ rows 16-byte aligned), else 1.
template <typename T, int CV>
__device__ __forceinline__ void accumulate_rows(const T* __restrict__ vt, int64_t svt,
                                                const int* __restrict__ index, const float* __restrict__ a,
                                                int active, float* __restrict__ acc_s, int d_model, int tid) {
  for (int c = tid * CV; c < d_model; c += kThreads * CV) {
    float acc[CV];
    load_shared<CV, true>(acc_s + c, acc);
    int j = 0;
    for (; j + kUnroll <= active; j += kUnroll) {
      Pack<T, CV> v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = load_readonly<T, CV>(vt + int64_t(index[j + u]) * svt + c);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const float w = a[j + u];
#pragma unroll
        for (int e = 0; e < CV; ++e) acc[e] = fmaf(w, load_acc(v[u].v[e]), acc[e]);
      }
    }
#pragma unroll 1
    for (; j < active; ++j) {
      const Pack<T, CV> v = load_readonly<T, CV>(vt + int64_t(index[j]) * svt + c);
      const float w = a[j];
#pragma unroll
      for (int e = 0; e < CV; ++e) acc[e] = fmaf(w, load_acc(v.v[e]), acc[e]);
    }
#pragma unroll
    for (int e = 0; e < CV; ++e) acc_s[c + e] = acc[e];
  }
}

// ---- the fused predictor ---------------------------------------------------------------------------

constexpr int kPredRows = kPredNeurons / kWarps;  // K1 rows per warp and tile

// This lane's share of rows[u]·x_t for R rows and the NT tokens: acc[u][tok] += Σ_k rows[u][k]·x_s[tok·r + k]
// over k in packs (16-byte when kVec: rows 16-byte aligned, r a multiple of the pack; else single elements)
// p = lane, lane + 32, ... Taking R rows together puts R loads in flight per step and makes each
// shared-memory read of x feed R multiply-adds.
template <typename T, int NT, int R, bool kVec>
__device__ __forceinline__ void predictor_dots_lane(const T* const (&rows)[R], const float* __restrict__ x_s, int r,
                                                    int lane, float (&acc)[R][NT]) {
  constexpr int VEC = kVec ? 16 / int(sizeof(T)) : 1;
  const int packs = r / VEC;
  for (int pk = lane; pk < packs; pk += 32) {
    Pack<T, VEC> w[R];
#pragma unroll
    for (int u = 0; u < R; ++u) w[u] = load_readonly<T, VEC>(rows[u] + pk * VEC);
#pragma unroll
    for (int tok = 0; tok < NT; ++tok) {
      float xv[VEC];
      load_shared<VEC, true>(x_s + tok * r + pk * VEC, xv);
#pragma unroll
      for (int u = 0; u < R; ++u) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[u][tok] = fmaf(load_acc(w[u].v[e]), xv[e], acc[u][tok]);
      }
    }
  }
}

// NT = tokens per block (1, 2, 4 or 8: the batch rounded up to a power of two, at most 8), so that a decode
// step of one token does one multiply-add per weight, not eight.
template <typename T, int NT, bool kVec>
__global__ void __launch_bounds__(kThreads) spark_ffn_predictor_kernel(const PredictorParams<T> p) {
  static_assert(NT <= kWarps, "warp w reduces token w's moments");
  extern __shared__ __align__(16) float x_s[];   // (NT, r): the tile's x[:r] in float32
  __shared__ float p_s[NT][kPredNeurons];        // the tile's p, for its moments
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t t0 = int64_t(blockIdx.y) * NT, n0 = int64_t(blockIdx.x) * kPredNeurons;
  const int tokens_here = int(min(int64_t(NT), p.tokens - t0));
  const int neurons_here = int(min(int64_t(kPredNeurons), p.d_ff - n0));
  for (int e = tid; e < NT * p.r; e += kThreads) {
    const int tok = e / p.r, k = e - tok * p.r;
    x_s[e] = tok < tokens_here ? load_acc(p.x[(t0 + tok) * p.sx + k]) : 0.0f;  // absent tokens: zeros
  }
  __syncthreads();
  // Warp w takes the tile's neurons w, w + 8, ..., w + 56, R at a time (R·NT accumulators: 8 rows for one or
  // two tokens, 4 for more); past the tile's end it rereads the last row (every load stays in bounds) and
  // drops the result. Row validity is warp-uniform, so whole warps reach warp_sum.
  constexpr int R = NT <= 2 ? kPredRows : kPredRows / 2;
#pragma unroll 1
  for (int base = 0; base < kPredRows; base += R) {
    if (warp + kWarps * base >= neurons_here) break;  // warp-uniform: a short last tile has no more rows here
    const T* rows[R];
#pragma unroll
    for (int u = 0; u < R; ++u) {
      rows[u] = p.k1 + (n0 + min(warp + kWarps * (base + u), neurons_here - 1)) * p.sk1;
    }
    float acc[R][NT] = {};
    predictor_dots_lane<T, NT, R, kVec>(rows, x_s, p.r, lane, acc);
#pragma unroll
    for (int u = 0; u < R; ++u) {
      const int j = warp + kWarps * (base + u);
      if (j >= neurons_here) break;
#pragma unroll
      for (int tok = 0; tok < NT; ++tok) {
        const float dot = warp_sum(acc[u][tok]);
        if (lane == 0) p_s[tok][j] = dot;
      }
    }
  }
  __syncthreads();
  if (warp >= tokens_here) return;                    // warp-uniform; no barrier follows
  const int64_t t = t0 + warp;
  float v[kPredNeurons / 32];
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kPredNeurons / 32; ++i) {
    const int j = lane + 32 * i;
    v[i] = j < neurons_here ? p_s[warp][j] : 0.0f;
    if (j < neurons_here) p.predictor[t * p.sp + n0 + j] = v[i];
    sum += v[i];
  }
  const float mean = warp_sum(sum) / float(neurons_here);
  float m2 = 0.0f;
#pragma unroll
  for (int i = 0; i < kPredNeurons / 32; ++i) {
    const float dev = lane + 32 * i < neurons_here ? v[i] - mean : 0.0f;
    m2 = fmaf(dev, dev, m2);
  }
  m2 = warp_sum(m2);
  if (lane == 0) {
    float* dst = p.moments + (t * p.tiles + blockIdx.x) * 2;
    dst[0] = mean;
    dst[1] = m2;
  }
}

// θ = mean + z·std of a token's p from its tile moments; every thread of the block gets it (block-uniform call).
__device__ float token_threshold(const float* __restrict__ moments, int tiles, int64_t d_ff, float z) {
  auto count = [&](int i) { return float(min(int64_t(kPredNeurons), d_ff - int64_t(i) * kPredNeurons)); };
  float weighted = 0.0f;
  for (int i = threadIdx.x; i < tiles; i += kThreads) weighted = fmaf(count(i), moments[2 * i], weighted);
  const float n = float(d_ff);
  const float mean = block_sum(weighted) / n;
  float m2 = 0.0f;
  for (int i = threadIdx.x; i < tiles; i += kThreads) {
    const float spread = moments[2 * i] - mean;
    m2 += fmaf(count(i) * spread, spread, moments[2 * i + 1]);
  }
  const float std = sqrtf(block_sum(m2) / n);
  // A spread at the level of float32 rounding of the mean is a constant predictor (σ = 0, as the reference
  // computes it exactly): nothing is active, rather than a rounding-level θ below the constant.
  return std <= kConstantSpread * fabsf(mean) ? INFINITY : fmaf(z, std, mean);
}

// ---- the slice kernel: steps 1–4 for one (token, slice) ---------------------------------------------

template <typename T, bool kVecCols, bool kFused>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) spark_ffn_slice_kernel(const Params<T> p) {
  constexpr int CV = kVecCols ? 16 / int(sizeof(T)) : 1;
  // Dynamic shared memory: the float32 accumulators of all d_model columns, then x_t[r:] in float32.
  extern __shared__ __align__(16) float dynamic_smem[];
  float* acc_s = dynamic_smem;
  float* x_s = dynamic_smem + round_up(p.d_model, 4);
  __shared__ int list_index[kChunk];    // the chunk's active neurons, in neuron order
  __shared__ float list_value[kChunk];  // their gates, then (after step 2) their a values
  __shared__ int warp_counts[kRounds * kWarps];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t token = blockIdx.x / p.slices;
  const int slice = int(blockIdx.x % p.slices);
  const int64_t slice_begin = int64_t(slice) * p.slice_size;
  const int64_t slice_end = min(slice_begin + p.slice_size, p.d_ff);  // ≤ slice_begin for a trailing empty slice

  const T* x = p.x + token * p.sx + p.r;
  for (int k = tid; k < p.width; k += kThreads) x_s[k] = load_acc(x[k]);  // read by step 2, after barrier (1)
  for (int c = tid * CV; c < p.d_model; c += kThreads * CV) {
#pragma unroll
    for (int e = 0; e < CV; ++e) acc_s[c + e] = 0.0f;
  }

  const T* gate = p.gate + token * p.sg;
  float* predictor = kFused ? p.predictor + token * p.sg : nullptr;
  const float theta = kFused ? token_threshold(p.moments + token * p.tiles * 2, p.tiles, p.d_ff, p.z) : 0.0f;
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int64_t chunk = slice_begin; chunk < slice_end; chunk += kChunk) {
    // 1. compaction. Neuron chunk + round·256 + warp·32 + lane: (round, warp, lane) order is neuron order.
    float g[kRounds];
    unsigned ballot[kRounds];
#pragma unroll
    for (int round = 0; round < kRounds; ++round) {
      const int64_t n = chunk + round * kThreads + tid;
      if constexpr (kFused) {
        g[round] = n < slice_end ? predictor[n] - theta : 0.0f;
        if (n < slice_end) predictor[n] = g[round] > 0.0f ? g[round] : 0.0f;  // the gate, for the mask
      } else {
        g[round] = n < slice_end ? load_acc(gate[n]) : 0.0f;
      }
      ballot[round] = __ballot_sync(0xffffffffu, g[round] > 0.0f);  // NaN and −0 are inactive
      if (lane == 0) warp_counts[round * kWarps + warp] = __popc(ballot[round]);
    }
    __syncthreads();  // (1) counts visible (and, in the first chunk, x_s)
    int offset[kRounds];
    int active = 0;
#pragma unroll
    for (int e = 0; e < kRounds * kWarps; ++e) {  // exclusive prefix over (round, warp); broadcast reads
      if (e % kWarps == warp) offset[e / kWarps] = active;
      active += warp_counts[e];
    }
#pragma unroll
    for (int round = 0; round < kRounds; ++round) {
      if (g[round] > 0.0f) {
        const int pos = offset[round] + __popc(ballot[round] & lanes_below);
        list_index[pos] = int(chunk + round * kThreads + tid);
        list_value[pos] = g[round];
      }
    }
    __syncthreads();  // (2) list visible; warp_counts no longer read, so the next chunk may rewrite it
    if (active == 0) continue;  // block-uniform: every thread summed the same counts

    // 2. a_j = GELU(g_j)·(K2_j·x_t[r:]), one warp per list entry.
    for (int j = warp; j < active; j += kWarps) {
      const T* row = p.k2 + int64_t(list_index[j]) * p.sk2;
      const float dot = warp_sum(row_dot_lane(row, x_s, p.width, lane));
      if (lane == 0) list_value[j] = gelu_erf(list_value[j]) * dot;  // lane 0 alone reads and writes entry j
    }
    __syncthreads();  // (3) a values visible

    // 3. this thread's columns += Σ_j a_j·Vᵀ_j. The list is next rewritten after barrier (1) of the next
    // chunk, which this thread reaches only when its reads here are done.
    accumulate_rows<T, CV>(p.vt, p.svt, list_index, list_value, active, acc_s, p.d_model, tid);
  }

  // 4. the block's sums of its own columns (no barrier: each thread reads back only what it wrote).
  if (p.slices == 1) {
    T* out = p.out + token * p.sout;
    for (int c = tid * CV; c < p.d_model; c += kThreads * CV) {
      Pack<T, CV> o;
#pragma unroll
      for (int e = 0; e < CV; ++e) o.v[e] = from_acc<T>(acc_s[c + e]);
      *reinterpret_cast<Pack<T, CV>*>(out + c) = o;
    }
  } else {
    float* dst = p.partial + (token * p.slices + slice) * int64_t(p.d_model);
    for (int c = tid * CV; c < p.d_model; c += kThreads * CV) {
      if constexpr (CV % 4 == 0) {
#pragma unroll
        for (int e = 0; e < CV; e += 4) {
          *reinterpret_cast<float4*>(dst + c + e) =
              make_float4(acc_s[c + e], acc_s[c + e + 1], acc_s[c + e + 2], acc_s[c + e + 3]);
        }
      } else {
#pragma unroll
        for (int e = 0; e < CV; ++e) dst[c + e] = acc_s[c + e];
      }
    }
  }
}

// out[t, c] = Σ_{s = 0, 1, ...} partial[t, s, c] in slice order, rounded once. One thread per output element.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    spark_ffn_reduce_kernel(const float* __restrict__ partial, T* __restrict__ out, int64_t tokens, int d_model,
                            int slices, int64_t sout) {
  const int64_t total = tokens * d_model;
  for (int64_t e = int64_t(blockIdx.x) * kReduceThreads + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * kReduceThreads) {
    const int64_t t = e / d_model;
    const int c = int(e - t * d_model);
    const float* src = partial + t * slices * int64_t(d_model) + c;
    float sum = 0.0f;
#pragma unroll 4
    for (int s = 0; s < slices; ++s) sum += src[int64_t(s) * d_model];
    out[t * sout + c] = from_acc<T>(sum);
  }
}

// ---- launch --------------------------------------------------------------------------------------------

// Lets `kernel` take `dynamic` bytes of dynamic shared memory beside its ~`static_bytes` of static ones. Past
// the default 48 KiB a kernel must opt in to more; the device is asked only then (d_model or r of several
// thousand in float32), so that the decode path makes no extra runtime calls (nor builds `what()`, the
// description of the launch, unless it throws, naming what needs the memory and how to `fix` it).
template <typename Kernel, typename Describe>
void reserve_shared_memory(Kernel kernel, size_t dynamic, size_t static_bytes, int device, Describe what,
                           const char* fix) {
  if (dynamic + static_bytes + 1024 <= 48 * 1024) return;
  cudaFuncAttributes attr;
  cuda_check(cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(kernel)), "cudaFuncGetAttributes(spark_ffn)");
  int optin = 0;
  cuda_check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute(shared memory per block)");
  if (dynamic + attr.sharedSizeBytes > size_t(optin)) {
    throw std::invalid_argument("zigspark._C: spark_ffn: " + what() + ": " +
                                std::to_string(dynamic + attr.sharedSizeBytes) +
                                " bytes of shared memory per block are needed, more than this GPU's " +
                                std::to_string(optin) + "; " + fix);
  }
  allow_all_dynamic_shared_memory(reinterpret_cast<const void*>(kernel), device,
                                  "cudaFuncSetAttribute(spark_ffn shared memory)");
}

int64_t slice_size_for(int64_t d_ff, int64_t slices) { return (((d_ff + slices - 1) / slices) + 31) / 32 * 32; }

bool aligned(uintptr_t ptr, int bytes) { return ptr % uintptr_t(bytes) == 0; }

template <typename T>
void forward_typed(const SparkFfnForwardArgs& a) {
  constexpr int kVec = 16 / sizeof(T);
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  Params<T> p;
  p.x = reinterpret_cast<const T*>(a.x);
  p.gate = reinterpret_cast<const T*>(a.gate);
  p.k2 = reinterpret_cast<const T*>(a.k2);
  p.vt = reinterpret_cast<const T*>(a.vt);
  p.out = reinterpret_cast<T*>(a.out);
  p.partial = reinterpret_cast<float*>(a.partial);
  p.sx = a.x_row_stride;
  p.sg = a.gate_row_stride;
  p.sk2 = a.k2_row_stride;
  p.svt = a.vt_row_stride;
  p.sout = a.out_row_stride;
  p.d_model = int(a.d_model);
  p.r = int(a.r);
  p.width = int(a.d_model - a.r);
  p.d_ff = a.d_ff;
  p.slices = int(a.slices);
  p.slice_size = int(slice_size_for(a.d_ff, a.slices));
  const bool fused = a.k1 != 0;
  p.predictor = fused ? reinterpret_cast<float*>(a.gate) : nullptr;
  p.moments = reinterpret_cast<const float*>(a.moments);
  p.tiles = int(spark_ffn_predictor_tiles(a.d_ff));
  p.z = float(a.z);
  if (fused) {
    const PredictorParams<T> q{p.x, reinterpret_cast<const T*>(a.k1), p.predictor, reinterpret_cast<float*>(a.moments),
                               a.x_row_stride, a.k1_row_stride, a.gate_row_stride, a.tokens, a.d_ff, int(a.r),
                               p.tiles};
    const int nt = predictor_tile_tokens(a.tokens);
    const size_t x_bytes = sizeof(float) * size_t(nt) * size_t(a.r);
    const bool vec = a.r % kVec == 0 && aligned(a.k1, 16) && a.k1_row_stride % kVec == 0;
    const dim3 grid(unsigned(p.tiles), unsigned((a.tokens + nt - 1) / nt));
    auto launch_predictor = [&](auto kernel) {
      reserve_shared_memory(kernel, x_bytes, sizeof(float) * kPredTokens * kPredNeurons, a.device,
                            [&] { return "the fused predictor at r = " + std::to_string(a.r); },
                            "pass the gate instead (k1 = 0)");
      kernel<<<grid, kThreads, x_bytes, stream>>>(q);
    };
    auto by_tokens = [&](auto vec_tag) {
      constexpr bool V = decltype(vec_tag)::value;
      if (nt == 1) launch_predictor(spark_ffn_predictor_kernel<T, 1, V>);
      else if (nt == 2) launch_predictor(spark_ffn_predictor_kernel<T, 2, V>);
      else if (nt == 4) launch_predictor(spark_ffn_predictor_kernel<T, 4, V>);
      else launch_predictor(spark_ffn_predictor_kernel<T, 8, V>);
    };
    if (vec) by_tokens(std::true_type{});
    else by_tokens(std::false_type{});
    check_launch("spark_ffn predictor kernel launch");
  }

  // Columns move in 16-byte packs when every row of Vᵀ and of the destination shares the pack phase.
  const bool vec_cols = a.d_model % kVec == 0 && aligned(a.vt, 16) && a.vt_row_stride % kVec == 0 &&
                        (a.slices == 1 ? aligned(a.out, 16) && a.out_row_stride % kVec == 0 : aligned(a.partial, 16));
  const size_t smem = sizeof(float) * size_t(round_up(p.d_model, 4) + round_up(p.width, 4));
  const unsigned blocks = unsigned(a.tokens * a.slices);

  auto launch = [&](auto kernel) {
    reserve_shared_memory(kernel, smem, kStaticSmemBytes, a.device,
                          [&] { return "d_model = " + std::to_string(a.d_model) + " and r = " + std::to_string(a.r); },
                          "use backend='triton' or 'reference'");
    kernel<<<blocks, kThreads, smem, stream>>>(p);
    check_launch("spark_ffn slice kernel launch");
  };
  if (fused) {
    if (vec_cols) launch(spark_ffn_slice_kernel<T, true, true>);
    else launch(spark_ffn_slice_kernel<T, false, true>);
  } else {
    if (vec_cols) launch(spark_ffn_slice_kernel<T, true, false>);
    else launch(spark_ffn_slice_kernel<T, false, false>);
  }

  if (a.slices > 1) {
    const int64_t total = a.tokens * a.d_model;
    const int64_t reduce_blocks = std::min<int64_t>((total + kReduceThreads - 1) / kReduceThreads, 1 << 20);
    spark_ffn_reduce_kernel<T><<<unsigned(reduce_blocks), kReduceThreads, 0, stream>>>(
        p.partial, p.out, a.tokens, p.d_model, p.slices, a.out_row_stride);
    check_launch("spark_ffn reduce kernel launch");
  }
}

}  // namespace

int64_t spark_ffn_slices(int64_t tokens, int64_t d_ff, int64_t multiprocessors) {
  if (tokens <= 0 || d_ff <= 0) return 1;
  const int64_t target_blocks = kBlocksPerSm * std::max<int64_t>(multiprocessors, 1);
  const int64_t most = (d_ff + kMinSlice - 1) / kMinSlice;
  const int64_t wanted = std::clamp<int64_t>((target_blocks + tokens - 1) / tokens, 1, most);
  // The slice size is rounded up to whole warps; recount so that no slice is left empty.
  const int64_t size = slice_size_for(d_ff, wanted);
  return (d_ff + size - 1) / size;
}

int64_t spark_ffn_predictor_shared_bytes(int64_t tokens, int64_t r) {
  return int64_t(sizeof(float)) * predictor_tile_tokens(tokens) * (r + kPredNeurons);  // x tile + p tile
}

int64_t spark_ffn_predictor_tiles(int64_t d_ff) { return d_ff <= 0 ? 0 : (d_ff + kPredNeurons - 1) / kPredNeurons; }

void spark_ffn_forward(const SparkFfnForwardArgs& a) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("zigspark._C: spark_ffn: " + what); };
  if (a.dtype != int(DType::Float32) && a.dtype != int(DType::Float16) && a.dtype != int(DType::BFloat16))
    fail(std::string("unsupported dtype ") + dtype_name(a.dtype) + " (takes float32, float16, bfloat16)");
  if (a.tokens < 0) fail("negative number of tokens");
  if (a.d_model < 2 || a.d_model > INT_MAX / 2) fail("d_model must be in [2, 2^30], got " + std::to_string(a.d_model));
  if (a.r < 1 || a.r >= a.d_model) fail("r must satisfy 0 < r < d_model, got r = " + std::to_string(a.r));
  if (a.d_ff < 1 || a.d_ff > INT_MAX / 2) fail("d_ff must be in [1, 2^30], got " + std::to_string(a.d_ff));
  if (a.slices < 1 || a.slices > a.d_ff) fail("slices must be in [1, d_ff], got " + std::to_string(a.slices));
  if (a.tokens == 0) return;
  if (a.tokens * a.slices > INT_MAX) fail("tokens·slices exceeds 2^31−1 blocks");
  if (a.x == 0 || a.gate == 0 || a.k2 == 0 || a.vt == 0 || a.out == 0) fail("null pointer");
  if (a.slices > 1 && a.partial == 0) fail("slices > 1 needs the float32 (tokens, slices, d_model) workspace");
  const int elem = a.dtype == int(DType::Float32) ? 4 : 2;
  for (uintptr_t ptr : {a.x, a.gate, a.k2, a.vt, a.out}) {
    if (!aligned(ptr, elem)) fail("a tensor's data pointer is not aligned to its element size");
  }
  if (a.partial != 0 && !aligned(a.partial, 4)) fail("partial must be float32-aligned");
  if (a.k1 != 0) {
    if (a.moments == 0) fail("the fused predictor (k1 set) needs the float32 moments workspace");
    if (!aligned(a.k1, elem) || !aligned(a.gate, 4) || !aligned(a.moments, 4))
      fail("k1 must be aligned to its element size, gate and moments (float32 workspaces) to 4 bytes");
    if ((a.tokens + kPredTokens - 1) / kPredTokens > 65535)
      fail("the fused predictor takes at most " + std::to_string(65535 * kPredTokens) + " tokens per call, got " +
           std::to_string(a.tokens) + "; split the batch");
    if (!std::isfinite(a.z)) fail("z must be finite");
    if (a.r > kMaxFusedR)
      fail("the fused predictor takes r ≤ " + std::to_string(kMaxFusedR) + ", got r = " + std::to_string(a.r) +
           "; pass the gate instead (k1 = 0)");
  }
  auto check_stride = [&](const char* name, int64_t stride, int64_t rows, int64_t width) {
    if (rows > 1 && stride < width)
      fail(std::string(name) + " row stride " + std::to_string(stride) + " is shorter than its row of " +
           std::to_string(width));
  };
  check_stride("x", a.x_row_stride, a.tokens, a.d_model);
  check_stride("gate", a.gate_row_stride, a.tokens, a.d_ff);
  check_stride("K2", a.k2_row_stride, a.d_ff, a.d_model - a.r);
  if (a.k1 != 0) check_stride("K1", a.k1_row_stride, a.d_ff, a.r);
  check_stride("Vᵀ", a.vt_row_stride, a.d_ff, a.d_model);
  check_stride("out", a.out_row_stride, a.tokens, a.d_model);

  DeviceGuard guard(a.device);
  dispatch_float_types(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, double>) forward_typed<T>(a);  // float64 was rejected above
  });
}

}  // namespace zigspark
