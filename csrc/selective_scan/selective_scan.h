// Host entry points of the selective scan kernels. Pure C++ (no CUDA, no torch types).
#pragma once

#include <cstdint>

#include "common/order.cuh"

namespace zigspark {

struct SelectiveScanShape {
  int64_t batch = 0, dim = 0, length = 0;
  int dstate = 0;      // N
  int64_t groups = 1;  // G of grouped B/C
  int64_t chunks = 0;  // ceil(length / selective_scan_chunk())
};

// All tensors contiguous. u, delta, z, B, C, out, dout, dz: the dtype code `dtype`; A, D, delta_bias,
// last_state, checkpoints, dlast and every other gradient buffer: float32. Unused pointers are 0.
struct SelectiveScanParams {
  SelectiveScanShape shape;
  uintptr_t u = 0, delta = 0, A = 0, B = 0, C = 0, D = 0, z = 0, delta_bias = 0;
  uintptr_t out = 0, last_state = 0, checkpoints = 0;   // forward outputs (checkpoints: batch, dim, chunks, N)
  uintptr_t dout = 0, dlast = 0;                        // backward inputs
  uintptr_t du = 0, ddelta = 0, dA = 0, dB = 0, dC = 0, dD = 0, dz = 0;  // backward outputs (see below)
  int b_mode = 0, c_mode = 0;  // 0 constant (dim, N), 1 per step (batch, N, L), 2 grouped (batch, G, N, L)
  bool delta_softplus = false;
  int dtype = 0;
  OrderArgs order;
  int device = 0;
  uintptr_t stream = 0;
};
// Backward outputs: du, ddelta (batch, dim, L) float32; dA (batch, dim, N) per batch; dB/dC (batch, dim, N)
// per batch for constant B/C, else B/C's shape, zero-filled by the caller (atomically accumulated); dD
// (batch, dim); dz like z.

int selective_scan_chunk();  // steps per chunk (and per checkpoint)
void selective_scan_forward(const SelectiveScanParams& params);
void selective_scan_backward(const SelectiveScanParams& params);

}  // namespace zigspark
