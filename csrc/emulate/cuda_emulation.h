// Host C++ stand-ins for the CUDA built-ins the kernels of csrc/cuda/ use, so that the
// same kernel sources run on the CPU in tests (FUSED_VAE_CUDA_EMULATE=1; see
// fused_vae/backends/cuda_emulation.py). A test device, like TRITON_INTERPRET=1: it is
// slow and checks what a GPU would not report.
//
// Execution model (cuda_emulation.cpp): a launch runs its blocks one after another; the
// threads of a block run concurrently, one OS thread per CUDA thread (a reusable pool),
// so a missing __syncthreads or a wrong shuffle gives wrong results or a reported fault.
//   - __syncthreads waits for every thread of the block; reaching it after a thread of
//     the block exited is a fault (a barrier in divergent code).
//   - __shfl_xor_sync exchanges values within a warp of 32 threads; the mask must be
//     full and every lane must reach the same shuffle (source line); anything else,
//     including a lane that exited or waits at __syncthreads, is a fault.
//   - a block whose live threads all wait forever is a fault (deadlock), not a hang.
//   - shared arrays (FV_SHARED) live in per-block storage filled with 0xFF bytes (NaN
//     for floating types) when the block starts.
//   - 16-byte vector accesses (FV_ASSERT_ALIGNED16) must be 16-byte aligned.
// A fault stops the launch; the launch reports cudaErrorLaunchFailure and
// throw_on_error() raises it with the fault's description.
//
// Math differs from the device in one place: op_exp is the host polynomial
// (fast_math.h), not CUDA's expf (both within float32 rounding).
#pragma once

#ifndef FUSED_VAE_CUDA_EMULATE
#error "cuda_emulation.h is for the emulated CUDA build only (define FUSED_VAE_CUDA_EMULATE)"
#endif

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>

// ---- qualifiers -------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Shared arrays must be declared with FV_SHARED (per-block storage in the emulator).
#define __shared__ FV_EMULATION_declare_shared_arrays_with_FV_SHARED

// ---- built-in variables: per OS thread, set by the emulator for each CUDA thread ---------

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

// ---- types --------------------------------------------------------------------------------

struct alignas(2) __half {
  unsigned short bits;
};
struct alignas(2) __nv_bfloat16 {
  unsigned short bits;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};

// IEEE round-to-nearest-even conversions (cuda_emulation.cpp, with c10's).
float __half2float(__half h);
__half __float2half_rn(float f);
float __bfloat162float(__nv_bfloat16 h);
__nv_bfloat16 __float2bfloat16_rn(float f);

// ---- runtime API subset -------------------------------------------------------------------

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
};
typedef enum cudaError cudaError_t;

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMultiProcessorCount = 16,
};

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);
// The emulated device: FUSED_VAE_CUDA_EMULATE_SMS SMs (default 2), read at each query.
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);

namespace fused_vae {
namespace emu {

constexpr int kWarpSize = 32;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr int kMaxThreadsPerSm = 2048;
constexpr std::size_t kSharedBytesPerBlock = 48 * 1024;

// Runs body() as every thread of every block of a 1-D grid (see the top of this file);
// records the first fault as the launch error (cudaGetLastError).
void launch_grid(dim3 grid, dim3 block, std::size_t dynamic_smem, cudaStream_t stream,
                 const std::function<void()>& body);

// Shared-memory array of `count` elements in the current block's storage. Every thread
// declares the block's arrays in the same order, so all get the same addresses.
void* block_shared_bytes(std::size_t bytes, std::size_t align);
template <typename T>
T* block_shared(std::size_t count) {
  return static_cast<T*>(block_shared_bytes(count * sizeof(T), alignof(T) > 16 ? alignof(T) : 16));
}

void syncthreads();
// One full-mask exchange of `bytes` (<= 8) per lane; lane reads the value of src_lane.
void warp_exchange(const char* file, int line, unsigned mask, const void* in, void* out, std::size_t bytes,
                   int src_lane);
[[noreturn]] void fault(const char* file, int line, const char* what);

// Raises a std::runtime_error naming the error (and the fault, after a failed launch).
void throw_on_error(cudaError_t err);

inline void assert_aligned16(const void* p, const char* file, int line) {
  if ((reinterpret_cast<std::uintptr_t>(p) & 15u) != 0) {
    fault(file, line, "16-byte vector access at an address that is not 16-byte aligned");
  }
}

template <typename T>
T shfl_xor_sync(const char* file, int line, unsigned mask, T var, int lane_mask, int width = kWarpSize) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffles move 4- or 8-byte values");
  if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0) {
    fault(file, line, "__shfl_xor_sync width must be a power of two in [1, 32]");
  }
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  int src = lane ^ lane_mask;
  if (src < 0 || src >= (lane / width + 1) * width) src = lane;  // later groups: own value
  T out;
  warp_exchange(file, line, mask, &var, &out, sizeof(T), src);
  return out;
}

template <typename Kernel>
int max_active_blocks(Kernel, int block_size) {
  return block_size > 0 && block_size <= kMaxThreadsPerBlock ? kMaxThreadsPerSm / block_size : 0;
}

}  // namespace emu
}  // namespace fused_vae

inline void __syncthreads() { ::fused_vae::emu::syncthreads(); }
#define __shfl_xor_sync(...) ::fused_vae::emu::shfl_xor_sync(__FILE__, __LINE__, __VA_ARGS__)

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// FUSED_VAE_CUDA_EMULATE_FAIL_OCCUPANCY=1 makes the query fail (tests of error reporting).
template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* num_blocks, Kernel kernel, int block_size,
                                                          std::size_t dynamic_smem) {
  const char* fail = std::getenv("FUSED_VAE_CUDA_EMULATE_FAIL_OCCUPANCY");
  if (fail != nullptr && fail[0] == '1') return cudaErrorInvalidDeviceFunction;
  if (num_blocks == nullptr || dynamic_smem > ::fused_vae::emu::kSharedBytesPerBlock) return cudaErrorInvalidValue;
  *num_blocks = ::fused_vae::emu::max_active_blocks(kernel, block_size);
  return cudaSuccess;
}

// The kernels' hooks (see csrc/cuda/reparam_kl_kernels.cuh).
#define FV_SHARED(type, name, count) type* const name = ::fused_vae::emu::block_shared<type>(count)
#define FV_ASSERT_ALIGNED16(ptr) ::fused_vae::emu::assert_aligned16((ptr), __FILE__, __LINE__)
#define FV_LAUNCH(kernel, grid, block, stream, ...) \
  ::fused_vae::emu::launch_grid(dim3(grid), dim3(block), 0, (stream), [&] { kernel(__VA_ARGS__); })
