// Host-side error handling: every CUDA call and launch is checked and becomes a C++ exception that
// pybind11 turns into a Python RuntimeError carrying CUDA's own message.
#pragma once

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace zigspark {

inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("zigspark._C: ") + what + " failed: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

// Our cudart is linked statically, so it keeps its own "current device"; set it to the tensor's device
// before every launch. Raises a clear error on a machine without a GPU.
inline void check_device(int device) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();  // clear the sticky "no device" error
    throw std::runtime_error(std::string("zigspark._C: no CUDA device is available (") +
                             (err != cudaSuccess ? cudaGetErrorString(err) : "0 devices") +
                             "); run on a machine with an NVIDIA GPU, or use backend='reference'");
  }
  if (device < 0 || device >= count) {
    throw std::runtime_error("zigspark._C: device index " + std::to_string(device) + " out of range (" +
                             std::to_string(count) + " devices)");
  }
}

// Makes `device` current for the launches in its scope and restores the previous device afterwards:
// cudaSetDevice changes the context current to the thread, which torch's own runtime shares, so leaving
// it changed would silently move torch's later work to another GPU.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_device(device);
    cuda_check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) cuda_check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int current = -1;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

inline void check_launch(const char* kernel) { cuda_check(cudaGetLastError(), kernel); }

// Lets `kernel` use all the dynamic shared memory a block can have on `device` beyond its static shared
// memory. The limit belongs to the kernel, process-wide, and the bindings release the GIL: setting it to
// each launch's own size would let a concurrent launch of a smaller shape lower it under a larger one
// between the set and the launch. Always setting the same maximum is safe under any interleaving. Callers
// check their size against that maximum first.
inline void allow_all_dynamic_shared_memory(const void* kernel, int device, const char* what) {
  int optin = 0;
  cuda_check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute(shared memory per block)");
  cudaFuncAttributes attr;
  cuda_check(cudaFuncGetAttributes(&attr, kernel), what);
  cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  optin - int(attr.sharedSizeBytes)),
             what);
}

}  // namespace zigspark
