// A CPU emulator for the subset of CUDA that zigspark's kernels use, so that the CUDA kernels run (slowly, on
// tiny shapes) in the `emulate` test tier on a machine without a GPU. It is force-included (g++ -include)
// before every csrc/*.cu translation unit, which scripts/build_emulator.py compiles as host C++.
//
// Execution model. A launch runs its blocks one after another. Each CUDA thread of a block is a fiber (a
// ucontext with its own stack) on one OS thread; a fiber runs until it reaches a synchronisation point and
// then yields to the block's scheduler, which runs one warp at a time as far as it gets, the warps in a
// random order each round, so that a warp racing ahead past a missing __syncthreads corrupts what another
// warp has yet to read:
//   * __syncthreads(): waits until every thread of the block that has not exited has arrived;
//   * warp collectives (__shfl*_sync, __ballot_sync, __match_any_sync, __syncwarp, mma.sync, ldmatrix):
//     wait until every lane named in the mask has arrived with the same mask, then each lane computes its
//     result from a snapshot of all the lanes' operands.
// A lane named in a mask that has exited, or one that waits for a lane that never arrives, is an error
// (undefined behaviour on the hardware), reported as a launch failure instead of a hang. `__shared__`
// becomes a function-local static, shared by all fibers; dynamic shared memory is filled with 0xFF bytes
// (NaN) at the start of every block, so a read before a write shows. Atomics are
// plain read-modify-writes (there is one OS thread). Launch-configuration limits are Hopper's (1024
// threads, 48 KiB dynamic shared memory unless raised with cudaFuncSetAttribute, 227 KiB opt-in).
//
// What it cannot show: timing, occupancy, memory-model races between warps that the fiber order happens to
// hide, register spills, or anything the real compiler does differently. A kernel that passes here has
// correct indexing and arithmetic for the shapes tested; it is still unverified on hardware.
#pragma once

// The real CUDA headers give the types (dim3, float4, __half, cudaError_t, ...) and host-side conversions.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __constant__
#define __global__
#define __device__
#define __host__
#define __constant__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)
#define ZIGSPARK_EMULATED 1
#define __CUDA_ARCH__ 900

namespace emu {

// ---- the scheduler (emulator.cpp) ----
struct Indices {
  uint3 thread, block;
  dim3 block_dim, grid_dim;
};
extern Indices current;  // the running fiber's indices

// Runs body once per thread of every block of the grid; a failure is left for cudaGetLastError, as on a GPU.
void run_grid(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body);

void sync_block();
// Rendezvous of the lanes of `mask` in the caller's warp: deposits `bytes` of `operand`, waits for the others,
// and returns all 32 lanes' operands (slot i = lane i; lanes outside the mask are left zero).
std::shared_ptr<const unsigned char[]> warp_rendezvous(unsigned mask, const void* operand, size_t bytes);
unsigned lane_id();
void* dynamic_shared_memory();
[[noreturn]] void fail(const char* what);

template <typename... P> struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <typename... A> void operator()(A&&... args) const {
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    auto fn = kernel;
    run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem, [&] { std::apply(fn, params); });
  }
};

// kernel<<<grid, block, smem, stream>>>(args) is rewritten to emu::launch(kernel, grid, block, smem, stream)(args).
template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return Launch<P...>{kernel, grid, block, smem};
}

template <typename V> std::array<V, 32> gather(unsigned mask, V v) {
  static_assert(std::is_trivially_copyable_v<V>);
  auto all = warp_rendezvous(mask, &v, sizeof(V));
  std::array<V, 32> out;
  std::memcpy(out.data(), all.get(), sizeof(V) * 32);
  return out;
}

inline bool in_mask(unsigned mask, int lane) { return (mask >> lane) & 1u; }

// PTX shfl.sync: lane j's value if j is a member of the mask and inside [min_lane, max_lane], own value if
// j is outside the segment; reading a lane outside the mask is undefined on the hardware, an error here.
template <typename V> V shuffle(unsigned mask, V v, int j, bool ok) {
  const auto all = gather(mask, v);
  if (!ok) return v;
  if (!in_mask(mask, j)) fail("warp shuffle reads a lane that is not in the mask");
  return all[j];
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 with D = C; layouts from the PTX ISA,
// "Matrix Fragments for mma.m16n8k16 with floating point type": lane = 4·group + t,
//   A (16×16): a[0] = (group, 2t..2t+1), a[1] = (group+8, 2t..), a[2] = (group, 2t+8..), a[3] = (group+8, 2t+8..)
//   B (16×8, k × n): b0 = (k 2t..2t+1, n group), b1 = (k 2t+8..2t+9, n group)
//   C (16×8): c[0..1] = (group, 2t..2t+1), c[2..3] = (group+8, 2t..2t+1)
// with the element of lower index in the low 16 bits of each 32-bit register.
template <typename T> float b16_to_float(uint16_t bits) {
  T x;
  std::memcpy(&x, &bits, 2);
  if constexpr (std::is_same_v<T, __half>) return __half2float(x);
  else return __bfloat162float(x);
}

struct MmaOperands {
  uint32_t a[4], b[2];
};

template <typename T> void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  MmaOperands mine{{a[0], a[1], a[2], a[3]}, {b0, b1}};
  const auto all = gather(0xffffffffu, mine);
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    const MmaOperands& op = all[lane];
    const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
    for (int r = 0; r < 4; ++r) {
      A[rows[r]][cols[r]] = b16_to_float<T>(uint16_t(op.a[r] & 0xffffu));
      A[rows[r]][cols[r] + 1] = b16_to_float<T>(uint16_t(op.a[r] >> 16));
    }
    for (int r = 0; r < 2; ++r) {
      B[2 * t + 8 * r][g] = b16_to_float<T>(uint16_t(op.b[r] & 0xffffu));
      B[2 * t + 8 * r + 1][g] = b16_to_float<T>(uint16_t(op.b[r] >> 16));
    }
  }
  const int lane = int(lane_id()), g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc = std::fma(A[row][k], B[k][col], acc);
    c[i] = acc;
  }
}

// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16: lanes 8i..8i+7 give the addresses of rows 0..7 of 8×8
// matrix i (16 bytes each); with .trans, lane 4·group + t receives in r[i] the elements (row 2t, col group)
// (low half) and (row 2t+1, col group) (high half) of matrix i.
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const auto rows = gather(0xffffffffu, smem);
  const int lane = int(lane_id()), g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    std::memcpy(&lo, static_cast<const unsigned char*>(rows[8 * i + 2 * t]) + 2 * g, 2);
    std::memcpy(&hi, static_cast<const unsigned char*>(rows[8 * i + 2 * t + 1]) + 2 * g, 2);
    r[i] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
}

}  // namespace emu

// ---- the device-side API the kernels call ----
#define threadIdx (::emu::current.thread)
#define blockIdx (::emu::current.block)
#define blockDim (::emu::current.block_dim)
#define gridDim (::emu::current.grid_dim)

inline void __syncthreads() { ::emu::sync_block(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::emu::gather(mask, 0); }

template <typename V> V __shfl_sync(unsigned mask, V v, int src, int width = 32) {
  const int lane = int(::emu::lane_id()), lo = lane & ~(width - 1);
  return ::emu::shuffle(mask, v, lo + (src & (width - 1)), true);
}
template <typename V> V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = 32) {
  const int lane = int(::emu::lane_id()), j = lane ^ lane_mask;
  return ::emu::shuffle(mask, v, j, j <= ((lane & ~(width - 1)) | (width - 1)));
}
template <typename V> V __shfl_up_sync(unsigned mask, V v, unsigned delta, int width = 32) {
  const int lane = int(::emu::lane_id()), j = lane - int(delta);
  return ::emu::shuffle(mask, v, j, j >= (lane & ~(width - 1)));
}
template <typename V> V __shfl_down_sync(unsigned mask, V v, unsigned delta, int width = 32) {
  const int lane = int(::emu::lane_id()), j = lane + int(delta);
  return ::emu::shuffle(mask, v, j, j <= ((lane & ~(width - 1)) | (width - 1)));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  const auto all = ::emu::gather(mask, predicate != 0);
  unsigned bits = 0;
  for (int i = 0; i < 32; ++i) bits |= (::emu::in_mask(mask, i) && all[i]) ? (1u << i) : 0u;
  return bits;
}
template <typename V> unsigned __match_any_sync(unsigned mask, V v) {
  const auto all = ::emu::gather(mask, v);
  unsigned bits = 0;
  for (int i = 0; i < 32; ++i) bits |= (::emu::in_mask(mask, i) && all[i] == v) ? (1u << i) : 0u;
  return bits;
}

// CUDA's device min/max overloads (math_functions.h) for the integer and floating types.
#define ZIGSPARK_EMULATED_MINMAX(T)                      \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
ZIGSPARK_EMULATED_MINMAX(int)
ZIGSPARK_EMULATED_MINMAX(unsigned)
ZIGSPARK_EMULATED_MINMAX(long)
ZIGSPARK_EMULATED_MINMAX(unsigned long)
ZIGSPARK_EMULATED_MINMAX(long long)
ZIGSPARK_EMULATED_MINMAX(unsigned long long)
#undef ZIGSPARK_EMULATED_MINMAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(unsigned u) { float x; std::memcpy(&x, &u, 4); return x; }
inline int __float_as_int(float x) { int u; std::memcpy(&u, &x, 4); return u; }
inline float __int_as_float(int u) { float x; std::memcpy(&x, &u, 4); return x; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return std::fmin(std::fmax(x, 0.f), 1.f); }
template <typename V> V __ldg(const V* p) { return *p; }

template <typename V> V atomicAdd(V* p, V v) { V old = *p; *p = old + v; return old; }
template <typename V> V atomicMin(V* p, V v) { V old = *p; *p = v < old ? v : old; return old; }
template <typename V> V atomicMax(V* p, V v) { V old = *p; *p = v > old ? v : old; return old; }
template <typename V> V atomicExch(V* p, V v) { V old = *p; *p = v; return old; }
template <typename V> V atomicCAS(V* p, V expected, V v) { V old = *p; if (old == expected) *p = v; return old; }
