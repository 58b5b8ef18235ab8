// The emulated CUDA device of cuda_emulation.h: block execution on a pool of OS
// threads, __syncthreads, warp shuffles, fault and deadlock detection, launch errors.
#define FUSED_VAE_CUDA_EMULATE 1
#include "cuda_emulation.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

// ---- 16-bit conversions (c10's IEEE round-to-nearest-even) ------------------------------

float __half2float(__half h) { return static_cast<float>(c10::Half(h.bits, c10::Half::from_bits())); }
__half __float2half_rn(float f) { return __half{c10::Half(f).x}; }
float __bfloat162float(__nv_bfloat16 h) {
  return static_cast<float>(c10::BFloat16(h.bits, c10::BFloat16::from_bits()));
}
__nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{c10::BFloat16(f).x}; }

namespace fused_vae {
namespace emu {
namespace {

// Thrown in the thread that detects a fault (already recorded) and in threads that wait
// on a block that faulted; both end the thread's kernel body.
struct ThreadStop {};

enum class Where { kRunning, kBarrier, kShuffle, kExited };

// Synchronisation state of the block being run. One mutex guards everything.
class Block {
 public:
  void reset(int nthreads) {
    std::lock_guard<std::mutex> lk(mu_);
    nthreads_ = nthreads;
    waiting_ = 0;
    exited_ = 0;
    bar_arrived_ = 0;
    aborted_ = false;
    error_.clear();
    where_.assign(nthreads, Where::kRunning);
    const int nwarps = (nthreads + kWarpSize - 1) / kWarpSize;
    warps_.clear();
    for (int w = 0; w < nwarps; ++w) warps_.push_back(std::make_unique<Warp>());
  }

  void barrier(int tid) {
    std::unique_lock<std::mutex> lk(mu_);
    stop_if_aborted();
    if (exited_ > 0) {
      fault_locked(describe_thread(tid) + " reached __syncthreads after " + std::to_string(exited_) +
                   " thread(s) of the block exited: the barrier is not reached by every thread");
    }
    where_[tid] = Where::kBarrier;
    if (++bar_arrived_ == nthreads_) {
      bar_arrived_ = 0;
      ++bar_gen_;
      waiting_ -= nthreads_ - 1;
      where_[tid] = Where::kRunning;
      bar_cv_.notify_all();
      return;
    }
    const uint64_t gen = bar_gen_;
    ++waiting_;
    check_deadlock();
    bar_cv_.wait(lk, [&] { return bar_gen_ != gen || aborted_; });
    if (bar_gen_ == gen) throw ThreadStop{};
    where_[tid] = Where::kRunning;
  }

  void exchange(int tid, const char* file, int line, unsigned mask, const void* in, void* out, std::size_t bytes,
                int src_lane) {
    std::unique_lock<std::mutex> lk(mu_);
    stop_if_aborted();
    const int w = tid / kWarpSize;
    const int lane = tid % kWarpSize;
    const int lanes = std::min(kWarpSize, nthreads_ - w * kWarpSize);
    Warp& warp = *warps_[w];
    const std::string site = std::string(file) + ":" + std::to_string(line);
    if (mask != 0xffffffffu || lanes != kWarpSize) {
      fault_locked(describe_thread(tid) + ": __shfl_xor_sync at " + site +
                   " with a partial mask or warp; the emulator supports full-mask shuffles of full warps");
    }
    if (warp.exited > 0) {
      fault_locked(describe_thread(tid) + " reached the full-mask __shfl_xor_sync at " + site + " after " +
                   std::to_string(warp.exited) + " lane(s) of its warp exited");
    }
    if (warp.arrived == 0) {
      warp.site = site;
    } else if (warp.site != site) {
      fault_locked(describe_thread(tid) + " reached __shfl_xor_sync at " + site + " while other lanes of warp " +
                   std::to_string(w) + " wait at " + warp.site +
                   ": every lane of a warp must reach each full-mask shuffle");
    }
    std::memcpy(&warp.in[lane], in, bytes);
    warp.src[lane] = src_lane;
    where_[tid] = Where::kShuffle;
    if (++warp.arrived == kWarpSize) {
      for (int l = 0; l < kWarpSize; ++l) warp.out[l] = warp.in[warp.src[l]];
      warp.arrived = 0;
      ++warp.gen;
      waiting_ -= kWarpSize - 1;
      where_[tid] = Where::kRunning;
      std::memcpy(out, &warp.out[lane], bytes);
      warp.cv.notify_all();
      return;
    }
    const uint64_t gen = warp.gen;
    ++waiting_;
    check_deadlock();
    warp.cv.wait(lk, [&] { return warp.gen != gen || aborted_; });
    if (warp.gen == gen) throw ThreadStop{};
    where_[tid] = Where::kRunning;
    std::memcpy(out, &warp.out[lane], bytes);
  }

  // Called once by every thread when its kernel body ends (normally or not).
  void thread_exit(int tid) {
    std::lock_guard<std::mutex> lk(mu_);
    where_[tid] = Where::kExited;
    ++exited_;
    Warp& warp = *warps_[tid / kWarpSize];
    ++warp.exited;
    if (!aborted_ && warp.arrived > 0) {
      record_locked(describe_thread(tid) + " exited while " + std::to_string(warp.arrived) +
                    " lane(s) of its warp wait at the full-mask __shfl_xor_sync " + warp.site);
    }
    if (!aborted_ && waiting_ > 0 && waiting_ + exited_ == nthreads_) {
      record_locked(describe_thread(tid) + " exited while the other threads wait: " + describe_waits());
    }
    if (exited_ == nthreads_) done_cv_.notify_all();
  }

  void wait_done() {
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [&] { return exited_ == nthreads_; });
  }

  // Records a fault seen by a thread of this block and stops its waiting threads.
  void fault(const std::string& what) {
    std::lock_guard<std::mutex> lk(mu_);
    record_locked(what);
  }

  std::string error() {
    std::lock_guard<std::mutex> lk(mu_);
    return error_;
  }

 private:
  struct Warp {
    int arrived = 0;
    int exited = 0;
    uint64_t gen = 0;
    std::string site;
    uint64_t in[kWarpSize] = {};
    uint64_t out[kWarpSize] = {};
    int src[kWarpSize] = {};
    std::condition_variable cv;
  };

  void stop_if_aborted() {
    if (aborted_) throw ThreadStop{};
  }

  void record_locked(const std::string& what) {
    if (error_.empty()) error_ = what;
    aborted_ = true;
    bar_cv_.notify_all();
    for (auto& w : warps_) w->cv.notify_all();
  }

  [[noreturn]] void fault_locked(const std::string& what) {
    record_locked(what);
    throw ThreadStop{};
  }

  // Every live thread waits: nothing can release them.
  void check_deadlock() {
    if (waiting_ + exited_ == nthreads_) fault_locked("deadlock: " + describe_waits());
  }

  std::string describe_thread(int tid) const {
    return "thread " + std::to_string(tid) + " (warp " + std::to_string(tid / kWarpSize) + ", lane " +
           std::to_string(tid % kWarpSize) + ")";
  }

  std::string describe_waits() const {
    int at_barrier = 0;
    for (Where w : where_) at_barrier += w == Where::kBarrier ? 1 : 0;
    std::ostringstream os;
    os << at_barrier << " thread(s) at __syncthreads, " << exited_ << " exited";
    for (std::size_t w = 0; w < warps_.size(); ++w) {
      if (warps_[w]->arrived > 0) {
        os << "; " << warps_[w]->arrived << " lane(s) of warp " << w << " at __shfl_xor_sync " << warps_[w]->site;
      }
    }
    return os.str();
  }

  std::mutex mu_;
  std::condition_variable bar_cv_;
  std::condition_variable done_cv_;
  int nthreads_ = 0;
  int waiting_ = 0;  // threads blocked in a barrier or shuffle not yet completed
  int exited_ = 0;
  int bar_arrived_ = 0;
  uint64_t bar_gen_ = 0;
  bool aborted_ = false;
  std::string error_;
  std::vector<Where> where_;
  std::vector<std::unique_ptr<Warp>> warps_;
};

// What a CUDA thread of the running block sees (per OS thread).
struct ThreadContext {
  Block* block = nullptr;
  int tid = 0;
  unsigned char* shared = nullptr;
  std::size_t shared_used = 0;
};
thread_local ThreadContext tls;

// OS threads that run the threads of one block at a time; grows to the largest block.
class Pool {
 public:
  void run_block(int nthreads, dim3 grid, uint3 block_idx, const std::function<void()>& body, Block& block,
                 unsigned char* shared) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      while (static_cast<int>(workers_.size()) < nthreads) {
        const int id = static_cast<int>(workers_.size());
        workers_.emplace_back([this, id] { work(id); });
      }
      job_ = Job{nthreads, grid, block_idx, &body, &block, shared};
      ++job_gen_;
    }
    start_cv_.notify_all();
    block.wait_done();
  }

 private:
  struct Job {
    int nthreads = 0;
    dim3 grid;
    uint3 block_idx{0, 0, 0};
    const std::function<void()>* body = nullptr;
    Block* block = nullptr;
    unsigned char* shared = nullptr;
  };

  void work(int id) {
    uint64_t seen = 0;
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        start_cv_.wait(lk, [&] { return job_gen_ != seen; });
        seen = job_gen_;
        job = job_;
      }
      if (id >= job.nthreads) continue;
      threadIdx = uint3{static_cast<unsigned>(id), 0, 0};
      blockIdx = job.block_idx;
      blockDim = dim3(static_cast<unsigned>(job.nthreads));
      gridDim = job.grid;
      tls = ThreadContext{job.block, id, job.shared, 0};
      try {
        (*job.body)();
      } catch (const ThreadStop&) {
      } catch (const std::exception& e) {
        job.block->fault("thread " + std::to_string(id) + " threw: " + e.what());
      } catch (...) {
        job.block->fault("thread " + std::to_string(id) + " threw an unknown exception");
      }
      tls = ThreadContext{};
      job.block->thread_exit(id);
    }
  }

  std::mutex mu_;
  std::condition_variable start_cv_;
  uint64_t job_gen_ = 0;
  Job job_;
  std::vector<std::thread> workers_;  // never joined: the pool lives as long as the process
};

std::mutex g_launch_mutex;  // one launch at a time
thread_local cudaError_t g_last_error = cudaSuccess;
// The description of the last failed launch and its error (guarded by g_launch_mutex).
std::string g_last_fault;
cudaError_t g_last_fault_error = cudaSuccess;

Pool& pool() {
  static Pool* p = new Pool();  // leaked on purpose: worker threads outlive static destruction
  return *p;
}

void set_error(cudaError_t err, std::string detail) {
  g_last_error = err;
  g_last_fault = std::move(detail);
  g_last_fault_error = err;
}

}  // namespace

void launch_grid(dim3 grid, dim3 block, std::size_t dynamic_smem, cudaStream_t, const std::function<void()>& body) {
  std::lock_guard<std::mutex> lk(g_launch_mutex);
  const bool valid = grid.x >= 1 && grid.x <= 0x7fffffffu && grid.y == 1 && grid.z == 1 && block.x >= 1 &&
                     block.x <= static_cast<unsigned>(kMaxThreadsPerBlock) && block.y == 1 && block.z == 1 &&
                     dynamic_smem == 0;
  if (!valid) {
    std::ostringstream os;
    os << "grid (" << grid.x << ", " << grid.y << ", " << grid.z << "), block (" << block.x << ", " << block.y
       << ", " << block.z << "), " << dynamic_smem
       << " bytes of dynamic shared memory: the emulator runs 1-D grids of 1 to 2**31 - 1 blocks of 1 to 1024 "
          "threads without dynamic shared memory";
    set_error(cudaErrorInvalidConfiguration, os.str());
    return;
  }
  g_last_fault.clear();
  g_last_fault_error = cudaSuccess;
  static Block state;
  std::vector<unsigned char> shared(kSharedBytesPerBlock);
  for (unsigned b = 0; b < grid.x; ++b) {
    std::fill(shared.begin(), shared.end(), static_cast<unsigned char>(0xff));
    state.reset(static_cast<int>(block.x));
    pool().run_block(static_cast<int>(block.x), grid, uint3{b, 0, 0}, body, state, shared.data());
    std::string err = state.error();
    if (!err.empty()) {
      set_error(cudaErrorLaunchFailure, "block " + std::to_string(b) + " of " + std::to_string(grid.x) + ": " + err);
      return;
    }
  }
}

void* block_shared_bytes(std::size_t bytes, std::size_t align) {
  ThreadContext& t = tls;
  if (t.block == nullptr) throw std::logic_error("FV_SHARED used outside an emulated kernel");
  const std::size_t offset = (t.shared_used + align - 1) / align * align;
  if (offset + bytes > kSharedBytesPerBlock) {
    fault(__FILE__, __LINE__, "shared arrays of the block exceed 48 KiB");
  }
  t.shared_used = offset + bytes;
  return t.shared + offset;
}

void syncthreads() {
  if (tls.block == nullptr) throw std::logic_error("__syncthreads called outside an emulated kernel");
  tls.block->barrier(tls.tid);
}

void warp_exchange(const char* file, int line, unsigned mask, const void* in, void* out, std::size_t bytes,
                   int src_lane) {
  if (tls.block == nullptr) throw std::logic_error("__shfl_xor_sync called outside an emulated kernel");
  tls.block->exchange(tls.tid, file, line, mask, in, out, bytes, src_lane);
}

void fault(const char* file, int line, const char* what) {
  const std::string where = std::string(file) + ":" + std::to_string(line);
  if (tls.block == nullptr) throw std::runtime_error(where + ": " + what);
  tls.block->fault("thread " + std::to_string(tls.tid) + " at " + where + ": " + what);
  throw ThreadStop{};
}

void throw_on_error(cudaError_t err) {
  if (err == cudaSuccess) return;
  std::string msg = std::string("fused_vae emulated CUDA error: ") + cudaGetErrorString(err);
  {
    std::lock_guard<std::mutex> lk(g_launch_mutex);
    if (err == g_last_fault_error && !g_last_fault.empty()) msg += " (" + g_last_fault + ")";
  }
  throw std::runtime_error(msg);
}

}  // namespace emu
}  // namespace fused_vae

cudaError_t cudaGetLastError() {
  const cudaError_t err = fused_vae::emu::g_last_error;
  fused_vae::emu::g_last_error = cudaSuccess;
  return err;
}

cudaError_t cudaPeekAtLastError() { return fused_vae::emu::g_last_error; }

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
    case cudaErrorInvalidDeviceFunction:
      return "invalid device function";
    case cudaErrorLaunchOutOfResources:
      return "too many resources requested for launch";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure";
  }
  return "unknown error";
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (value == nullptr) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock:
      *value = fused_vae::emu::kMaxThreadsPerBlock;
      return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: {
      const char* env = std::getenv("FUSED_VAE_CUDA_EMULATE_SMS");
      const int n = env != nullptr ? std::atoi(env) : 2;
      *value = n >= 1 ? n : 1;
      return cudaSuccess;
    }
  }
  return cudaErrorInvalidValue;
}
