// The one binding file of zigspark._C. It includes no torch header: Python passes raw device pointers
// (tensor.data_ptr()), sizes, strides, a dtype code, the device index and the stream handle, after it
// has validated and allocated everything. Errors come back as RuntimeError with CUDA's message.
#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

#include <string>

#include "common/dtype.h"
#include "stat_topk/stat_topk.h"

#ifndef ZIGSPARK_ARCHS
#define ZIGSPARK_ARCHS ""
#endif

namespace py = pybind11;
using namespace zigspark;

namespace {

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "zigspark CUDA kernels (torch-independent; see zigspark.cuda_ops for the Python side)";
  m.def("compiled_archs", [] { return std::string(ZIGSPARK_ARCHS); },
        "';'-separated architectures compiled into this module (sm_XX = machine code, compute_XX = PTX)");
  m.def("device_count", &device_count, "CUDA devices visible to zigspark's (static) CUDA runtime");
  m.def("cuda_runtime_version", &runtime_version, "CUDA runtime version linked into _C, e.g. 13000");
  m.def("cuda_driver_version", &driver_version, "CUDA driver version, 0 when no driver is loaded");

  m.def(
      "stat_topk_forward",
      [](uintptr_t x, uintptr_t y, uintptr_t mask, uintptr_t mean, uintptr_t std, int64_t rows, int64_t d,
         int64_t x_row_stride, int64_t y_row_stride, int64_t mask_row_stride, int dtype, double z, int device,
         uintptr_t stream) {
        py::gil_scoped_release release;
        stat_topk_forward({x, y, mask, mean, std, rows, d, x_row_stride, y_row_stride, mask_row_stride, dtype, z,
                           device, stream});
      },
      py::arg("x"), py::arg("y"), py::arg("mask"), py::arg("mean"), py::arg("std"), py::arg("rows"), py::arg("d"),
      py::arg("x_row_stride"), py::arg("y_row_stride"), py::arg("mask_row_stride"), py::arg("dtype"), py::arg("z"),
      py::arg("device"), py::arg("stream"));

  m.def(
      "stat_topk_backward",
      [](uintptr_t grad_y, uintptr_t x, uintptr_t mean, uintptr_t std, uintptr_t grad_x, int64_t rows, int64_t d,
         int64_t grad_y_row_stride, int64_t x_row_stride, int64_t grad_x_row_stride, int dtype, double z, int device,
         uintptr_t stream) {
        py::gil_scoped_release release;
        stat_topk_backward({grad_y, x, mean, std, grad_x, rows, d, grad_y_row_stride, x_row_stride,
                            grad_x_row_stride, dtype, z, device, stream});
      },
      py::arg("grad_y"), py::arg("x"), py::arg("mean"), py::arg("std"), py::arg("grad_x"), py::arg("rows"),
      py::arg("d"), py::arg("grad_y_row_stride"), py::arg("x_row_stride"), py::arg("grad_x_row_stride"),
      py::arg("dtype"), py::arg("z"), py::arg("device"), py::arg("stream"));
}
