// SIMT emulator: compiles CUDA kernel bodies (csrc/ops/<family>/<family>_kernels.cuh) for the host
// and runs them on the CPU, so that every kernel runs in CI on machines without a GPU. Test-only:
// it is built by tests/simt_build.py into a separate library and never ships in ltfast._C.
//
// Each CUDA thread of a block is a fiber on its own stack. Fibers switch only at rendezvous points
// (__syncthreads and the warp collectives), where the scheduler checks what CUDA requires:
//   - every live thread of the block reaches the same __syncthreads (same source line), and none
//     has exited while others wait there;
//   - every lane named in a collective's mask reaches the same collective with the same mask (not
//     a different one, not a barrier, not exit), and reads only lanes in the mask;
//   - no read of a __shared__ element that no thread of the block has written (shared memory is
//     poisoned per block: zero-initialised storage would hide a missing write);
//   - CUDA_KERNEL_ASSERT raises simt::Error (a C++ exception, surfacing as a Python RuntimeError)
//     instead of aborting;
//   - the ticket counter (ticket_counter, below) is back at 0 when a launch ends.
// A violation raises simt::Error naming the kernel, the block and thread, and the source line.
// Blocks run one at a time, in an order set by the schedule (see ScheduleGuard): a kernel that is
// correct on a GPU gives bit-identical results under every schedule.
#pragma once

#include <c10/macros/Macros.h>  // first: CUDA_KERNEL_ASSERT is redefined below

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <source_location>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace ltfast {
namespace simt {

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// Kernels get a stream argument like the CUDA launch; the emulator has one implicit stream.
struct Stream {};

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// ------------------------------------------------------------------------------ schedules
// Thread order between rendezvous points and block order of one launch.
enum class Schedule : int {
  kAscending = 0,   // lanes 0, 1, 2, ...; blocks in launch order
  kDescending = 1,  // lanes ..., 2, 1, 0; blocks in reverse order
  kShuffled = 2,    // a fresh random lane order at every rendezvous; blocks in a random order
};
constexpr int kNumSchedules = 3;
const char* schedule_name(Schedule schedule);

// Sets the schedule of the launches made on this thread while it lives.
class ScheduleGuard {
 public:
  explicit ScheduleGuard(Schedule schedule);
  ~ScheduleGuard();
  ScheduleGuard(const ScheduleGuard&) = delete;
  ScheduleGuard& operator=(const ScheduleGuard&) = delete;

 private:
  Schedule previous_;
};

// Totals since the library was loaded: launches, blocks, threads, barriers passed (per block),
// warp collectives completed (per group of lanes), shared-memory arrays allocated.
struct Counters {
  int64_t launches = 0, blocks = 0, threads = 0, barriers = 0, collectives = 0, shared_arrays = 0;
};
Counters counters();

// Names of the kernels launched on this thread since the last call (for error messages).
std::string take_launched_kernel_names();

// ------------------------------------------------------------------------------ thread state
const dim3& thread_index();
const dim3& block_index();
const dim3& block_dim();
const dim3& grid_dim();

void syncthreads(const std::source_location& where);
[[noreturn]] void kernel_assert_failed(const char* condition, const std::source_location& where);

enum class CollectiveKind : uint8_t { kShuffleIndex, kShuffleXor, kShuffleDown, kShuffleUp, kBallot, kSyncWarp };

namespace detail {
// Deposits this lane's operand, waits until every lane of `mask` is at the same collective, and
// writes this lane's result. Operands up to 16 bytes.
void collective(const std::source_location& where, CollectiveKind kind, unsigned mask, const void* value,
                std::size_t size, int parameter, int width, void* result);

void run_launch(const char* kernel_name, const std::source_location& where, dim3 grid, dim3 block,
                const std::function<void()>& body);
}  // namespace detail

template <typename T>
T shuffle(const std::source_location& where, CollectiveKind kind, unsigned mask, T value, int parameter,
          int width) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "warp shuffle of an unsupported type");
  T result;
  detail::collective(where, kind, mask, &value, sizeof(T), parameter, width, &result);
  return result;
}

inline unsigned ballot(const std::source_location& where, unsigned mask, int predicate) {
  const int value = predicate != 0;
  unsigned result = 0;
  detail::collective(where, CollectiveKind::kBallot, mask, &value, sizeof(value), 0, 32, &result);
  return result;
}

inline void syncwarp(const std::source_location& where, unsigned mask) {
  detail::collective(where, CollectiveKind::kSyncWarp, mask, nullptr, 0, 0, 32, nullptr);
}

// ------------------------------------------------------------------------------ global memory
// Every global-memory access of a kernel goes through ltfast::gpu::load/store (gpu_kernel.h),
// which call global_access. While a memory trace is on (start_memory_trace), the accesses of the
// launches made under the first schedule (ascending) are recorded as (kernel, source site, block,
// warp, lane, address, bytes) and summarised per launch when it ends: the bytes each kernel
// touches (each byte once: an ideal cache, what DRAM traffic is at best) and, per site, the warp
// requests. A request is the k-th execution of a site by the lanes of one warp since they last
// passed a rendezvous point or a row start (gpu::mark_row_start): lanes execute a warp's loop
// iterations together on a GPU, and the row start keeps lanes that skipped a masked access in a
// row's tail aligned in the next row. Sector efficiency = requested bytes / (32 x distinct 32-byte
// sectors of the requests), as Nsight Compute counts it.
namespace detail {
extern thread_local bool tl_trace_memory;
void record_access(const std::source_location& where, const void* address, std::size_t bytes, bool write);
void mark_row_start();
}  // namespace detail

inline void global_access(const std::source_location& where, const void* address, std::size_t bytes, bool write) {
  if (detail::tl_trace_memory) detail::record_access(where, address, bytes, write);
}
inline void row_start() {
  if (detail::tl_trace_memory) detail::mark_row_start();
}

// Starts recording (clearing what was recorded); stop_memory_trace ends it and returns the summary,
// one line per launch ("L", serial, kernel, bytes read, bytes written: distinct bytes; then the bytes
// of the distinct 32-byte sectors read and written) and per
// launch, site and direction ("S", serial, kernel, file:line:column, "r" | "w", requests,
// requested bytes, sectors, widest access in bytes, lowest address, end of the highest access:
// [lowest, end) tells which tensor a site reads or writes), tab-separated.
void start_memory_trace();
std::string stop_memory_trace();

// ------------------------------------------------------------------------------ ticket counter
// The counter of gpu::ticket_counter (gpu_glue.h) in the emulator: one per host thread (the emulator
// has one stream per thread), 0 at rest. Every launch must leave it at 0, as the GPU kernels rely on
// (a kernel that takes tickets takes gridDim.x of them, the last one wrapping it): run_launch checks
// that, and resets it after a launch that failed midway (an emulated CUDA_KERNEL_ASSERT, after which
// a GPU's context is lost anyway). nullptr while finish kernels are forced (a test switch: the launch
// plans then take the two-launch path they take under CUDA graph capture).
unsigned int* ticket_counter();
// Sets whether ticket_counter() returns nullptr on this thread; returns the previous setting.
bool force_finish_kernels(bool force);

// ------------------------------------------------------------------------------ shared memory
// One declaration site of a __shared__ array (LTFAST_SHARED_ARRAY); each block gets fresh,
// poisoned storage for it, with one "written" flag per element.
struct SharedSite {
  const char* name;
  const char* file;
  int line;
};

namespace detail {
struct SharedStorage {
  unsigned char* bytes;
  unsigned char* written;
};
SharedStorage shared_storage(const SharedSite& site, std::size_t element_size, int64_t count);
[[noreturn]] void shared_read_before_write(const SharedSite& site, int64_t index);
[[noreturn]] void shared_index_out_of_range(const SharedSite& site, int64_t index, int64_t count);
}  // namespace detail

// One element of a shared array: reads check that some thread of the block wrote it.
template <typename T>
class SharedRef {
 public:
  SharedRef(T* element, unsigned char* written, const SharedSite* site, int64_t index)
      : element_(element), written_(written), site_(site), index_(index) {}

  operator T() const {  // NOLINT(google-explicit-constructor): reads look like CUDA's
    if (!*written_) detail::shared_read_before_write(*site_, index_);
    return *element_;
  }
  SharedRef& operator=(const T& value) {
    *element_ = value;
    *written_ = 1;
    return *this;
  }
  SharedRef& operator=(const SharedRef& other) { return *this = static_cast<T>(other); }
  SharedRef& operator+=(const T& value) { return *this = static_cast<T>(*this) + value; }
  SharedRef& operator-=(const T& value) { return *this = static_cast<T>(*this) - value; }
  SharedRef& operator*=(const T& value) { return *this = static_cast<T>(*this) * value; }

 private:
  T* element_;
  unsigned char* written_;
  const SharedSite* site_;
  int64_t index_;
};

template <typename T, int64_t N>
class SharedArray {
 public:
  explicit SharedArray(const SharedSite& site) : site_(&site) {
    static_assert(std::is_trivially_copyable_v<T>, "__shared__ arrays hold trivially copyable types");
    const auto storage = detail::shared_storage(site, sizeof(T), N);
    data_ = reinterpret_cast<T*>(storage.bytes);
    written_ = storage.written;
  }
  SharedRef<T> operator[](int64_t index) const {
    if (index < 0 || index >= N) detail::shared_index_out_of_range(*site_, index, N);
    return SharedRef<T>(data_ + index, written_ + index, site_, index);
  }

 private:
  const SharedSite* site_;
  T* data_;
  unsigned char* written_;
};

// ------------------------------------------------------------------------------ launch
// Runs kernel<<<grid, block>>>(args...) to completion. Arguments are converted to the kernel's
// parameter types once, as the CUDA launch does, and every thread gets its own copies.
template <typename... Params, typename... Args>
void launch(const char* kernel_name, const std::source_location& where, void (*kernel)(Params...), dim3 grid,
            dim3 block, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel launched with the wrong number of arguments");
  const std::tuple<std::decay_t<Params>...> parameters(std::forward<Args>(args)...);
  detail::run_launch(kernel_name, where, grid, block, [&] { std::apply(kernel, parameters); });
}

}  // namespace simt
}  // namespace ltfast

// ------------------------------------------------------------------------------ CUDA spellings
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define threadIdx (::ltfast::simt::thread_index())
#define blockIdx (::ltfast::simt::block_index())
#define blockDim (::ltfast::simt::block_dim())
#define gridDim (::ltfast::simt::grid_dim())
#define warpSize 32
#define __syncthreads() ::ltfast::simt::syncthreads(std::source_location::current())
#define __shfl_sync(mask, value, lane, ...)                                                         \
  ::ltfast::simt::shuffle(std::source_location::current(), ::ltfast::simt::CollectiveKind::kShuffleIndex, \
                          mask, value, lane, ltfast_simt_width(__VA_ARGS__))
#define __shfl_xor_sync(mask, value, lane_mask, ...)                                                       \
  ::ltfast::simt::shuffle(std::source_location::current(), ::ltfast::simt::CollectiveKind::kShuffleXor, mask, \
                          value, lane_mask, ltfast_simt_width(__VA_ARGS__))
#define __shfl_down_sync(mask, value, delta, ...)                                                           \
  ::ltfast::simt::shuffle(std::source_location::current(), ::ltfast::simt::CollectiveKind::kShuffleDown, mask, \
                          value, delta, ltfast_simt_width(__VA_ARGS__))
#define __shfl_up_sync(mask, value, delta, ...)                                                           \
  ::ltfast::simt::shuffle(std::source_location::current(), ::ltfast::simt::CollectiveKind::kShuffleUp, mask, \
                          value, delta, ltfast_simt_width(__VA_ARGS__))
#define __ballot_sync(mask, predicate) ::ltfast::simt::ballot(std::source_location::current(), mask, predicate)
#define __syncwarp(...) ::ltfast::simt::syncwarp(std::source_location::current(), ltfast_simt_mask(__VA_ARGS__))

// The optional width / mask arguments of the intrinsics.
constexpr int ltfast_simt_width() { return 32; }
constexpr int ltfast_simt_width(int width) { return width; }
constexpr unsigned ltfast_simt_mask() { return 0xffffffffu; }
constexpr unsigned ltfast_simt_mask(unsigned mask) { return mask; }

// __expf is MUFU.EX2 of x * log2(e): emulate the rounding of that product, the part of its error
// that grows with |x| (CUDA documents 2 + floor(|1.16 x|) ulp). The ex2.approx step's own <= 2 ulp
// is not emulated: the host exp2f is correctly rounded or nearly so.
inline float __expf(float x) { return exp2f(x * 1.4426950408889634f); }

#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(condition)                                                                  \
  do {                                                                                                 \
    if (!(condition)) ::ltfast::simt::kernel_assert_failed(#condition, std::source_location::current()); \
  } while (false)

#define LTFAST_SIMT_SHARED_ARRAY(T, name, count)                                             \
  static const ::ltfast::simt::SharedSite name##_shared_site{#name, __FILE__, __LINE__};     \
  const ::ltfast::simt::SharedArray<T, (count)> name(name##_shared_site)
