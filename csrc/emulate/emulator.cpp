// The emulator's scheduler (fibers, barriers, warp rendezvous) and the few CUDA runtime calls zigspark makes.
// See emulator.h for the execution model.
#include "emulate/emulator.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace emu {

Indices current;

namespace {

constexpr size_t kStackBytes = 512 * 1024;  // per fiber; the lowest page is a guard page
constexpr int kMaxThreads = 1024;
constexpr int kDefaultDynamicSmem = 48 * 1024;
constexpr int kOptinDynamicSmem = 227 * 1024;  // Hopper: cudaDevAttrMaxSharedMemoryPerBlockOptin
constexpr size_t kMaxOperandBytes = 64;

enum class State { Runnable, AtBarrier, AtWarp, Done };

struct Fiber {
  ucontext_t context;
  State state = State::Runnable;
  uint3 thread;
  unsigned linear = 0;
  unsigned warp_mask = 0;
  size_t operand_bytes = 0;
  unsigned char operand[kMaxOperandBytes];
  std::shared_ptr<const unsigned char[]> gathered;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  const std::function<void()>* body = nullptr;
  Fiber* running = nullptr;
  unsigned live = 0, at_barrier = 0;
  std::string error;
  std::vector<unsigned char> dynamic_smem;
};

Block* block_ = nullptr;
std::vector<char*> stacks_;
std::map<const void*, int> max_dynamic_smem_;
cudaError_t last_error_ = cudaSuccess;
// The warp order of every round; ZIGSPARK_EMULATOR_SEED varies it (the default is fixed: reproducible runs).
std::mt19937 rng_(std::getenv("ZIGSPARK_EMULATOR_SEED") ? std::strtoul(std::getenv("ZIGSPARK_EMULATOR_SEED"), nullptr, 10)
                                                         : 20261202u);
std::string last_message_;

char* stack(size_t i) {
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  while (stacks_.size() <= i) {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    mprotect(p, page, PROT_NONE);  // a fiber that overflows its stack faults instead of corrupting another's
    stacks_.push_back(static_cast<char*>(p));
  }
  return stacks_[i];
}

Fiber& running() {
  if (!block_ || !block_->running) throw std::logic_error("zigspark emulator: device function called outside a launch");
  return *block_->running;
}

void yield() {
  Fiber& f = running();
  swapcontext(&f.context, &block_->scheduler);
}

void release_barrier() {
  for (Fiber& f : block_->fibers)
    if (f.state == State::AtBarrier) f.state = State::Runnable;
  block_->at_barrier = 0;
}

std::string describe(const Fiber& f) {
  return "thread (" + std::to_string(f.thread.x) + "," + std::to_string(f.thread.y) + "," +
         std::to_string(f.thread.z) + ") of block (" + std::to_string(current.block.x) + "," +
         std::to_string(current.block.y) + "," + std::to_string(current.block.z) + ")";
}

// A lane that exits while lanes of its warp wait for it in a collective can never be matched.
void check_exit_against_waiters(const Fiber& gone) {
  const unsigned base = gone.linear & ~31u, lane = gone.linear & 31u;
  for (unsigned i = base; i < base + 32 && i < block_->fibers.size(); ++i) {
    const Fiber& f = block_->fibers[i];
    if (f.state == State::AtWarp && in_mask(f.warp_mask, int(lane)))
      throw std::runtime_error("warp collective: " + describe(f) + " waits for lane " + std::to_string(lane) +
                               ", which has exited");
  }
}

void fiber_main() {
  Block& b = *block_;
  Fiber& f = *b.running;
  try {
    (*b.body)();
  } catch (const std::exception& e) {
    if (b.error.empty()) b.error = describe(f) + ": " + e.what();
  }
  f.state = State::Done;
  --b.live;
  if (b.error.empty()) {
    try {
      check_exit_against_waiters(f);
    } catch (const std::exception& e) {
      b.error = e.what();
    }
  }
  if (b.at_barrier > 0 && b.at_barrier == b.live) release_barrier();
  // returning resumes the scheduler (uc_link)
}

void run_block(Block& b, dim3 block) {
  const unsigned threads = block.x * block.y * block.z;
  b.fibers.resize(threads);
  for (unsigned i = 0; i < threads; ++i) {
    Fiber& f = b.fibers[i];
    f.linear = i;
    f.thread = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
    getcontext(&f.context);
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    f.context.uc_stack.ss_sp = stack(i) + page;
    f.context.uc_stack.ss_size = kStackBytes - page;
    f.context.uc_link = &b.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  b.live = threads;
  // Warps run one at a time, each as far as it can go (until all its threads wait at __syncthreads or have
  // exited), in a fresh random order every round. So one warp runs ahead into the next phase of the kernel
  // before another has finished reading the last one: a missing __syncthreads shows as a wrong result.
  const unsigned warps = (threads + 31) / 32;
  std::vector<unsigned> order(warps);
  for (unsigned w = 0; w < warps; ++w) order[w] = w;
  while (b.live > 0 && b.error.empty()) {
    std::shuffle(order.begin(), order.end(), rng_);
    bool ran = false;
    for (unsigned w : order) {
      for (bool progressed = true; progressed && b.error.empty();) {
        progressed = false;
        for (unsigned i = 32 * w; i < std::min(threads, 32 * w + 32); ++i) {
          Fiber& f = b.fibers[i];
          if (f.state != State::Runnable) continue;
          progressed = ran = true;
          b.running = &f;
          current.thread = f.thread;
          swapcontext(&b.scheduler, &f.context);
          b.running = nullptr;
          if (!b.error.empty()) break;
        }
      }
      if (!b.error.empty()) break;
    }
    if (!ran && b.error.empty()) {
      unsigned at_warp = 0;
      for (const Fiber& f : b.fibers) at_warp += f.state == State::AtWarp;
      b.error = "deadlock in block (" + std::to_string(current.block.x) + "," + std::to_string(current.block.y) +
                "," + std::to_string(current.block.z) + "): " + std::to_string(b.at_barrier) +
                " threads wait at __syncthreads and " + std::to_string(at_warp) +
                " in a warp collective that some lane of the mask never reaches";
    }
  }
}

}  // namespace

[[noreturn]] void fail(const char* what) { throw std::runtime_error(what); }

unsigned lane_id() { return running().linear & 31u; }

void* dynamic_shared_memory() {
  running();
  return block_->dynamic_smem.data();
}

void sync_block() {
  Fiber& f = running();
  f.state = State::AtBarrier;
  if (++block_->at_barrier == block_->live) release_barrier();
  yield();
}

std::shared_ptr<const unsigned char[]> warp_rendezvous(unsigned mask, const void* operand, size_t bytes) {
  Fiber& f = running();
  Block& b = *block_;
  const unsigned base = f.linear & ~31u, lane = f.linear & 31u;
  if (!in_mask(mask, int(lane))) fail("warp collective: the calling lane is not in its own mask");
  if (bytes > kMaxOperandBytes) fail("warp collective: operand too large for the emulator");
  // Lanes past the end of the block do not exist; a full mask on a partial warp names only the real ones.
  unsigned present = 0;
  for (unsigned i = 0; i < 32 && base + i < b.fibers.size(); ++i) present |= 1u << i;
  const unsigned members = mask & present;
  std::memcpy(f.operand, operand, bytes);
  f.operand_bytes = bytes;
  f.warp_mask = mask;
  f.state = State::AtWarp;
  bool complete = true;
  for (unsigned i = 0; i < 32; ++i) {
    if (!in_mask(members, int(i))) continue;
    const Fiber& q = b.fibers[base + i];
    if (q.state == State::Done)
      fail(("warp collective: lane " + std::to_string(i) + " of the mask has exited").c_str());
    if (q.state != State::AtWarp || q.warp_mask != mask) complete = false;
  }
  if (complete) {
    auto snapshot = std::shared_ptr<unsigned char[]>(new unsigned char[32 * bytes]());
    for (unsigned i = 0; i < 32; ++i) {
      if (!in_mask(members, int(i))) continue;
      const Fiber& q = b.fibers[base + i];
      if (q.operand_bytes != bytes) fail("warp collective: lanes of one mask pass operands of different sizes");
      std::memcpy(snapshot.get() + i * bytes, q.operand, bytes);
    }
    for (unsigned i = 0; i < 32; ++i) {
      if (!in_mask(members, int(i))) continue;
      Fiber& q = b.fibers[base + i];
      q.gathered = snapshot;
      q.state = State::Runnable;
    }
  } else {
    yield();
  }
  return std::move(f.gathered);
}

void run_grid(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  auto limit = max_dynamic_smem_.find(kernel);
  const size_t smem_limit = limit == max_dynamic_smem_.end() ? kDefaultDynamicSmem : size_t(limit->second);
  if (threads == 0 || threads > kMaxThreads || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535) {
    last_error_ = cudaErrorInvalidConfiguration;
    last_message_ = "emulated launch: invalid configuration (grid " + std::to_string(grid.x) + "x" +
                    std::to_string(grid.y) + "x" + std::to_string(grid.z) + ", block " + std::to_string(block.x) +
                    "x" + std::to_string(block.y) + "x" + std::to_string(block.z) + ")";
    return;
  }
  if (dynamic_smem > smem_limit) {
    last_error_ = cudaErrorInvalidValue;
    last_message_ = "emulated launch: " + std::to_string(dynamic_smem) + " bytes of dynamic shared memory, above the " +
                    std::to_string(smem_limit) + " allowed for this kernel (raise it with cudaFuncSetAttribute)";
    return;
  }
  current.grid_dim = grid;
  current.block_dim = block;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        Block b;
        b.body = &body;
        b.dynamic_smem.assign(dynamic_smem + 16, 0xFF);  // NaN until written
        current.block = uint3{x, y, z};
        block_ = &b;
        run_block(b, block);
        block_ = nullptr;
        if (!b.error.empty()) {
          last_error_ = cudaErrorLaunchFailure;
          last_message_ = "emulated kernel failed: " + b.error;
          return;
        }
      }
    }
  }
}

}  // namespace emu

// ---- the CUDA runtime calls zigspark makes, answered for one emulated Hopper GPU ----
extern "C" {

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
cudaError_t cudaGetLastError(void) {
  const cudaError_t e = emu::last_error_;
  emu::last_error_ = cudaSuccess;
  return e;
}
const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    default: return "cudaErrorUnknown";
  }
}
const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : emu::last_message_.c_str();
}
cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = CUDART_VERSION;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* version) {
  *version = CUDART_VERSION;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = emu::kOptinDynamicSmem; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMultiProcessorCount: *value = 132; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = emu::kMaxThreads; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || value > emu::kOptinDynamicSmem) return cudaErrorInvalidValue;
  emu::max_dynamic_smem_[func] = value;
  return cudaSuccess;
}
cudaError_t cudaFuncGetAttributes(struct cudaFuncAttributes* attr, const void* func) {
  std::memset(attr, 0, sizeof(*attr));
  attr->maxThreadsPerBlock = emu::kMaxThreads;
  auto it = emu::max_dynamic_smem_.find(func);
  attr->maxDynamicSharedSizeBytes = it == emu::max_dynamic_smem_.end() ? emu::kDefaultDynamicSmem : it->second;
  attr->ptxVersion = attr->binaryVersion = 90;
  return cudaSuccess;
}

}  // extern "C"
