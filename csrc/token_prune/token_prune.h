// Host entry points of the HiPrune token selection and the token gather (prune_tokens). Pure C++: no CUDA
// and no torch types, so the pybind11 binding stays a thin translation of Python integers into these structs.
#pragma once

#include <cstdint>

namespace zigspark {

// obj and deep: (batch, n) contiguous scores in `dtype` (float32, float16 or bfloat16; NaN-free: the Python
// side rejects NaN). always: int64 rows of n_always indices in [0, n) or -1 (padding: skipped), sample b's
// row at always + b·always_sample_stride (0: one row shared by every sample); 0 when n_always is 0. out: (batch, keep) int64, written completely (ascending indices per sample).
// workspace: 0 to stage each sample in shared memory, or a device buffer of at least
// hiprune_select_workspace_bytes(batch, n, n_anchor, device, false) bytes (any 16-byte aligned buffer of
// the size given with force_workspace=true forces the global-memory path, for tests).
struct HipruneSelectArgs {
  uintptr_t obj = 0, deep = 0, always = 0, out = 0, workspace = 0;
  int64_t workspace_bytes = 0;
  int64_t batch = 0, n = 0, h = 0, w = 0, keep = 0, n_anchor = 0, n_always = 0, always_sample_stride = 0;
  bool wrap_rows = false;
  int dtype = 0;  // DType code of obj and deep
  int device = 0;
  uintptr_t stream = 0;  // cudaStream_t
};

// Bytes of global workspace hiprune_select needs for this problem: 0 when a sample's working set fits in
// the device's shared memory (the fast path) and force_workspace is false.
int64_t hiprune_select_workspace_bytes(int64_t batch, int64_t n, int64_t n_anchor, int device, bool force_workspace);
void hiprune_select(const HipruneSelectArgs& args);

// prune_tokens forward: dst[b, j, :] = src[b, index[b, j], :].
// prune_tokens backward: dst[b, index[b, j], :] (+)= src[b, j, :] into a zero-filled dst; a plain store when
// unique_index (each index at most once per sample, as hiprune_select guarantees), atomics otherwise.
// src and dst rows have a contiguous last dimension of `channels` elements; strides are in elements (a batch
// stride of 0 broadcasts one sample, e.g. expanded positions). index: (batch, keep) int64 contiguous, every
// entry in [0, tokens) (checked by the Python side).
struct PruneTokensArgs {
  uintptr_t src = 0, index = 0, dst = 0;
  int64_t batch = 0, tokens = 0, keep = 0, channels = 0;
  int64_t src_batch_stride = 0, src_row_stride = 0, dst_batch_stride = 0, dst_row_stride = 0;
  bool unique_index = true;  // backward only
  int dtype = 0;             // DType code of src and dst (all four float types)
  int device = 0;
  uintptr_t stream = 0;
};

void prune_tokens_forward(const PruneTokensArgs& args);
void prune_tokens_backward(const PruneTokensArgs& args);

}  // namespace zigspark
