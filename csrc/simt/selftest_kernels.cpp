// Kernels with known defects (and correct ones), to show that the SIMT emulator catches what it
// claims to: tests/test_simt.py runs each case through ltfast_simt::selftest(case, blocks, threads),
// which returns out[blocks * threads] (int64) and runs under every schedule like the real ops.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "scheduled.h"
#include "simt.h"
#include "../common/gpu_kernel.h"
#include "../common/gpu_reduce.cuh"

namespace ltfast {
namespace simt_selftest {

constexpr int kMaxThreads = 256;

__device__ int64_t global_thread() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }

// Correct: block sum with the barrier pattern of the real kernels, and warp shuffles of each kind.
__global__ void correct_kernel(int64_t* out) {
  LTFAST_SHARED_ARRAY(int64_t, partial, kMaxThreads);
  const int t = threadIdx.x;
  partial[t] = t + 1;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (t < stride) partial[t] += partial[t + stride];
    __syncthreads();
  }
  const int64_t lane = t % 32;
  const int64_t xor_value = __shfl_xor_sync(0xffffffffu, lane, 1);      // lane ^ 1
  const int64_t down = __shfl_down_sync(0xffffffffu, lane, 4);           // lane + 4, or own past 31
  const int64_t up = __shfl_up_sync(0xffffffffu, lane, 2, 16);           // lane - 2 within 16-lane halves
  const int64_t broadcast = __shfl_sync(0xffffffffu, lane, 3, 8);        // lane 3 of each group of 8
  const unsigned odd = __ballot_sync(0xffffffffu, lane % 2);
  out[global_thread()] = partial[0] * 1000000 + xor_value * 10000 + down * 100 + up + broadcast * 0 +
                         (odd == 0xaaaaaaaau ? 0 : -1000000000);
  if (broadcast != (lane / 8) * 8 + 3) out[global_thread()] = -1;
}

// Reads a neighbour's shared element that nobody wrote.
__global__ void unwritten_shared_kernel(int64_t* out) {
  LTFAST_SHARED_ARRAY(int64_t, values, kMaxThreads);
  const int t = threadIdx.x;
  if (t > 0) values[t] = t;  // thread 0 never writes its element
  __syncthreads();
  out[global_thread()] = values[(t + 1) % blockDim.x];
}

// Reuses shared memory without the barrier between the last read and the next write.
__global__ void missing_barrier_kernel(int64_t* out) {
  LTFAST_SHARED_ARRAY(int64_t, values, kMaxThreads);
  const int t = threadIdx.x;
  values[t] = t;
  __syncthreads();
  const int64_t neighbour = values[(t + 1) % blockDim.x];
  // missing __syncthreads() here: the neighbour may still have to read values[t]
  values[t] = neighbour * 10;
  __syncthreads();
  out[global_thread()] = values[(t + 1) % blockDim.x];
}

__global__ void divergent_barrier_kernel(int64_t* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[global_thread()] = 1;
}

__global__ void barrier_after_exit_kernel(int64_t* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[global_thread()] = 1;
}

// A full-mask shuffle that only half of each warp executes.
__global__ void divergent_shuffle_kernel(int64_t* out) {
  int64_t value = threadIdx.x;
  if (threadIdx.x % 32 < 16) value = __shfl_xor_sync(0xffffffffu, value, 1);
  out[global_thread()] = value;
}

// Half of each warp shuffles while the other half waits at a barrier: a deadlock on a GPU.
__global__ void shuffle_barrier_deadlock_kernel(int64_t* out) {
  int64_t value = threadIdx.x;
  if (threadIdx.x % 32 < 16) {
    value = __shfl_xor_sync(0xffffffffu, value, 1);
  } else {
    __syncthreads();
  }
  out[global_thread()] = value;
}

__global__ void assert_kernel(int64_t* out) {
  CUDA_KERNEL_ASSERT(threadIdx.x != 7 && "thread 7 is not allowed");
  out[global_thread()] = 1;
}

// Assumes that block b - 1 ran before block b.
__global__ void block_order_kernel(int64_t* out) {
  if (threadIdx.x != 0) return;
  out[blockIdx.x * blockDim.x] = blockIdx.x == 0 ? 1 : out[(blockIdx.x - 1) * blockDim.x] + 1;
}

__global__ void shared_out_of_bounds_kernel(int64_t* out) {
  LTFAST_SHARED_ARRAY(int64_t, values, kMaxThreads);
  values[threadIdx.x + 1] = 1;  // off by one: thread 255 writes values[256]
  out[global_thread()] = 1;
}

// Correct: each block's thread 0 writes b + 1 at its first element and takes a ticket; the block
// with the last ticket (any block, by the schedule) sums them in block order into out[1].
__global__ void last_block_ticket_kernel(int64_t* out) {
  if (threadIdx.x == 0) gpu::store(out + int64_t(blockIdx.x) * blockDim.x, int64_t(blockIdx.x) + 1);
  if (!gpu_reduce::took_last_ticket(simt::ticket_counter())) return;
  if (threadIdx.x == 1) {
    int64_t total = 0;
    for (unsigned b = 0; b < gridDim.x; ++b) total += gpu::load_coherent(out + int64_t(b) * blockDim.x);
    gpu::store(out + 1, total);
  }
}

// Only block 0 takes a ticket: the counter is left at 1, and the next launch's last block would be
// wrong.
__global__ void missing_ticket_kernel(int64_t* out) {
  if (blockIdx.x == 0 && threadIdx.x == 0) gpu::atomic_inc(simt::ticket_counter(), gridDim.x - 1);
  out[global_thread()] = 1;
}

// Access patterns with known sector efficiency for the memory trace (tests/test_memory_traffic.py).
// Each thread stores its own 8 bytes: a warp's request covers 256 contiguous bytes, 8 sectors (1.0).
__global__ void coalesced_store_kernel(int64_t* out) { gpu::store(out + global_thread(), int64_t(1)); }

// The first half of the block stores every other element: 256 bytes over 512, 16 sectors (0.5).
__global__ void strided_store_kernel(int64_t* out) {
  if (threadIdx.x < blockDim.x / 2) gpu::store(out + int64_t(blockIdx.x) * blockDim.x + 2 * threadIdx.x, int64_t(1));
}

// The first half of the block stores 16-byte vectors: 512 contiguous bytes, 16 sectors (1.0).
__global__ void vector_store_kernel(int64_t* out) {
  if (threadIdx.x < blockDim.x / 2) {
    gpu::store_vector<2>(out + int64_t(blockIdx.x) * blockDim.x + 2 * threadIdx.x, gpu::Vector<int64_t, 2>{{1, 1}});
  }
}

// A 16-byte vector at an 8-byte boundary: a misaligned address on a GPU.
__global__ void misaligned_vector_kernel(int64_t* out) {
  if (threadIdx.x == 0 && blockIdx.x == 0) gpu::store_vector<2>(out + 1, gpu::Vector<int64_t, 2>{{1, 1}});
}

at::Tensor selftest(c10::string_view name_view, int64_t blocks, int64_t threads) {
  const std::string name(name_view);
  TORCH_CHECK(threads >= 1 && threads <= kMaxThreads && blocks >= 1, "ltfast_simt.selftest: bad launch size");
  at::Tensor out = at::zeros({blocks * threads}, at::kLong);
  using Kernel = void (*)(int64_t*);
  Kernel kernel = nullptr;
  if (name == "correct") kernel = &correct_kernel;
  else if (name == "unwritten_shared") kernel = &unwritten_shared_kernel;
  else if (name == "missing_barrier") kernel = &missing_barrier_kernel;
  else if (name == "divergent_barrier") kernel = &divergent_barrier_kernel;
  else if (name == "barrier_after_exit") kernel = &barrier_after_exit_kernel;
  else if (name == "divergent_shuffle") kernel = &divergent_shuffle_kernel;
  else if (name == "shuffle_barrier_deadlock") kernel = &shuffle_barrier_deadlock_kernel;
  else if (name == "assert") kernel = &assert_kernel;
  else if (name == "block_order") kernel = &block_order_kernel;
  else if (name == "shared_out_of_bounds") kernel = &shared_out_of_bounds_kernel;
  else if (name == "coalesced_store") kernel = &coalesced_store_kernel;
  else if (name == "strided_store") kernel = &strided_store_kernel;
  else if (name == "vector_store") kernel = &vector_store_kernel;
  else if (name == "misaligned_vector") kernel = &misaligned_vector_kernel;
  else if (name == "last_block_ticket") kernel = &last_block_ticket_kernel;
  else if (name == "missing_ticket") kernel = &missing_ticket_kernel;
  TORCH_CHECK(kernel != nullptr, "ltfast_simt.selftest: unknown case '", name, "'");
  gpu::launch(("selftest " + name + "_kernel").c_str(), kernel, static_cast<unsigned>(blocks),
              static_cast<unsigned>(threads), gpu::Stream{}, out.data_ptr<int64_t>());
  return out;
}

// __expf of each element as the emulated kernels see it (csrc/simt/simt.h).
at::Tensor selftest_expf(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "ltfast_simt.selftest_expf: x must be float32");
  at::Tensor input = x.contiguous();
  at::Tensor out = at::empty_like(input);
  const float* in = input.data_ptr<float>();
  float* result = out.data_ptr<float>();
  for (int64_t i = 0; i < input.numel(); ++i) result[i] = __expf(in[i]);
  return out;
}

}  // namespace simt_selftest
}  // namespace ltfast

// No tensor arguments: a catch-all kernel, run under every schedule like the real ops.
TORCH_LIBRARY_FRAGMENT(ltfast_simt, m) {
  m.def("selftest(str name, int blocks, int threads) -> Tensor",
        &ltfast::simt::Scheduled<&ltfast::simt_selftest::selftest>::call);
  m.def("selftest_expf(Tensor x) -> Tensor", &ltfast::simt_selftest::selftest_expf);
}
