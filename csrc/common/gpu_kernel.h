// What a kernel header (csrc/ops/<family>/<family>_kernels.cuh) needs to compile both for the GPU
// (nvcc) and for the SIMT emulator (host compiler with LTFAST_SIMT, csrc/simt/): the launch call,
// the stream type, __shared__ arrays and the global-memory accesses (gpu::load / store, their
// 4/8/16-byte vector forms, load_coherent and atomic_inc: every access of a kernel to global memory
// goes through them, so that the emulator can count the traffic). Kernel headers hold no torch glue.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <cstring>
#include <source_location>
#include <utility>

#if defined(LTFAST_SIMT)
#include "../simt/simt.h"

namespace ltfast {
namespace gpu {
using Stream = simt::Stream;
using simt::dim3;

// kernel<<<grid, block, 0, stream>>>(args...), run to completion by the emulator.
template <typename... Params, typename... Args>
void launch(const char* kernel_name, void (*kernel)(Params...), dim3 grid, dim3 block, Stream /*stream*/,
            Args&&... args) {
  simt::launch(kernel_name, std::source_location::current(), kernel, grid, block, std::forward<Args>(args)...);
}
}  // namespace gpu
}  // namespace ltfast

// A __shared__ array of `count` elements of T (a scalar is an array of 1): poisoned per block and
// checked for reads before writes by the emulator.
#define LTFAST_SHARED_ARRAY(T, name, count) LTFAST_SIMT_SHARED_ARRAY(T, name, count)
#else
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

namespace ltfast {
namespace gpu {
using Stream = cudaStream_t;
using ::dim3;

// kernel<<<grid, block, 0, stream>>>(args...) and the launch error check. `kernel_name` names the
// kernel in the emulator's reports.
template <typename... Params, typename... Args>
void launch(const char* /*kernel_name*/, void (*kernel)(Params...), dim3 grid, dim3 block, Stream stream,
            Args&&... args) {
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
}  // namespace gpu
}  // namespace ltfast

#define LTFAST_SHARED_ARRAY(T, name, count) __shared__ T name[count]
#endif

namespace ltfast {
namespace gpu {

#if defined(LTFAST_SIMT)
// Where an access is made (the caller's line, through the default argument): the emulator groups
// a site's executions by warp into requests.
using AccessSite = std::source_location;
#else
// Nothing on the GPU: the accesses compile to plain loads and stores.
struct AccessSite {
  static constexpr __host__ __device__ AccessSite current() { return AccessSite{}; }
};
#endif

// N elements of T read or written by one instruction (N * sizeof(T) = 4, 8 or 16 bytes: LDG/STG.32,
// .64, .128); the address must be aligned to the vector's size.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vector {
  static_assert(sizeof(T) * N == 4 || sizeof(T) * N == 8 || sizeof(T) * N == 16, "a vector access is 4, 8 or 16 bytes");
  T v[N];
};

#if !defined(LTFAST_SIMT)
// The integer type of one 4-, 8- or 16-byte access.
template <int kBytes>
struct VectorBits;
template <>
struct VectorBits<4> {
  using type = unsigned int;
};
template <>
struct VectorBits<8> {
  using type = uint2;
};
template <>
struct VectorBits<16> {
  using type = uint4;
};
#endif

// *address from global memory.
template <typename T>
__device__ __forceinline__ T load(const T* address, AccessSite site = AccessSite::current()) {
#if defined(LTFAST_SIMT)
  simt::global_access(site, address, sizeof(T), false);
#else
  (void)site;
#endif
  return *address;
}

// *address = value in global memory (value converted to T first).
template <typename T, typename V>
__device__ __forceinline__ void store(T* address, const V& value, AccessSite site = AccessSite::current()) {
#if defined(LTFAST_SIMT)
  simt::global_access(site, address, sizeof(T), true);
#else
  (void)site;
#endif
  *address = static_cast<T>(value);
}

// *address from global memory through L2 only (ld.global.cg), never the non-coherent read-only/L1
// path that gpu::load and load_vector may take: for data that other blocks of the same kernel wrote
// (the block partials read by a row kernel's last block, gpu_reduce::finish_in_last_block).
template <typename T>
__device__ __forceinline__ T load_coherent(const T* address, AccessSite site = AccessSite::current()) {
#if defined(LTFAST_SIMT)
  simt::global_access(site, address, sizeof(T), false);
  return *address;
#else
  (void)site;
  return __ldcg(address);
#endif
}

// __threadfence(): this thread's global-memory writes before the fence are seen by every block
// before its writes after it. A no-op in the emulator, whose blocks run one at a time.
__device__ __forceinline__ void thread_fence() {
#if !defined(LTFAST_SIMT)
  __threadfence();
#endif
}

// atomicInc(address, limit): returns the old value and stores old >= limit ? 0 : old + 1 (so a
// counter taken `limit + 1` times is back at 0). The emulator, whose blocks run one at a time, does it
// as a plain read and write of the 4 bytes, counted in the memory trace.
__device__ __forceinline__ unsigned int atomic_inc(unsigned int* address, unsigned int limit,
                                                   AccessSite site = AccessSite::current()) {
#if defined(LTFAST_SIMT)
  simt::global_access(site, address, sizeof(unsigned int), false);
  simt::global_access(site, address, sizeof(unsigned int), true);
  const unsigned int old = *address;
  *address = old >= limit ? 0u : old + 1u;
  return old;
#else
  (void)site;
  return atomicInc(address, limit);
#endif
}

#if defined(LTFAST_SIMT)
template <typename T, int N>
void check_vector_alignment(const T* address, const AccessSite& site) {
  if (reinterpret_cast<std::uintptr_t>(address) % (sizeof(T) * N) != 0) {
    throw simt::Error("ltfast.simt: a " + std::to_string(sizeof(T) * N) + "-byte vector access at " +
                      site.file_name() + ":" + std::to_string(site.line()) +
                      " is misaligned (a GPU raises cudaErrorMisalignedAddress)");
  }
}
#endif

// address[0 .. N) in one access.
template <int N, typename T>
__device__ __forceinline__ Vector<T, N> load_vector(const T* address, AccessSite site = AccessSite::current()) {
#if defined(LTFAST_SIMT)
  check_vector_alignment<T, N>(address, site);
  simt::global_access(site, address, sizeof(T) * N, false);
  Vector<T, N> value;
  for (int i = 0; i < N; ++i) value.v[i] = address[i];
  return value;
#else
  (void)site;
  // Through the integer vector of the same size and the read-only path (every vector load of the
  // kernels reads inputs: logits, per-class vectors): ld.global.nc.v4.u32. A copy of Vector<T, N>
  // or of a uint4 is an aggregate copy, which nvcc may lower element-wise (seen: 8 x st.global.u16
  // per bf16 vector store, 4 x st.global.u32 for a uint4 assignment); the intrinsics are one access.
  using Bits = typename VectorBits<sizeof(T) * N>::type;
  const Bits bits = __ldg(reinterpret_cast<const Bits*>(address));
  Vector<T, N> value;
  memcpy(&value, &bits, sizeof(Bits));
  return value;
#endif
}

// address[0 .. N) = value in one access.
template <int N, typename T>
__device__ __forceinline__ void store_vector(T* address, const Vector<T, N>& value,
                                             AccessSite site = AccessSite::current()) {
#if defined(LTFAST_SIMT)
  check_vector_alignment<T, N>(address, site);
  simt::global_access(site, address, sizeof(T) * N, true);
  for (int i = 0; i < N; ++i) address[i] = value.v[i];
#else
  (void)site;
  using Bits = typename VectorBits<sizeof(T) * N>::type;
  Bits bits;
  memcpy(&bits, &value, sizeof(Bits));
  __stwb(reinterpret_cast<Bits*>(address), bits);
#endif
}

// A thread starts a new row of a row loop. Free on the GPU; in the emulator it keeps the grouping
// of accesses into warp requests aligned across rows (see simt.h, global memory).
__device__ __forceinline__ void mark_row_start() {
#if defined(LTFAST_SIMT)
  simt::row_start();
#endif
}

}  // namespace gpu
}  // namespace ltfast
