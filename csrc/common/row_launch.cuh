// Launch configuration of "one block per row" kernels, shared by the row-wise ops.
//
// A row whose elements fit in registers (at most kMaxItems per thread at up to 1024 threads) runs a
// *resident* kernel instantiated for CHUNKS vector packs per thread; a longer or unaligned row runs a
// *streaming* kernel with vector width kVec (16-byte packs) or 1 (scalar).
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

namespace zigspark {

constexpr int kMaxThreads = 1024;

inline bool aligned_to(const void* p, int bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// True when every row of every operand starts on a 16-byte boundary and d is a multiple of kVec, so that
// rows can be moved in 16-byte packs. A bool mask (one byte per element) needs kVec-byte alignment.
template <int kVec>
bool rows_vectorizable(int64_t d, std::initializer_list<std::pair<const void*, int64_t>> rows,
                       const void* mask = nullptr, int64_t mask_stride = 0) {
  if (d % kVec != 0) return false;
  for (auto [ptr, stride] : rows) {
    if (!aligned_to(ptr, 16) || stride % kVec != 0) return false;
  }
  return mask == nullptr || (aligned_to(mask, kVec) && mask_stride % kVec == 0);
}

// Threads covering d elements at `per_thread` each: a multiple of 32, between 32 and 1024.
inline int threads_for(int64_t d, int per_thread) {
  int64_t t = (d + per_thread - 1) / per_thread;
  t = (t + 31) / 32 * 32;
  return int(std::min<int64_t>(std::max<int64_t>(t, 32), kMaxThreads));
}

// Calls resident(integral_constant<CHUNKS>, threads) for the smallest power-of-two CHUNKS that covers the
// row, or streaming(integral_constant<VEC>, threads) when the row is too long or not vectorizable.
template <int kVec, int kMaxItems, typename Resident, typename Streaming>
void launch_rows(int64_t d, bool vectorizable, Resident&& resident, Streaming&& streaming) {
  bool launched = false;
  auto try_chunks = [&](auto chunks) {
    constexpr int C = decltype(chunks)::value;
    if constexpr (kVec * C <= kMaxItems) {
      if (!launched && vectorizable && d <= int64_t(kMaxThreads) * kVec * C) {
        resident(chunks, threads_for(d, kVec * C));
        launched = true;
      }
    }
  };
  try_chunks(std::integral_constant<int, 1>{});
  try_chunks(std::integral_constant<int, 2>{});
  try_chunks(std::integral_constant<int, 4>{});
  try_chunks(std::integral_constant<int, 8>{});
  if (launched) return;
  if (vectorizable) {
    streaming(std::integral_constant<int, kVec>{}, threads_for(d, kVec));
  } else {
    streaming(std::integral_constant<int, 1>{}, threads_for(d, 1));
  }
}

}  // namespace zigspark
