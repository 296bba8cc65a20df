// Flash attention (Dao et al., FlashAttention-2 work split), CUDA forward.
//
// q (B, S_q, H, D), k and v (B, S_k, H_kv, D); query head h reads key/value head h / (H / H_kv). With
// s_ij = scale·q_i·k_j and, when causal, key j visible to query i iff j ≤ i + S_k − S_q (bottom-right
// alignment), the forward walks the keys in tiles of BN and keeps per query row, in float32 and base 2
// (t = s·log2 e):
//     m ← max(m, max_j t_ij),   α = 2^{m_old − m},   p_ij = 2^{t_ij − m},
//     l ← l·α + Σ_j p_ij,       acc ← acc·α + Σ_j p_ij·v_j,
// and ends with o_i = acc / l, lse_i = (m + log2 l)·ln 2 (natural log). A row with no visible key keeps
// m = −∞ (the exponentials use m_safe = 0 then, so p = α = 0) and ends with l = 0: o = 0, lse = −∞.
// Nothing of size S_q × S_k is stored. Causal blocks stop at the last key their last query sees.
//
// One block of 128 threads per (batch·head, block of queries); the query blocks of one head are adjacent
// in the grid (their keys and values are shared through L2) and the longest causal blocks start first.
// Tiles are staged in shared memory with 16-byte loads when every row is 16-byte aligned (scalar loads
// otherwise), zero-filled past S and past D; head_dim is padded to a bucket DB ∈ {32, 64, 128, 256}.
//
//  * float16 / bfloat16 (sm_80+): tensor cores through mma.sync.m16n8k16 (float32 accumulation). Each of
//    the 4 warps owns 16 of the block's 64 query rows, so the softmax needs no block-wide reduction: the
//    scores stay in the mma accumulator registers (lane = 4·g + t holds rows g and g + 8, columns 2t, 2t+1
//    of each 8-wide tile), row maxima and sums are reduced over the 4 lanes of a quad, and p, rounded to
//    the input type as Triton's p.to(v.dtype), is fed back as the A operand of P·V straight from those
//    registers (the m16n8 accumulator layout of two adjacent key tiles is the m16k16 A layout). Q fragments
//    stay in registers for DB ≤ 128; V is read with ldmatrix.trans. Layouts: PTX ISA, "Matrix Fragments for
//    mma.m16n8k16" and "ldmatrix".
//  * float32: CUDA-core FMAs (IEEE float32 products, as Triton's input_precision="ieee"). Thread
//    (r, c) = (tid / 8, tid % 8) owns rows r + 16i and key columns c + 8j of the score tile and output
//    columns c + 8j; row reductions are over the 8 consecutive lanes of a row, and p goes through shared
//    memory to the P·V product.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "attention/attention.h"
#include "common/check.h"
#include "common/device_math.cuh"
#include "common/dtype.h"

namespace zigspark {
namespace {

constexpr int kThreads = 128;
constexpr float kLn2 = 0.6931471805599453f;
constexpr double kLog2e = 1.4426950408889634;

// Everything a forward kernel needs, passed by value. Row offsets inside one head fit in int.
struct FwdParams {
  const void* q;
  const void* k;
  const void* v;  // nullptr: lse only
  void* out;
  float* lse;
  int64_t q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, v_sb, v_ss, v_sh, o_sb, o_ss, o_sh;
  int seqlen_q, seqlen_k, heads, group, head_dim, m_blocks;
  float scale_log2;
  unsigned vec;  // bit 0: q, 1: k, 2: v, 3: out rows can be moved in 16-byte packs
};

enum : unsigned { kVecQ = 1u, kVecK = 2u, kVecV = 4u, kVecO = 8u };

// ---- tiles between global and shared memory --------------------------------------------------------

// smem[r·LD + c] = g[r·row_stride + c] for r < rows, c < D, else 0; ROWS × DB elements. With `vec`, g is
// 16-byte aligned, row_stride and D are multiples of the pack width.
template <typename T, int ROWS, int DB, int LD>
__device__ __forceinline__ void load_tile(T* __restrict__ smem, const T* __restrict__ g, int64_t row_stride,
                                          int rows, int D, bool vec) {
  const T zero = from_acc<T>(Acc<T>(0));
  if (vec) {
    constexpr int V = 16 / sizeof(T);
    constexpr int kPerRow = DB / V;
    for (int i = threadIdx.x; i < ROWS * kPerRow; i += kThreads) {
      const int r = i / kPerRow, c = (i % kPerRow) * V;
      Pack<T, V> pk;
      if (r < rows && c < D) {
        pk = *reinterpret_cast<const Pack<T, V>*>(g + r * row_stride + c);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) pk.v[j] = zero;
      }
      if constexpr ((LD * sizeof(T)) % 16 == 0) {
        *reinterpret_cast<Pack<T, V>*>(smem + r * LD + c) = pk;
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) smem[r * LD + c + j] = pk.v[j];
      }
    }
  } else {
    for (int i = threadIdx.x; i < ROWS * DB; i += kThreads) {
      const int r = i / DB, c = i % DB;
      smem[r * LD + c] = (r < rows && c < D) ? g[r * row_stride + c] : zero;
    }
  }
}

// g[r·row_stride + c] = smem[r·LD + c] for r < rows, c < D.
template <typename T, int ROWS, int DB, int LD>
__device__ __forceinline__ void store_tile(T* __restrict__ g, const T* __restrict__ smem, int64_t row_stride,
                                           int rows, int D, bool vec) {
  if (vec) {
    constexpr int V = 16 / sizeof(T);
    constexpr int kPerRow = DB / V;
    for (int i = threadIdx.x; i < ROWS * kPerRow; i += kThreads) {
      const int r = i / kPerRow, c = (i % kPerRow) * V;
      if (r < rows && c < D) {
        Pack<T, V> pk;
        if constexpr ((LD * sizeof(T)) % 16 == 0) {
          pk = *reinterpret_cast<const Pack<T, V>*>(smem + r * LD + c);
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) pk.v[j] = smem[r * LD + c + j];
        }
        *reinterpret_cast<Pack<T, V>*>(g + r * row_stride + c) = pk;
      }
    }
  } else {
    for (int i = threadIdx.x; i < ROWS * DB; i += kThreads) {
      const int r = i / DB, c = i % DB;
      if (r < rows && c < D) g[r * row_stride + c] = smem[r * LD + c];
    }
  }
}

// Online-softmax update shared by both kernels: the new running maximum (already reduced over the row),
// the exponent offset m_safe (0 while the row has seen no key) and the rescale factor α of the old state.
__device__ __forceinline__ void softmax_step(float& m, float tile_max, float& m_safe, float& alpha) {
  const float m_new = fmaxf(m, tile_max);
  m_safe = m_new == -INFINITY ? 0.f : m_new;
  alpha = exp2f(m - m_safe);  // m = −∞: 0
  m = m_new;
}

__device__ __forceinline__ void write_lse(float* lse, int row, int seqlen_q, float m, float l) {
  if (row < seqlen_q) lse[row] = l > 0.f ? (m + log2f(l)) * kLn2 : -INFINITY;
}

// ---- float16 / bfloat16: tensor cores -------------------------------------------------------------

template <int DB> struct MmaConfig {
  static constexpr int BM = 64;                   // query rows per block, 16 per warp
  static constexpr int BN = DB <= 128 ? 64 : 32;  // keys per tile
  static constexpr int LD = DB + 8;               // smem row stride in elements: conflict-free fragment reads
  static constexpr bool kQInRegs = DB <= 128;     // Q fragments held in registers (else re-read from smem)
  // K tile, V tile, and the Q tile (aliasing K and V when Q lives in registers; also the output staging).
  static constexpr size_t kSmemElems = kQInRegs ? size_t(std::max(BM, 2 * BN)) * LD : size_t(2 * BN + BM) * LD;
};

template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);  // lo in the low 16 bits: the element with the smaller index
  return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// c (16×8, float32) += a (16×16, row) · b (16×8, col).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(ZIGSPARK_EMULATED)
  emu::mma_m16n8k16<T>(c, a, b0, b1);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// Four 8×8 b16 matrices, transposed: lanes 8i..8i+7 give the row addresses of matrix i, r[i] its fragment.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
#if defined(ZIGSPARK_EMULATED)
  emu::ldmatrix_x4_trans(r, smem);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
#endif
}

__device__ __forceinline__ uint32_t lds32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

// A fragment (16×16, row-major) of rows row0.., columns col0.. of a [rows][LD] smem tile. Lane 4g + t holds
// (g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..).
template <typename T, int LD>
__device__ __forceinline__ void load_a_frag(uint32_t (&a)[4], const T* s, int row0, int col0, int g, int t) {
  const T* p = s + (row0 + g) * LD + col0 + 2 * t;
  a[0] = lds32(p);
  a[1] = lds32(p + 8 * LD);
  a[2] = lds32(p + 8);
  a[3] = lds32(p + 8 * LD + 8);
}

template <typename T, int DB, bool CAUSAL>
__global__ void __launch_bounds__(kThreads) attn_fwd_mma_kernel(const FwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Cfg = MmaConfig<DB>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, LD = Cfg::LD;
  constexpr int KSTEPS = DB / 16;  // k-steps of Q·Kᵀ over the head dimension
  constexpr int NT = BN / 8;       // 8-wide key tiles of the scores
  constexpr int OT = DB / 8;       // 8-wide head-dim tiles of the output

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* ks = reinterpret_cast<T*>(smem_raw);
  T* vs = ks + BN * LD;
  T* qs = Cfg::kQInRegs ? ks : vs + BN * LD;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int mb = p.m_blocks - 1 - int(blockIdx.x % unsigned(p.m_blocks));
  const int bh = int(blockIdx.x / unsigned(p.m_blocks));
  const int b = bh / p.heads, h = bh % p.heads, hk = h / p.group;
  const int Sq = p.seqlen_q, Sk = p.seqlen_k, D = p.head_dim;
  const int q0 = mb * BM;
  const int diag = Sk - Sq;
  const bool has_v = p.v != nullptr;

  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + q0 * p.q_ss;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* vg = has_v ? static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh : nullptr;

  load_tile<T, BM, DB, LD>(qs, qg, p.q_ss, min(BM, Sq - q0), D, p.vec & kVecQ);
  __syncthreads();
  uint32_t qf[Cfg::kQInRegs ? KSTEPS : 1][4];
  if constexpr (Cfg::kQInRegs) {
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) load_a_frag<T, LD>(qf[kk], qs, warp * 16, kk * 16, g, t);
    __syncthreads();  // qs aliases ks and vs
  }

  float acc[OT][4];
#pragma unroll
  for (int i = 0; i < OT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows g and g + 8 of the warp; l: lane partials
  const int row0 = q0 + warp * 16 + g;
  const int n_end = CAUSAL ? min(Sk, min(q0 + BM, Sq) + diag) : Sk;

  for (int n0 = 0; n0 < n_end; n0 += BN) {
    const int keys = min(BN, Sk - n0);
    load_tile<T, BN, DB, LD>(ks, kg + int64_t(n0) * p.k_ss, p.k_ss, keys, D, p.vec & kVecK);
    if (has_v) load_tile<T, BN, DB, LD>(vs, vg + int64_t(n0) * p.v_ss, p.v_ss, keys, D, p.vec & kVecV);
    __syncthreads();

    // A warp whose rows see none of these keys would leave its state unchanged (α = 1, p = 0): skip it.
    if (!CAUSAL || n0 <= q0 + warp * 16 + 15 + diag) {
      float s[NT][4];
#pragma unroll
      for (int j = 0; j < NT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KSTEPS; ++kk) {
        if (kk * 16 < D) {  // columns past D are zero in Q and K
          uint32_t a[4];
          if constexpr (Cfg::kQInRegs) {
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = qf[kk][i];
          } else {
            load_a_frag<T, LD>(a, qs, warp * 16, kk * 16, g, t);
          }
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            // B = Kᵀ (16 head dims × 8 keys, col-major): lane 4g + t holds key 8j + g, dims 2t..2t+1 and +8.
            const T* kp = ks + (j * 8 + g) * LD + kk * 16 + 2 * t;
            mma_16816<T>(s[j], a, lds32(kp), lds32(kp + 8));
          }
        }
      }

      // Scale to base 2, mask, and take the row maxima (rows g: s[j][0..1], g + 8: s[j][2..3]).
      const bool need_mask = n0 + BN > Sk || (CAUSAL && n0 + BN - 1 > q0 + warp * 16 + diag);
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = s[j][e] * p.scale_log2;
          if (need_mask) {
            const int key = n0 + j * 8 + 2 * t + (e & 1);
            const int row = row0 + (e >> 1) * 8;
            if (key >= Sk || (CAUSAL && key > row + diag)) x = -INFINITY;
          }
          s[j][e] = x;
          tile_max[e >> 1] = fmaxf(tile_max[e >> 1], x);
        }
      }
      float m_safe[2], alpha[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
        softmax_step(m[r], tile_max[r], m_safe[r], alpha[r]);
      }
      float rowsum[2] = {0.f, 0.f};
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[j][e] = exp2f(s[j][e] - m_safe[e >> 1]);
          rowsum[e >> 1] += s[j][e];
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) l[r] = l[r] * alpha[r] + rowsum[r];

      if (has_v) {
#pragma unroll
        for (int i = 0; i < OT; ++i) {
          acc[i][0] *= alpha[0];
          acc[i][1] *= alpha[0];
          acc[i][2] *= alpha[1];
          acc[i][3] *= alpha[1];
        }
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          // P (16 rows × keys 16kk..16kk+15) as an A fragment: the accumulators of key tiles 2kk, 2kk+1.
          uint32_t pa[4];
          pa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
          pa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
          pa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
          pa[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
          for (int np = 0; np < DB / 16; ++np) {
            if (np * 16 < D) {
              // B = V (16 keys × 8 dims, col-major) for dim tiles 2np and 2np+1: matrices (keys +0..7 | +8..15)
              // × (dims +0..7 | +8..15); lane L addresses key 16kk + (L & 15), dim 16np + 8·(L >> 4).
              uint32_t vb[4];
              ldmatrix_x4_trans(vb, vs + (kk * 16 + (lane & 15)) * LD + np * 16 + (lane >> 4) * 8);
              mma_16816<T>(acc[2 * np], pa, vb[0], vb[1]);
              mma_16816<T>(acc[2 * np + 1], pa, vb[2], vb[3]);
            }
          }
        }
      }
    }
    __syncthreads();  // before the next tile overwrites ks and vs
  }

  // Finish the rows: full sums over the quad, lse, and o = acc / l through smem to coalesced stores.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  if (t == 0) {
    float* lse = p.lse + int64_t(bh) * Sq;
    write_lse(lse, row0, Sq, m[0], l[0]);
    write_lse(lse, row0 + 8, Sq, m[1], l[1]);
  }
  if (has_v) {
    T* os = qs;  // every warp is past its last read of ks/vs/qs (the loop ends with a barrier)
    const float l0 = l[0] > 0.f ? l[0] : 1.f, l1 = l[1] > 0.f ? l[1] : 1.f;  // l = 0 ⇒ acc = 0
#pragma unroll
    for (int i = 0; i < OT; ++i) {
      T* op = os + (warp * 16 + g) * LD + i * 8 + 2 * t;
      *reinterpret_cast<uint32_t*>(op) = pack2<T>(acc[i][0] / l0, acc[i][1] / l0);
      *reinterpret_cast<uint32_t*>(op + 8 * LD) = pack2<T>(acc[i][2] / l1, acc[i][3] / l1);
    }
    __syncthreads();
    T* og = static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh + q0 * p.o_ss;
    store_tile<T, BM, DB, LD>(og, os, p.o_ss, min(BM, Sq - q0), D, p.vec & kVecO);
  }
#endif
}

// ---- float32: CUDA cores --------------------------------------------------------------------------

template <int DB> struct FmaConfig {
  static constexpr int BM = DB <= 128 ? 64 : 32;
  static constexpr int BN = DB <= 64 ? 64 : (DB <= 128 ? 32 : 16);
  static constexpr int LDQ = DB + 1;  // Q and K rows: odd stride, conflict-free column reads
  static constexpr int LDV = DB;
  static constexpr int LDP = BN + 8;  // p rows: the 4 row groups of a warp land 8 banks apart
  static constexpr int RM = BM / 16, SN = BN / 8, ON = DB / 8;  // per thread: rows, score cols, output cols
  static constexpr size_t kSmemElems = size_t(BM) * LDQ + size_t(BN) * LDQ + size_t(BN) * LDV + size_t(BM) * LDP;
  static_assert((BM + BN) * LDQ % 4 == 0, "the V tile must start on a 16-byte boundary (16-byte stores)");
};

template <int DB, bool CAUSAL>
__global__ void __launch_bounds__(kThreads, 1) attn_fwd_fma_kernel(const FwdParams p) {
  using Cfg = FmaConfig<DB>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, LDQ = Cfg::LDQ, LDV = Cfg::LDV, LDP = Cfg::LDP;
  constexpr int RM = Cfg::RM, SN = Cfg::SN, ON = Cfg::ON;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* qs = reinterpret_cast<float*>(smem_raw);
  float* ks = qs + BM * LDQ;
  float* vs = ks + BN * LDQ;
  float* ps = vs + BN * LDV;

  const int r = threadIdx.x >> 3, c = threadIdx.x & 7;  // rows r + 16i; columns c + 8j
  const int mb = p.m_blocks - 1 - int(blockIdx.x % unsigned(p.m_blocks));
  const int bh = int(blockIdx.x / unsigned(p.m_blocks));
  const int b = bh / p.heads, h = bh % p.heads, hk = h / p.group;
  const int Sq = p.seqlen_q, Sk = p.seqlen_k, D = p.head_dim;
  const int q0 = mb * BM;
  const int diag = Sk - Sq;
  const bool has_v = p.v != nullptr;

  const float* qg = static_cast<const float*>(p.q) + b * p.q_sb + h * p.q_sh + q0 * p.q_ss;
  const float* kg = static_cast<const float*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const float* vg = has_v ? static_cast<const float*>(p.v) + b * p.v_sb + hk * p.v_sh : nullptr;

  load_tile<float, BM, DB, LDQ>(qs, qg, p.q_ss, min(BM, Sq - q0), D, p.vec & kVecQ);

  float acc[RM][ON];
#pragma unroll
  for (int i = 0; i < RM; ++i)
#pragma unroll
    for (int j = 0; j < ON; ++j) acc[i][j] = 0.f;
  float m[RM], l[RM];  // l: partial sums of this thread's columns
#pragma unroll
  for (int i = 0; i < RM; ++i) m[i] = -INFINITY, l[i] = 0.f;
  const int n_end = CAUSAL ? min(Sk, min(q0 + BM, Sq) + diag) : Sk;

  for (int n0 = 0; n0 < n_end; n0 += BN) {
    const int keys = min(BN, Sk - n0);
    load_tile<float, BN, DB, LDQ>(ks, kg + int64_t(n0) * p.k_ss, p.k_ss, keys, D, p.vec & kVecK);
    if (has_v) load_tile<float, BN, DB, LDV>(vs, vg + int64_t(n0) * p.v_ss, p.v_ss, keys, D, p.vec & kVecV);
    __syncthreads();

    float s[RM][SN];
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int j = 0; j < SN; ++j) s[i][j] = 0.f;
#pragma unroll 4
    for (int d = 0; d < D; ++d) {  // columns past D are zero: any bound ≥ D gives the same sums
      float qv[RM], kv[SN];
#pragma unroll
      for (int i = 0; i < RM; ++i) qv[i] = qs[(r + 16 * i) * LDQ + d];
#pragma unroll
      for (int j = 0; j < SN; ++j) kv[j] = ks[(c + 8 * j) * LDQ + d];
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int j = 0; j < SN; ++j) s[i][j] = fmaf(qv[i], kv[j], s[i][j]);
    }

    const bool need_mask = n0 + BN > Sk || (CAUSAL && n0 + BN - 1 > q0 + diag);
#pragma unroll
    for (int i = 0; i < RM; ++i) {
      const int row = q0 + r + 16 * i;
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < SN; ++j) {
        float x = s[i][j] * p.scale_log2;
        if (need_mask) {
          const int key = n0 + c + 8 * j;
          if (key >= Sk || (CAUSAL && key > row + diag)) x = -INFINITY;
        }
        s[i][j] = x;
        tile_max = fmaxf(tile_max, x);
      }
#pragma unroll
      for (int off = 1; off < 8; off <<= 1) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, off));
      float m_safe, alpha;
      softmax_step(m[i], tile_max, m_safe, alpha);
      float rowsum = 0.f;
#pragma unroll
      for (int j = 0; j < SN; ++j) {
        const float pv = exp2f(s[i][j] - m_safe);
        rowsum += pv;
        ps[(r + 16 * i) * LDP + c + 8 * j] = pv;
      }
      l[i] = l[i] * alpha + rowsum;
#pragma unroll
      for (int j = 0; j < ON; ++j) acc[i][j] *= alpha;
    }
    __syncthreads();  // ps complete

    if (has_v) {
#pragma unroll 4
      for (int n = 0; n < BN; ++n) {
        float pv[RM], vv[ON];
#pragma unroll
        for (int i = 0; i < RM; ++i) pv[i] = ps[(r + 16 * i) * LDP + n];
#pragma unroll
        for (int j = 0; j < ON; ++j) vv[j] = vs[n * LDV + c + 8 * j];
#pragma unroll
        for (int i = 0; i < RM; ++i)
#pragma unroll
          for (int j = 0; j < ON; ++j) acc[i][j] = fmaf(pv[i], vv[j], acc[i][j]);
      }
    }
    __syncthreads();  // before the next tile overwrites ks, vs and ps
  }

  // Finish: sums over the 8 lanes of a row, lse, o = acc / l staged in qs for coalesced stores.
  float* lse = p.lse + int64_t(bh) * Sq;
#pragma unroll
  for (int i = 0; i < RM; ++i) {
#pragma unroll
    for (int off = 1; off < 8; off <<= 1) l[i] += __shfl_xor_sync(0xffffffffu, l[i], off);
    if (c == 0) write_lse(lse, q0 + r + 16 * i, Sq, m[i], l[i]);
  }
  if (has_v) {
    __syncthreads();  // with no key tile at all, the Q load may still be writing qs
#pragma unroll
    for (int i = 0; i < RM; ++i) {
      const float li = l[i] > 0.f ? l[i] : 1.f;
#pragma unroll
      for (int j = 0; j < ON; ++j) qs[(r + 16 * i) * LDQ + c + 8 * j] = acc[i][j] / li;
    }
    __syncthreads();
    float* og = static_cast<float*>(p.out) + b * p.o_sb + h * p.o_sh + q0 * p.o_ss;
    store_tile<float, BM, DB, LDQ>(og, qs, p.o_ss, min(BM, Sq - q0), D, p.vec & kVecO);
  }
}

// ---- launch -------------------------------------------------------------------------------------------

template <typename Fn>
void dispatch_head_dim(int64_t d, Fn&& fn) {
  if (d <= 32) fn(std::integral_constant<int, 32>{});
  else if (d <= 64) fn(std::integral_constant<int, 64>{});
  else if (d <= 128) fn(std::integral_constant<int, 128>{});
  else fn(std::integral_constant<int, 256>{});
}

template <typename Fn>
void dispatch_bool(bool value, Fn&& fn) {
  if (value) fn(std::true_type{});
  else fn(std::false_type{});
}

// Rows of a (batch, seq, heads, head_dim) tensor move in 16-byte packs: aligned base, and every stride of
// a dimension longer than 1 and head_dim multiples of the pack width.
bool vectorizable(uintptr_t ptr, int elem_bytes, int64_t head_dim,
                  std::initializer_list<std::pair<int64_t, int64_t>> dims) {
  const int64_t vec = 16 / elem_bytes;
  if (ptr % 16 != 0 || head_dim % vec != 0) return false;
  for (auto [size, stride] : dims) {
    if (size > 1 && stride % vec != 0) return false;
  }
  return true;
}

template <typename Kernel>
void launch(Kernel kernel, unsigned blocks, size_t smem, cudaStream_t stream, const FwdParams& p) {
  if (smem > 48 * 1024) {
    cuda_check(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    int(smem)),
               "cudaFuncSetAttribute(attention forward shared memory)");
  }
  kernel<<<blocks, kThreads, smem, stream>>>(p);
  check_launch("attention forward kernel launch");
}

template <typename T>
void forward_typed(const AttentionForwardArgs& a, FwdParams& p) {
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  dispatch_head_dim(a.head_dim, [&](auto bucket) {
    constexpr int DB = decltype(bucket)::value;
    constexpr int BM = std::is_same_v<T, float> ? FmaConfig<DB>::BM : MmaConfig<DB>::BM;
    const int64_t m_blocks = (a.seqlen_q + BM - 1) / BM;
    const int64_t blocks = m_blocks * a.batch * a.heads;
    if (blocks > INT_MAX)
      throw std::invalid_argument("zigspark._C: attention: batch·heads·ceil(seqlen_q/" + std::to_string(BM) +
                                  ") exceeds 2^31−1 blocks");
    p.m_blocks = int(m_blocks);
    dispatch_bool(a.causal, [&](auto causal) {
      constexpr bool C = decltype(causal)::value;
      if constexpr (std::is_same_v<T, float>) {
        launch(attn_fwd_fma_kernel<DB, C>, unsigned(blocks), FmaConfig<DB>::kSmemElems * sizeof(float), stream, p);
      } else {
        launch(attn_fwd_mma_kernel<T, DB, C>, unsigned(blocks), MmaConfig<DB>::kSmemElems * sizeof(T), stream, p);
      }
    });
  });
}

}  // namespace

void attention_forward(const AttentionForwardArgs& a) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("zigspark._C: attention: " + what); };
  if (a.batch < 0 || a.seqlen_q < 0 || a.seqlen_k < 0 || a.heads < 0 || a.kv_heads < 0) fail("negative size");
  if (a.head_dim < 1 || a.head_dim > 256) fail("head_dim must be in 1..256, got " + std::to_string(a.head_dim));
  if (a.dtype != int(DType::Float32) && a.dtype != int(DType::Float16) && a.dtype != int(DType::BFloat16))
    fail(std::string("unsupported dtype ") + dtype_name(a.dtype) + " (takes float32, float16, bfloat16)");
  if ((a.v == 0) != (a.out == 0)) fail("v and out must both be given, or both be 0 (lse only)");
  if (a.batch == 0 || a.heads == 0 || a.seqlen_q == 0) return;
  if (a.kv_heads < 1 || a.heads % a.kv_heads != 0) fail("heads must be a multiple of kv_heads");
  if (a.q == 0 || a.k == 0 || a.lse == 0) fail("null pointer");
  if (a.seqlen_q > INT_MAX / 2 || a.seqlen_k > INT_MAX / 2) fail("sequence longer than 2^30");
  if (a.batch * a.heads > INT_MAX) fail("batch·heads exceeds 2^31−1");

  DeviceGuard guard(a.device);
  if (a.dtype != int(DType::Float32)) {
    int major = 0;
    cuda_check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, a.device), "cudaDeviceGetAttribute");
    if (major < 8) fail("float16/bfloat16 need tensor cores of sm_80 or newer");
  }

  const int elem = a.dtype == int(DType::Float32) ? 4 : 2;
  FwdParams p;
  p.q = reinterpret_cast<const void*>(a.q);
  p.k = reinterpret_cast<const void*>(a.k);
  p.v = reinterpret_cast<const void*>(a.v);
  p.out = reinterpret_cast<void*>(a.out);
  p.lse = reinterpret_cast<float*>(a.lse);
  p.q_sb = a.q_stride_b; p.q_ss = a.q_stride_s; p.q_sh = a.q_stride_h;
  p.k_sb = a.k_stride_b; p.k_ss = a.k_stride_s; p.k_sh = a.k_stride_h;
  p.v_sb = a.v_stride_b; p.v_ss = a.v_stride_s; p.v_sh = a.v_stride_h;
  p.o_sb = a.out_stride_b; p.o_ss = a.out_stride_s; p.o_sh = a.out_stride_h;
  p.seqlen_q = int(a.seqlen_q);
  p.seqlen_k = int(a.seqlen_k);
  p.heads = int(a.heads);
  p.group = int(a.heads / a.kv_heads);
  p.head_dim = int(a.head_dim);
  p.m_blocks = 0;
  p.scale_log2 = float(double(a.scale) * kLog2e);
  p.vec = 0;
  if (vectorizable(a.q, elem, a.head_dim,
                   {{a.batch, a.q_stride_b}, {a.seqlen_q, a.q_stride_s}, {a.heads, a.q_stride_h}}))
    p.vec |= kVecQ;
  if (vectorizable(a.k, elem, a.head_dim,
                   {{a.batch, a.k_stride_b}, {a.seqlen_k, a.k_stride_s}, {a.kv_heads, a.k_stride_h}}))
    p.vec |= kVecK;
  if (a.v != 0 && vectorizable(a.v, elem, a.head_dim,
                               {{a.batch, a.v_stride_b}, {a.seqlen_k, a.v_stride_s}, {a.kv_heads, a.v_stride_h}}))
    p.vec |= kVecV;
  if (a.out != 0 && vectorizable(a.out, elem, a.head_dim,
                                 {{a.batch, a.out_stride_b}, {a.seqlen_q, a.out_stride_s}, {a.heads, a.out_stride_h}}))
    p.vec |= kVecO;

  switch (a.dtype) {
    case int(DType::Float32): forward_typed<float>(a, p); break;
    case int(DType::Float16): forward_typed<__half>(a, p); break;
    default: forward_typed<__nv_bfloat16>(a, p); break;
  }
}

}  // namespace zigspark
