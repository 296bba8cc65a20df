// HiPrune token selection (arXiv 2508.00553) and the token gather, CUDA.
//
// The rule (python/zigspark/ops/token_prune.py): for one sample of N = h·w tokens in raster order and a
// budget `keep`, every token gets a priority and the `keep` best are kept, output ascending:
//     always_keep[a]                          priority a                      (first occurrence counts)
//     anchor of rank r (r-th highest obj)     priority S + r                  S = 4N + 4
//     neighbour d ∈ (up, down, left, right)   priority 2S + 4r + d            (in-grid, or flat ±w/±1 clamped
//       of the anchor of rank r                                                 to [0, N−1] with wrap_rows)
//     any other token                         a register, ranked by deep score below all of the above
// A token with several roles takes its best (smallest) priority; score ties go to the lower index.
// The structural priorities (the first three rows) are distinct integers, so the choice is unique.
//
// One thread block per sample; no full sort anywhere:
//  1. Stage both score rows as order-preserving 32-bit keys: key(x) = bits(x) | 2^31 for x ≥ 0 and
//     ~bits(x) for x < 0, so that key order is float order (−0 is mapped to +0 first: the reference's sort
//     sees them equal). float16/bfloat16 widen to float32 exactly, so one key serves all three dtypes.
//  2. Anchors: the n_anchor largest obj keys (select_largest below), compacted in index order into a list;
//     an anchor's rank is the number of list entries with a larger key, or an equal key and a lower index.
//  3. Priority words: the obj keys are dead, their array becomes one 32-bit priority per token, initialised
//     to kRegister; always_keep, the anchors and their neighbours lower it with shared-memory atomicMin.
//     Membership and dedupe come for free: a token is structural iff its word is below kRegister.
//  4. With Q structural tokens: if Q ≥ keep, keep the `keep` smallest priorities (the largest ~priority);
//     else keep all Q and the keep − Q largest deep keys among the other tokens.
//  5. Compact the selected-byte mask into ascending int64 indices with a block-wide prefix sum.
//
// select_largest(k) finds the k-th largest key T among the candidates by radix select: four passes over
// 8-bit digits from the top, each a 256-bin histogram in shared memory of the candidates whose higher
// digits equal T's (warp-aggregated atomics: tied scores hit one bin) followed by one warp finding the
// bin where the count from the top reaches k. It yields T, `above` = #(key > T) and `equal` = #(key == T);
// the k − above ties to take are the lowest-indexed ones, found with the same prefix sum (skipped when
// all ties are taken, the usual case for continuous scores).
//
// The block prefix sum in index order: token i = tile·threads + tid; per (tile, warp) a ballot gives the
// warp's count, the tile-major array of those counts is scanned, and a token's rank is its (tile, warp)
// offset plus the popcount of the lower lanes' ballot bits. Every loop over tokens runs the same number of
// tiles on every thread, so warp intrinsics see full warps and barriers are never divergent.
//
// A sample's working set (two key rows, the anchor list, the tile counts, the selected mask: about 9N
// bytes) lives in dynamic shared memory when it fits (N = 4096: 37 KB at alpha 0.1); otherwise the same
// code runs on a global workspace the caller allocated (hiprune_select_workspace_bytes), so N is not
// limited by shared memory.
//
// prune_tokens moves rows: forward out[b, j] = x[b, idx[b, j]]; backward dx[b, idx[b, j]] += dout[b, j]
// into zeros. The op allows repeated indices, so its backward accumulates with atomics; hiprune_select's
// indices are unique within a sample, and then the caller asks for plain stores (deterministic, no
// read-modify-write). Rows move in 16-byte packs when every row is 16-byte aligned.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/check.h"
#include "common/device_math.cuh"
#include "common/dispatch.cuh"
#include "common/dtype.h"
#include "token_prune/token_prune.h"

namespace zigspark {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxSelectThreads = 512;  // N = 4096 at 8 tokens/thread; at 1024, sm_80 ptxas capped it at 32 regs and spilled
constexpr int kMinSelectThreads = 128;
constexpr int kTokensPerThread = 8;      // target tokens per thread when choosing the block size
constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;
constexpr int kPasses = 32 / kRadixBits;
constexpr int kBinsPerLane = kBins / 32;
constexpr uint32_t kRegister = 0xffffffffu;  // priority word of a token that is no structural role
constexpr int64_t kMaxTokens = int64_t(1) << 28;  // 3·(4N + 4) must stay below kRegister

// ---- sizes shared by host and device ------------------------------------------------------------------

__host__ __device__ inline int select_threads(int64_t n) {
  int64_t t = (n + kTokensPerThread - 1) / kTokensPerThread;
  t = (t + 31) / 32 * 32;
  return int(t < kMinSelectThreads ? kMinSelectThreads : (t > kMaxSelectThreads ? kMaxSelectThreads : t));
}

__host__ __device__ inline int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// Byte offsets of one sample's working set. `tile_entries` = tiles · warps of the block that runs it.
struct SampleLayout {
  int64_t obj_key, deep_key, anchor_index, anchor_key, tile_counts, selected, bytes;
};

__host__ __device__ inline SampleLayout sample_layout(int64_t n, int64_t n_anchor, int64_t tile_entries) {
  SampleLayout l;
  l.obj_key = 0;                               // uint32[n]; later the priority words
  l.deep_key = l.obj_key + 4 * n;              // uint32[n]
  l.anchor_index = l.deep_key + 4 * n;         // uint32[n_anchor], ascending token index
  l.anchor_key = l.anchor_index + 4 * n_anchor;  // uint32[n_anchor], their obj keys
  l.tile_counts = l.anchor_key + 4 * n_anchor;   // uint32[tile_entries]
  l.selected = l.tile_counts + 4 * tile_entries;  // uint8[n]
  l.bytes = round_up(l.selected + n, 16);
  return l;
}

inline SampleLayout host_layout(int64_t n, int64_t n_anchor) {
  const int threads = select_threads(n);
  const int64_t tiles = (n + threads - 1) / threads;
  return sample_layout(n, n_anchor, tiles * (threads / 32));
}

// ---- block-level building blocks ----------------------------------------------------------------------

struct BlockShape {
  int tid, lane, warp, threads, warps, tiles;  // tiles: ceil(n / threads) token tiles of `threads` tokens
};

__device__ __forceinline__ BlockShape block_shape(int n) {
  BlockShape s;
  s.tid = threadIdx.x;
  s.lane = threadIdx.x & 31;
  s.warp = threadIdx.x >> 5;
  s.threads = blockDim.x;
  s.warps = blockDim.x >> 5;
  s.tiles = (n + s.threads - 1) / s.threads;
  return s;
}

// Static shared state of the selection passes.
struct Scratch {
  uint32_t hist[2][kBins];   // double-buffered: the next pass's histogram is zeroed while this one is read
  uint32_t prefix;           // digits of the k-th largest key found so far
  uint32_t remaining;        // how many keys with that prefix are still to be taken
  uint32_t equal;            // candidates in the chosen bin (after the last pass: #(key == T))
  uint32_t warp_totals[32];  // block_exclusive_scan
};

__device__ __forceinline__ uint32_t order_key(float x) {
  uint32_t bits = __float_as_uint(x);
  if (bits == 0x80000000u) bits = 0u;  // −0 ties with +0, as in torch.sort
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ uint32_t warp_inclusive_sum(uint32_t v, int lane) {
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const uint32_t other = __shfl_up_sync(kFullMask, v, offset);
    if (lane >= offset) v += other;
  }
  return v;
}

// In place exclusive prefix sum of data[0, count) by the whole block; returns the total. Thread t owns a
// contiguous run of entries, so the result is in index order. Ends with a barrier: data is ready.
__device__ uint32_t block_exclusive_scan(const BlockShape& blk, uint32_t* data, int count, Scratch& s) {
  const int per_thread = (count + blk.threads - 1) / blk.threads;
  const int begin = min(blk.tid * per_thread, count);
  const int end = min(begin + per_thread, count);
  uint32_t local = 0;
  for (int j = begin; j < end; ++j) local += data[j];
  const uint32_t inclusive = warp_inclusive_sum(local, blk.lane);
  if (blk.lane == 31) s.warp_totals[blk.warp] = inclusive;
  __syncthreads();
  uint32_t before = 0, total = 0;
  for (int w = 0; w < blk.warps; ++w) {
    const uint32_t t = s.warp_totals[w];
    before += w < blk.warp ? t : 0u;
    total += t;
  }
  uint32_t running = before + inclusive - local;
  for (int j = begin; j < end; ++j) {
    const uint32_t v = data[j];
    data[j] = running;
    running += v;
  }
  __syncthreads();  // data complete; warp_totals may be rewritten by the next call
  return total;
}

// Calls visit(i, flag(i), rank) for every token i < n, rank = #{i' < i : flag(i')} (meaningful where the
// flag is set). flag must read only memory that visit does not write. Returns #{i : flag(i)}.
template <typename Flag, typename Visit>
__device__ uint32_t scan_in_index_order(const BlockShape& blk, int n, uint32_t* tile_counts, Scratch& s, Flag flag,
                                        Visit visit) {
  for (int tile = 0; tile < blk.tiles; ++tile) {
    const int i = tile * blk.threads + blk.tid;
    const unsigned ballot = __ballot_sync(kFullMask, i < n && flag(i));
    if (blk.lane == 0) tile_counts[tile * blk.warps + blk.warp] = __popc(ballot);
  }
  __syncthreads();
  const uint32_t total = block_exclusive_scan(blk, tile_counts, blk.tiles * blk.warps, s);
  const unsigned lower_lanes = (1u << blk.lane) - 1u;
  for (int tile = 0; tile < blk.tiles; ++tile) {
    const int i = tile * blk.threads + blk.tid;
    const bool f = i < n && flag(i);
    const unsigned ballot = __ballot_sync(kFullMask, f);
    if (i < n) visit(i, f, tile_counts[tile * blk.warps + blk.warp] + __popc(ballot & lower_lanes));
  }
  __syncthreads();  // visit's writes are visible; tile_counts may be reused
  return total;
}

struct Threshold {
  uint32_t key;    // the k-th largest candidate key
  uint32_t above;  // candidates with a larger key (< k)
  uint32_t equal;  // candidates with exactly this key (above + equal ≥ k)
};

// The k-th largest of key_of(i) over the candidates i < n; requires 1 ≤ k ≤ #candidates.
template <typename KeyOf, typename IsCandidate>
__device__ Threshold kth_largest(const BlockShape& blk, int n, uint32_t k, KeyOf key_of, IsCandidate is_candidate,
                                 Scratch& s) {
  __syncthreads();  // the previous caller may still read s
  for (int j = blk.tid; j < kBins; j += blk.threads) s.hist[0][j] = 0u;
  if (blk.tid == 0) {
    s.prefix = 0u;
    s.remaining = k;
    s.equal = 0u;
  }
  __syncthreads();
#pragma unroll 1
  for (int pass = 0; pass < kPasses; ++pass) {
    const int shift = 32 - kRadixBits * (pass + 1);
    const uint32_t decided = pass == 0 ? 0u : ~0u << (shift + kRadixBits);  // digits already fixed
    // Read before the barrier below, so that warp 0's update after it cannot race with these reads.
    const uint32_t prefix = s.prefix, remaining = s.remaining;
    uint32_t* hist = s.hist[pass & 1];
    // The other buffer was last read by warp 0 before the previous pass's closing barrier, and is next
    // written after this pass's closing barrier.
    for (int j = blk.tid; j < kBins; j += blk.threads) s.hist[(pass + 1) & 1][j] = 0u;
    for (int tile = 0; tile < blk.tiles; ++tile) {
      const int i = tile * blk.threads + blk.tid;
      bool counted = false;
      uint32_t digit = 0;
      if (i < n && is_candidate(i)) {
        const uint32_t key = key_of(i);
        counted = ((key ^ prefix) & decided) == 0u;
        digit = (key >> shift) & (kBins - 1);
      }
      // Tied scores send many lanes to one bin: one atomic per distinct digit in the warp, not per lane.
      const unsigned peers = __match_any_sync(kFullMask, counted ? digit : uint32_t(kBins + blk.lane));
      if (counted && blk.lane == __ffs(peers) - 1) atomicAdd(&hist[digit], uint32_t(__popc(peers)));
    }
    __syncthreads();
    if (blk.warp == 0) {
      // Lane l holds digits 255 − 8l down to 248 − 8l, so lanes in order walk the bins from the top.
      const int top = kBins - 1 - kBinsPerLane * blk.lane;
      uint32_t counts[kBinsPerLane];
      uint32_t lane_total = 0;
#pragma unroll
      for (int j = 0; j < kBinsPerLane; ++j) {
        counts[j] = hist[top - j];
        lane_total += counts[j];
      }
      const uint32_t inclusive = warp_inclusive_sum(lane_total, blk.lane);
      const uint32_t higher_lanes = inclusive - lane_total;  // candidates in bins above this lane's
      // Exactly one lane's range reaches `remaining`: the counts from the top only grow, start below it
      // (at 0) and end at ≥ remaining.
      if (higher_lanes < remaining && remaining <= inclusive) {
        uint32_t higher = higher_lanes, equal = 0;
        int digit = -1;
#pragma unroll
        for (int j = 0; j < kBinsPerLane; ++j) {
          if (digit < 0) {
            if (higher + counts[j] >= remaining) {
              digit = top - j;
              equal = counts[j];
            } else {
              higher += counts[j];
            }
          }
        }
        s.prefix = prefix | (uint32_t(digit) << shift);
        s.remaining = remaining - higher;
        s.equal = equal;
      }
    }
    __syncthreads();
  }
  return {s.prefix, k - s.remaining, s.equal};
}

// selected[i] = is_base(i) || (i is one of the k candidates with the largest keys, ties to the lower
// index), for every i < n. k may be 0. Ends with a barrier.
template <typename KeyOf, typename IsCandidate, typename IsBase>
__device__ void select_largest(const BlockShape& blk, int n, uint32_t k, KeyOf key_of, IsCandidate is_candidate,
                               IsBase is_base, uint8_t* selected, uint32_t* tile_counts, Scratch& s) {
  if (k == 0) {  // block-uniform
    for (int i = blk.tid; i < n; i += blk.threads) selected[i] = is_base(i);
    __syncthreads();
    return;
  }
  const Threshold t = kth_largest(blk, n, k, key_of, is_candidate, s);
  const uint32_t ties_taken = k - t.above;  // 1 ≤ ties_taken ≤ t.equal
  if (ties_taken == t.equal) {              // block-uniform: every tie is in
    for (int i = blk.tid; i < n; i += blk.threads) {
      selected[i] = is_base(i) || (is_candidate(i) && key_of(i) >= t.key);
    }
    __syncthreads();
  } else {  // the lowest-indexed ties_taken of the ties
    scan_in_index_order(
        blk, n, tile_counts, s, [&](int i) { return is_candidate(i) && key_of(i) == t.key; },
        [&](int i, bool tie, uint32_t tie_rank) {
          selected[i] = is_base(i) || (is_candidate(i) && (key_of(i) > t.key || (tie && tie_rank < ties_taken)));
        });
  }
}

// ---- the selection kernel ------------------------------------------------------------------------------

struct SelectParams {
  const void* obj;
  const void* deep;
  const int64_t* always;
  int64_t* out;
  uint8_t* workspace;       // STAGED = false: per-sample working sets, sample_stride bytes apart
  int64_t sample_stride;
  int64_t always_stride;    // elements between samples' always_keep rows; 0: one shared row
  int n, h, w, keep, n_anchor, n_always;
  bool wrap_rows;
};

template <typename T, bool STAGED>
__global__ void __launch_bounds__(kMaxSelectThreads) hiprune_select_kernel(SelectParams p) {
  extern __shared__ __align__(16) uint8_t staged_set[];
  __shared__ Scratch scratch;
  const int n = p.n;
  const BlockShape blk = block_shape(n);
  const int64_t b = blockIdx.x;
  const SampleLayout layout = sample_layout(n, p.n_anchor, int64_t(blk.tiles) * blk.warps);
  uint8_t* set = STAGED ? staged_set : p.workspace + b * p.sample_stride;
  uint32_t* obj_key = reinterpret_cast<uint32_t*>(set + layout.obj_key);
  uint32_t* deep_key = reinterpret_cast<uint32_t*>(set + layout.deep_key);
  uint32_t* anchor_index = reinterpret_cast<uint32_t*>(set + layout.anchor_index);
  uint32_t* anchor_key = reinterpret_cast<uint32_t*>(set + layout.anchor_key);
  uint32_t* tile_counts = reinterpret_cast<uint32_t*>(set + layout.tile_counts);
  uint8_t* selected = set + layout.selected;
  const T* obj = static_cast<const T*>(p.obj) + b * n;
  const T* deep = static_cast<const T*>(p.deep) + b * n;
  int64_t* out = p.out + b * p.keep;

  // 1. keys (coalesced scalar loads: the rows are read once, their alignment is arbitrary)
  for (int i = blk.tid; i < n; i += blk.threads) {
    obj_key[i] = order_key(to_float(obj[i]));
    deep_key[i] = order_key(to_float(deep[i]));
  }
  __syncthreads();

  // 2. anchors: the n_anchor largest obj keys, listed in index order
  auto always_false = [](int) { return false; };
  auto always_true = [](int) { return true; };
  select_largest(blk, n, uint32_t(p.n_anchor), [&](int i) { return obj_key[i]; }, always_true, always_false, selected,
                 tile_counts, scratch);
  scan_in_index_order(
      blk, n, tile_counts, scratch, [&](int i) { return selected[i] != 0; },
      [&](int i, bool anchor, uint32_t pos) {
        if (anchor) {
          anchor_index[pos] = uint32_t(i);
          anchor_key[pos] = obj_key[i];
        }
      });

  // 3. priority words, in the obj key array (its last reader was the list above, before the barrier)
  uint32_t* priority = obj_key;
  for (int i = blk.tid; i < n; i += blk.threads) priority[i] = kRegister;
  __syncthreads();
  const uint32_t tier = 4u * uint32_t(n) + 4u;  // S: a tier holds 4·rank + direction < 4N + 4 values
  const int64_t* always = p.always + b * p.always_stride;
  for (int a = blk.tid; a < p.n_always; a += blk.threads) {
    const int64_t token = always[a];
    if (token >= 0) atomicMin(&priority[token], uint32_t(a));  // -1 pads a per-sample row
  }
  for (int j = blk.tid; j < p.n_anchor; j += blk.threads) {
    // Rank among the anchors: larger key first, then lower index (= lower list position). The list is
    // short (keep·alpha/5) and all lanes read the same entry at once (a broadcast).
    const uint32_t key = anchor_key[j];
    uint32_t rank = 0;
    for (int l = 0; l < p.n_anchor; ++l) {
      const uint32_t other = anchor_key[l];
      rank += (other > key || (other == key && l < j)) ? 1u : 0u;
    }
    const int a = int(anchor_index[j]);
    atomicMin(&priority[a], tier + rank);
    const int row = a / p.w, col = a - row * p.w;
    const uint32_t buffer = 2u * tier + 4u * rank;
    auto mark_neighbour = [&](uint32_t direction, int token, bool inside) {
      if (p.wrap_rows) {  // the official code's flat neighbours, clamped
        token = min(max(token, 0), n - 1);
        inside = true;
      }
      if (inside) atomicMin(&priority[token], buffer + direction);
    };
    mark_neighbour(0, a - p.w, row > 0);        // up
    mark_neighbour(1, a + p.w, row < p.h - 1);  // down
    mark_neighbour(2, a - 1, col > 0);          // left
    mark_neighbour(3, a + 1, col < p.w - 1);    // right
  }
  __syncthreads();

  // 4. structural tokens first, then registers by deep score
  uint32_t mine = 0;
  for (int i = blk.tid; i < n; i += blk.threads) mine += priority[i] != kRegister ? 1u : 0u;
  const uint32_t structural = block_sum(mine);
  const uint32_t keep = uint32_t(p.keep);
  auto is_structural = [&](int i) { return priority[i] != kRegister; };
  if (structural >= keep) {  // block-uniform; the budget ends inside the structural tokens
    select_largest(blk, n, keep, [&](int i) { return ~priority[i]; }, is_structural, always_false, selected,
                   tile_counts, scratch);
  } else {
    select_largest(blk, n, keep - structural, [&](int i) { return deep_key[i]; },
                   [&](int i) { return priority[i] == kRegister; }, is_structural, selected, tile_counts, scratch);
  }

  // 5. ascending compaction: exactly `keep` tokens are selected
  scan_in_index_order(
      blk, n, tile_counts, scratch, [&](int i) { return selected[i] != 0; },
      [&](int i, bool kept, uint32_t pos) {
        if (kept) out[pos] = i;
      });
}

template <typename T>
void select_typed(const HipruneSelectArgs& a, const SelectParams& p, int threads, const SampleLayout& layout,
                  cudaStream_t stream) {
  if (a.workspace != 0) {
    hiprune_select_kernel<T, false><<<unsigned(a.batch), threads, 0, stream>>>(p);
  } else {
    auto kernel = hiprune_select_kernel<T, true>;
    // Always opt in: without it the dynamic limit is 48 KB *minus the kernel's static shared memory*, so
    // a test against 48 KB alone would let sizes just under it fail to launch. staged_limit() checked the size.
    allow_all_dynamic_shared_memory(reinterpret_cast<const void*>(kernel), a.device,
                                    "cudaFuncSetAttribute(hiprune_select shared memory)");
    kernel<<<unsigned(a.batch), threads, size_t(layout.bytes), stream>>>(p);
  }
  check_launch("hiprune_select kernel launch");
}

// Largest dynamic shared memory the staged kernel may use on `device`.
int64_t staged_limit(int device) {
  int optin = 0;
  cuda_check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute(shared memory per block)");
  cudaFuncAttributes attr;
  cuda_check(cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(hiprune_select_kernel<float, true>)),
             "cudaFuncGetAttributes(hiprune_select)");
  return int64_t(optin) - int64_t(attr.sharedSizeBytes);
}

// ---- prune_tokens: row gather and scatter --------------------------------------------------------------

constexpr int kMoveThreads = 256;

enum class Move { kGather, kScatterStore, kScatterAdd };

template <typename T> __device__ __forceinline__ void atomic_add_pair(T* p, const T* v) {
  atomicAdd(p, v[0]);
  atomicAdd(p + 1, v[1]);
}
template <> __device__ __forceinline__ void atomic_add_pair<__half>(__half* p, const __half* v) {
  atomicAdd(reinterpret_cast<__half2*>(p), __halves2half2(v[0], v[1]));
}
template <> __device__ __forceinline__ void atomic_add_pair<__nv_bfloat16>(__nv_bfloat16* p,
                                                                          const __nv_bfloat16* v) {
  atomicAdd(reinterpret_cast<__nv_bfloat162*>(p), __halves2bfloat162(v[0], v[1]));
}

template <typename T, int VEC>
__device__ __forceinline__ void atomic_add_pack(T* dst, const Pack<T, VEC>& pk) {
  if constexpr (VEC % 2 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 2) atomic_add_pair(dst + j, pk.v + j);  // 16-byte packs: pairs are aligned
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) atomicAdd(dst + j, pk.v[j]);
  }
}

// Block (lanes, rows): threadIdx.y picks an output row (b, j) of the flattened (batch·keep) rows,
// threadIdx.x walks its `packs` packs of VEC elements.
template <typename T, int VEC, Move MOVE>
__global__ void __launch_bounds__(kMoveThreads)
    move_rows_kernel(const T* __restrict__ src, T* __restrict__ dst, const int64_t* __restrict__ index, int64_t keep,
                     int64_t rows, int64_t packs, int64_t src_sb, int64_t src_sr, int64_t dst_sb, int64_t dst_sr) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  const int64_t b = row / keep, j = row - b * keep;
  const int64_t token = index[row];
  const T* from = MOVE == Move::kGather ? src + b * src_sb + token * src_sr : src + b * src_sb + j * src_sr;
  T* to = MOVE == Move::kGather ? dst + b * dst_sb + j * dst_sr : dst + b * dst_sb + token * dst_sr;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const Pack<T, VEC> pk = reinterpret_cast<const Pack<T, VEC>*>(from)[p];
    if constexpr (MOVE == Move::kScatterAdd) {
      atomic_add_pack<T, VEC>(to + p * VEC, pk);
    } else {
      reinterpret_cast<Pack<T, VEC>*>(to)[p] = pk;
    }
  }
}

template <typename T, Move MOVE>
void move_typed(const PruneTokensArgs& a) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorizable = a.channels % kVec == 0 && a.src % 16 == 0 && a.dst % 16 == 0 &&
                            a.src_batch_stride % kVec == 0 && a.src_row_stride % kVec == 0 &&
                            a.dst_batch_stride % kVec == 0 && a.dst_row_stride % kVec == 0;
  const int64_t rows = a.batch * a.keep;
  auto launch = [&](auto vec) {
    constexpr int V = decltype(vec)::value;
    const int64_t packs = a.channels / V;
    int lanes = 1;
    while (lanes < packs && lanes < kMoveThreads) lanes *= 2;
    const int rows_per_block = kMoveThreads / lanes;
    const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
    if (blocks > INT_MAX) throw std::invalid_argument("zigspark._C: prune_tokens: batch·keep is too large");
    move_rows_kernel<T, V, MOVE><<<unsigned(blocks), dim3(lanes, rows_per_block), 0,
                                   reinterpret_cast<cudaStream_t>(a.stream)>>>(
        reinterpret_cast<const T*>(a.src), reinterpret_cast<T*>(a.dst), reinterpret_cast<const int64_t*>(a.index),
        a.keep, rows, packs, a.src_batch_stride, a.src_row_stride, a.dst_batch_stride, a.dst_row_stride);
  };
  if (vectorizable) {
    launch(std::integral_constant<int, kVec>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
  check_launch(MOVE == Move::kGather ? "prune_tokens forward kernel launch" : "prune_tokens backward kernel launch");
}

void check_prune_args(const PruneTokensArgs& a) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("zigspark._C: prune_tokens: " + what); };
  if (a.batch < 0 || a.tokens < 0 || a.keep < 0 || a.channels < 0) fail("negative size");
  if (a.keep > 0 && a.tokens == 0) fail("keep > 0 indices into 0 tokens");
  if (a.batch * a.keep * a.channels > 0 && (a.src == 0 || a.dst == 0 || a.index == 0)) fail("null pointer");
}

}  // namespace

int64_t hiprune_select_workspace_bytes(int64_t batch, int64_t n, int64_t n_anchor, int device,
                                       bool force_workspace) {
  if (batch <= 0 || n <= 0) return 0;
  const SampleLayout layout = host_layout(n, std::max<int64_t>(0, std::min(n_anchor, n)));
  if (!force_workspace) {
    DeviceGuard guard(device);
    if (layout.bytes <= staged_limit(device)) return 0;
  }
  return batch * layout.bytes;
}

void hiprune_select(const HipruneSelectArgs& a) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("zigspark._C: hiprune_select: " + what); };
  if (a.batch < 0) fail("negative batch");
  if (a.batch == 0) return;
  if (a.n < 1 || a.n > kMaxTokens) fail("N must be in [1, 2^28], got " + std::to_string(a.n));
  if (a.h < 1 || a.w < 1 || a.h * a.w != a.n) fail("grid h·w must equal N");
  if (a.keep < 1 || a.keep > a.n) fail("keep must be in [1, N], got " + std::to_string(a.keep));
  if (a.n_anchor < 1 || a.n_anchor > a.n) fail("n_anchor must be in [1, N], got " + std::to_string(a.n_anchor));
  if (a.n_always < 0 || a.n_always > a.keep) fail("n_always must be in [0, keep]");
  if (a.always_sample_stride < 0 || (a.always_sample_stride > 0 && a.always_sample_stride < a.n_always))
    fail("always_sample_stride must be 0 (one shared row) or at least n_always");
  if (a.batch > INT_MAX) fail("batch exceeds 2^31−1");
  if (a.obj == 0 || a.deep == 0 || a.out == 0 || (a.n_always > 0 && a.always == 0)) fail("null pointer");
  if (a.dtype != int(DType::Float32) && a.dtype != int(DType::Float16) && a.dtype != int(DType::BFloat16))
    fail(std::string("unsupported dtype ") + dtype_name(a.dtype) + " (takes float32, float16, bfloat16)");
  const SampleLayout layout = host_layout(a.n, a.n_anchor);
  if (a.workspace != 0 && (a.workspace % 16 != 0 || a.workspace_bytes < a.batch * layout.bytes))
    fail("workspace must be 16-byte aligned and hold hiprune_select_workspace_bytes(...) bytes");

  DeviceGuard guard(a.device);
  if (a.workspace == 0 && layout.bytes > staged_limit(a.device))
    fail("a sample needs " + std::to_string(layout.bytes) +
         " bytes of shared memory, more than this GPU has; pass the workspace hiprune_select_workspace_bytes asks for");
  SelectParams p;
  p.obj = reinterpret_cast<const void*>(a.obj);
  p.deep = reinterpret_cast<const void*>(a.deep);
  p.always = reinterpret_cast<const int64_t*>(a.always);
  p.out = reinterpret_cast<int64_t*>(a.out);
  p.workspace = reinterpret_cast<uint8_t*>(a.workspace);
  p.sample_stride = layout.bytes;
  p.n = int(a.n);
  p.h = int(a.h);
  p.w = int(a.w);
  p.keep = int(a.keep);
  p.n_anchor = int(a.n_anchor);
  p.n_always = int(a.n_always);
  p.always_stride = a.always_sample_stride;
  p.wrap_rows = a.wrap_rows;
  const int threads = select_threads(a.n);
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  switch (a.dtype) {
    case int(DType::Float32): select_typed<float>(a, p, threads, layout, stream); break;
    case int(DType::Float16): select_typed<__half>(a, p, threads, layout, stream); break;
    default: select_typed<__nv_bfloat16>(a, p, threads, layout, stream); break;
  }
}

void prune_tokens_forward(const PruneTokensArgs& a) {
  check_prune_args(a);
  if (a.batch * a.keep * a.channels == 0) return;
  DeviceGuard guard(a.device);
  dispatch_float_types(a.dtype, [&](auto tag) { move_typed<decltype(tag), Move::kGather>(a); });
}

void prune_tokens_backward(const PruneTokensArgs& a) {
  check_prune_args(a);
  if (a.batch * a.keep * a.channels == 0) return;
  DeviceGuard guard(a.device);
  dispatch_float_types(a.dtype, [&](auto tag) {
    if (a.unique_index) {
      move_typed<decltype(tag), Move::kScatterStore>(a);
    } else {
      move_typed<decltype(tag), Move::kScatterAdd>(a);
    }
  });
}

}  // namespace zigspark
