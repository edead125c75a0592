// The SIMT emulator's scheduler: fibers, rendezvous points, shared memory and their checks. See
// simt.h for what is checked and why.
#include "simt.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <exception>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <unordered_map>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace ltfast {
namespace simt {
namespace {

// ------------------------------------------------------------------------------ stacks
// 64 KiB per fiber: the kernels use a few hundred bytes, an exception unwinding through them a few
// KiB. mmap commits pages lazily, so a 1024-thread block costs what it touches, and a guard page
// below each stack turns an overflow into a fault instead of silent corruption.
constexpr std::size_t kStackBytes = 64 * 1024;

struct Stack {
  void* base = nullptr;  // guard page + stack
  std::size_t bytes = 0;
  unsigned char* top() const { return static_cast<unsigned char*>(base) + bytes; }
};

class StackPool {
 public:
  ~StackPool() {
    for (const Stack& s : free_) munmap(s.base, s.bytes);
  }
  Stack acquire() {
    if (!free_.empty()) {
      Stack s = free_.back();
      free_.pop_back();
      return s;
    }
    const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    Stack s;
    s.bytes = kStackBytes + page;
    s.base = mmap(nullptr, s.bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (s.base == MAP_FAILED) throw Error("ltfast.simt: could not allocate a fiber stack");
    mprotect(s.base, page, PROT_NONE);
    return s;
  }
  void release(const Stack& s) { free_.push_back(s); }

 private:
  std::vector<Stack> free_;
};

// ------------------------------------------------------------------------------ context switch
#if defined(__x86_64__)
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores the
// stack pointer in *save, and resumes the context whose stack pointer is `load`. A tenth of the cost
// of swapcontext, which makes a sigprocmask system call at every switch.
extern "C" void ltfast_simt_switch(void** save, void* load);
asm(R"(
  .text
  .p2align 4
  .type ltfast_simt_switch, @function
ltfast_simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size ltfast_simt_switch, .-ltfast_simt_switch
)");

struct Context {
  void* sp = nullptr;
};

// A fresh context that starts in entry() on `stack`, with the caller's floating-point modes.
void make_context(Context& context, const Stack& stack, void (*entry)()) {
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack.top()) & ~uintptr_t(15));
  uint32_t mxcsr;
  uint16_t fpu_control;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpu_control));
  *--top = 0;                                     // entry's return address: entry never returns
  *--top = reinterpret_cast<uint64_t>(entry);     // popped by `ret`
  for (int r = 0; r < 6; ++r) *--top = 0;         // rbp, rbx, r12-r15
  *--top = uint64_t(mxcsr) | (uint64_t(fpu_control) << 32);
  context.sp = top;
}

void switch_context(Context& from, const Context& to) { ltfast_simt_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};

void make_context(Context& context, const Stack& stack, void (*entry)()) {
  getcontext(&context.uc);
  context.uc.uc_stack.ss_sp = static_cast<unsigned char*>(stack.base) + sysconf(_SC_PAGESIZE);
  context.uc.uc_stack.ss_size = kStackBytes;
  context.uc.uc_link = nullptr;
  makecontext(&context.uc, entry, 0);
}

void switch_context(Context& from, const Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ------------------------------------------------------------------------------ fibers and blocks
enum class State : uint8_t { kRunnable, kBarrier, kCollective, kExited };

struct CollectiveRequest {
  CollectiveKind kind;
  unsigned mask;
  int parameter;
  int width;
  std::size_t size;
  unsigned char value[16];
  unsigned char result[16];
};

struct Fiber {
  Context context;
  Stack stack;
  State state = State::kRunnable;
  std::source_location site;       // where it waits
  std::source_location last_sync;  // the last barrier it passed (located reads of shared memory)
  bool passed_sync = false;
  CollectiveRequest request{};
  dim3 index;
  std::exception_ptr error;
  // Memory trace: rendezvous points and row starts passed (the request grouping's epoch), and per
  // site the epoch of its last execution and the executions in that epoch.
  uint32_t epoch = 0;
  std::vector<std::pair<uint32_t, uint32_t>> site_executions;
};

struct LaunchInfo {
  const char* name;
  std::source_location where;
  dim3 grid, block;
  const std::function<void()>* body;
};

struct SharedBuffer {
  std::vector<unsigned char> bytes;
  std::vector<unsigned char> written;
};

struct BlockRun {
  const LaunchInfo* launch;
  dim3 index;
  std::vector<Fiber> fibers;
  Context scheduler;
  int current = -1;
  std::unordered_map<const SharedSite*, std::unique_ptr<SharedBuffer>> shared;
};

thread_local BlockRun* tl_block = nullptr;

// ------------------------------------------------------------------------------ memory trace
struct Access {
  uint32_t site;
  uint32_t warp;
  uint32_t epoch;
  uint32_t execution;
  uint64_t address;
  uint32_t bytes;
  bool write;
};

struct SiteKey {
  const char* file;
  uint32_t line, column;
  bool operator==(const SiteKey& o) const { return file == o.file && line == o.line && column == o.column; }
};
struct SiteKeyHash {
  std::size_t operator()(const SiteKey& k) const {
    return std::hash<const void*>()(k.file) ^ (std::size_t(k.line) << 20) ^ std::size_t(k.column);
  }
};

struct SiteStats {
  int64_t requests = 0, bytes = 0, sectors = 0, widest = 0;
  uint64_t lowest = ~uint64_t(0), highest = 0;  // the addresses touched: [lowest, highest)
};

struct MemoryTrace {
  std::unordered_map<SiteKey, uint32_t, SiteKeyHash> site_ids;
  std::vector<std::string> site_names;
  std::vector<Access> block_accesses;  // of the running block
  // Of the running launch: per (site, write) the request statistics; the byte ranges touched.
  std::unordered_map<uint64_t, SiteStats> site_stats;
  std::vector<std::pair<uint64_t, uint64_t>> ranges[2];  // [read, write]: [begin, end)
  std::string summary;
};
thread_local MemoryTrace tl_memory;
thread_local Schedule tl_schedule = Schedule::kAscending;
thread_local StackPool tl_stacks;
thread_local std::vector<std::string> tl_launched;
thread_local uint64_t tl_launch_serial = 0;
thread_local unsigned int tl_ticket_counter = 0;
thread_local bool tl_force_finish_kernels = false;
Counters g_counters;  // written by whichever thread emulates; read only for reporting

// The path from csrc/ on, with "dir/../" collapsed (kernel headers are included through
// csrc/simt/../ops/...).
std::string short_file(const char* path) {
  std::string p = path;
  for (std::size_t up; (up = p.find("/../")) != std::string::npos;) {
    const std::size_t parent = p.rfind('/', up == 0 ? 0 : up - 1);
    p.erase(parent == std::string::npos ? 0 : parent, up + 3 - (parent == std::string::npos ? 0 : parent));
  }
  const std::size_t csrc = p.find("csrc/");
  return csrc == std::string::npos ? p : p.substr(csrc);
}

std::string location(const std::source_location& where) {
  std::ostringstream out;
  out << short_file(where.file_name()) << ":" << where.line();
  return out.str();
}

bool same_site(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() && std::strcmp(a.file_name(), b.file_name()) == 0;
}

std::string dims(const dim3& d) {
  std::ostringstream out;
  out << "(" << d.x << ", " << d.y << ", " << d.z << ")";
  return out.str();
}

unsigned linear_index(const dim3& i, const dim3& extent) { return i.x + extent.x * (i.y + extent.y * i.z); }

dim3 unlinear(unsigned linear, const dim3& extent) {
  return dim3(linear % extent.x, (linear / extent.x) % extent.y, linear / (extent.x * extent.y));
}

// "ltfast.simt: kernel K (launched at F:L), block (..), thread (..): " for the running fiber.
std::string context_prefix(const BlockRun& block, int thread) {
  std::ostringstream out;
  out << "ltfast.simt: kernel " << block.launch->name << ", block " << dims(block.index);
  if (thread >= 0) out << ", thread " << dims(block.fibers[static_cast<std::size_t>(thread)].index);
  out << ": ";
  return out.str();
}

BlockRun& running_block(const char* what) {
  if (tl_block == nullptr || tl_block->current < 0) {
    throw Error(std::string("ltfast.simt: ") + what + " used outside an emulated kernel");
  }
  return *tl_block;
}

Fiber& running_fiber(const char* what) {
  BlockRun& block = running_block(what);
  return block.fibers[static_cast<std::size_t>(block.current)];
}

void yield_to_scheduler(Fiber& fiber) { switch_context(fiber.context, tl_block->scheduler); }

[[noreturn]] void fiber_entry() {
  BlockRun* block = tl_block;
  Fiber& fiber = block->fibers[static_cast<std::size_t>(block->current)];
  try {
    (*block->launch->body)();
  } catch (...) {
    fiber.error = std::current_exception();
  }
  fiber.state = State::kExited;
  switch_context(fiber.context, block->scheduler);
  std::terminate();  // an exited fiber is never resumed
}

std::string describe_wait(const Fiber& fiber) {
  switch (fiber.state) {
    case State::kExited: return "has exited";
    case State::kBarrier: return "waits at __syncthreads at " + location(fiber.site);
    case State::kCollective: {
      std::ostringstream out;
      out << "waits at a warp collective at " << location(fiber.site) << " with mask 0x" << std::hex
          << fiber.request.mask;
      return out.str();
    }
    case State::kRunnable: return "is runnable";
  }
  return "?";
}

// Completes every warp collective whose lanes have all arrived; returns whether any completed.
bool complete_collectives(BlockRun& block) {
  bool progress = false;
  const int threads = static_cast<int>(block.fibers.size());
  for (int first = 0; first < threads; first += 32) {
    const int lanes = std::min(32, threads - first);
    for (int lane = 0; lane < lanes; ++lane) {
      Fiber& leader = block.fibers[static_cast<std::size_t>(first + lane)];
      if (leader.state != State::kCollective) continue;
      const CollectiveRequest& request = leader.request;
      bool complete = true;
      for (int other = 0; other < 32 && complete; ++other) {
        if (!(request.mask >> other & 1u)) continue;
        if (other >= lanes) complete = false;
        else {
          const Fiber& f = block.fibers[static_cast<std::size_t>(first + other)];
          complete = f.state == State::kCollective && same_site(f.site, leader.site) &&
                     f.request.mask == request.mask && f.request.kind == request.kind;
        }
      }
      if (!complete) continue;
      // Every lane of the mask is here: compute each lane's result from the deposited operands.
      for (int other = 0; other < 32; ++other) {
        if (!(request.mask >> other & 1u)) continue;
        Fiber& f = block.fibers[static_cast<std::size_t>(first + other)];
        CollectiveRequest& r = f.request;
        if (r.kind == CollectiveKind::kBallot) {
          unsigned bits = 0;
          for (int k = 0; k < 32; ++k) {
            if (!(request.mask >> k & 1u)) continue;
            int predicate;
            std::memcpy(&predicate, block.fibers[static_cast<std::size_t>(first + k)].request.value, sizeof(int));
            if (predicate) bits |= 1u << k;
          }
          std::memcpy(r.result, &bits, sizeof(bits));
        } else if (r.kind != CollectiveKind::kSyncWarp) {
          const int width = r.width;
          const int segment = (other / width) * width;
          int source = other;
          switch (r.kind) {
            case CollectiveKind::kShuffleIndex: source = segment + (r.parameter & (width - 1)); break;
            case CollectiveKind::kShuffleXor: source = other ^ r.parameter; break;
            case CollectiveKind::kShuffleDown: source = other + r.parameter; break;
            case CollectiveKind::kShuffleUp: source = other - r.parameter; break;
            default: break;
          }
          // A lane outside the caller's width segment gives the caller's own value, except that xor
          // may read earlier segments (CUDA programming guide, warp shuffle functions).
          const bool before = source < segment && r.kind != CollectiveKind::kShuffleXor;
          if (before || source >= segment + width || source < 0) source = other;
          if (!(request.mask >> source & 1u)) {
            throw Error(context_prefix(block, first + other) + "__shfl at " + location(f.site) + " reads lane " +
                        std::to_string(source) + ", which is not in the mask (its value is undefined on a GPU)");
          }
          const Fiber& from = block.fibers[static_cast<std::size_t>(first + source)];
          if (from.request.size != r.size) {
            throw Error(context_prefix(block, first + other) + "__shfl at " + location(f.site) +
                        " exchanges operands of different sizes between lanes");
          }
          std::memcpy(r.result, from.request.value, r.size);
        }
      }
      for (int other = 0; other < 32; ++other) {
        if (request.mask >> other & 1u) block.fibers[static_cast<std::size_t>(first + other)].state = State::kRunnable;
      }
      ++g_counters.collectives;
      progress = true;
    }
  }
  return progress;
}

// Nothing can run and no collective can complete: either every live thread waits at one barrier
// (release it) or the block is stuck, which is reported with what each thread waits for.
void resolve_barrier_or_report(BlockRun& block) {
  const int threads = static_cast<int>(block.fibers.size());
  int exited = -1, at_barrier = -1;
  for (int t = 0; t < threads; ++t) {
    const Fiber& f = block.fibers[static_cast<std::size_t>(t)];
    if (f.state == State::kCollective) {
      // An incomplete collective: name the first lane of its mask that is not there.
      const int first = t / 32 * 32;
      for (int lane = 0; lane < 32; ++lane) {
        if (!(f.request.mask >> lane & 1u)) continue;
        if (first + lane >= threads) {
          throw Error(context_prefix(block, t) + "the warp collective at " + location(f.site) + " names lane " +
                      std::to_string(lane) + " in its mask, which does not exist in a block of " +
                      std::to_string(threads) + " threads");
        }
        const Fiber& other = block.fibers[static_cast<std::size_t>(first + lane)];
        const bool here = other.state == State::kCollective && same_site(other.site, f.site) &&
                          other.request.mask == f.request.mask;
        if (!here) {
          std::ostringstream out;
          out << context_prefix(block, t) << "deadlock: the warp collective at " << location(f.site) << " (mask 0x"
              << std::hex << f.request.mask << std::dec << ") names lane " << lane << ", which "
              << describe_wait(other) << " (a collective in a lane-divergent branch, or after some lanes exited)";
          throw Error(out.str());
        }
      }
    }
    if (f.state == State::kExited && exited < 0) exited = t;
    if (f.state == State::kBarrier && at_barrier < 0) at_barrier = t;
  }
  if (at_barrier < 0) return;  // every thread exited
  const Fiber& reference = block.fibers[static_cast<std::size_t>(at_barrier)];
  for (int t = 0; t < threads; ++t) {
    const Fiber& f = block.fibers[static_cast<std::size_t>(t)];
    if (f.state == State::kBarrier && !same_site(f.site, reference.site)) {
      throw Error(context_prefix(block, t) + "divergent __syncthreads: this thread waits at " + location(f.site) +
                  " while thread " + dims(reference.index) + " waits at " + location(reference.site));
    }
  }
  if (exited >= 0) {
    throw Error(context_prefix(block, at_barrier) + "__syncthreads at " + location(reference.site) +
                " is reached by part of the block while thread " +
                dims(block.fibers[static_cast<std::size_t>(exited)].index) +
                " has exited (a barrier inside a branch or loop that not every thread takes)");
  }
  for (Fiber& f : block.fibers) {
    f.state = State::kRunnable;
    f.last_sync = f.site;
    f.passed_sync = true;
  }
  ++g_counters.barriers;
}

// Sorts and merges [begin, end) ranges in place.
void merge_ranges(std::vector<std::pair<uint64_t, uint64_t>>& ranges) {
  std::sort(ranges.begin(), ranges.end());
  std::size_t kept = 0;
  for (const auto& r : ranges) {
    if (kept > 0 && r.first <= ranges[kept - 1].second) {
      ranges[kept - 1].second = std::max(ranges[kept - 1].second, r.second);
    } else {
      ranges[kept++] = r;
    }
  }
  ranges.resize(kept);
}

// A block has ended: its accesses become warp requests (per site statistics) and byte ranges.
void summarise_block_accesses() {
  auto& accesses = tl_memory.block_accesses;
  if (accesses.empty()) return;
  std::sort(accesses.begin(), accesses.end(), [](const Access& a, const Access& b) {
    return std::tie(a.site, a.write, a.warp, a.epoch, a.execution, a.address) <
           std::tie(b.site, b.write, b.warp, b.epoch, b.execution, b.address);
  });
  std::vector<std::pair<uint64_t, uint64_t>> block_ranges[2];
  for (std::size_t first = 0; first < accesses.size();) {
    const Access& head = accesses[first];
    std::size_t end = first;
    int64_t bytes = 0, sectors = 0, widest = 0;
    uint64_t last_sector = 0, covered_end = 0;  // of the request's bytes so far (sorted by address)
    bool any_sector = false;
    for (; end < accesses.size(); ++end) {
      const Access& a = accesses[end];
      if (a.site != head.site || a.write != head.write || a.warp != head.warp || a.epoch != head.epoch ||
          a.execution != head.execution) {
        break;
      }
      // Bytes the request uses: lanes reading the same bytes (a broadcast) count them once, as the
      // sectors do, so that the efficiency stays <= 1.
      const uint64_t begin = std::max<uint64_t>(a.address, covered_end);
      if (a.address + a.bytes > begin) bytes += static_cast<int64_t>(a.address + a.bytes - begin);
      covered_end = std::max<uint64_t>(covered_end, a.address + a.bytes);
      widest = std::max<int64_t>(widest, a.bytes);
      // Sorted by address: a sector is new unless it is the last one counted.
      uint64_t first_sector = a.address / 32;
      const uint64_t end_sector = (a.address + a.bytes - 1) / 32;
      if (any_sector && first_sector <= last_sector) first_sector = last_sector + 1;
      if (first_sector <= end_sector) {
        sectors += static_cast<int64_t>(end_sector - first_sector + 1);
        last_sector = end_sector;
        any_sector = true;
      }
      block_ranges[a.write].emplace_back(a.address, a.address + a.bytes);
    }
    SiteStats& stats = tl_memory.site_stats[uint64_t(head.site) << 1 | uint64_t(head.write)];
    stats.requests += 1;
    stats.bytes += bytes;
    stats.sectors += sectors;
    stats.widest = std::max(stats.widest, widest);
    stats.lowest = std::min(stats.lowest, accesses[first].address);
    for (std::size_t i = first; i < end; ++i) {
      stats.highest = std::max(stats.highest, accesses[i].address + accesses[i].bytes);
    }
    first = end;
  }
  for (int w = 0; w < 2; ++w) {
    merge_ranges(block_ranges[w]);
    auto& launch_ranges = tl_memory.ranges[w];
    launch_ranges.insert(launch_ranges.end(), block_ranges[w].begin(), block_ranges[w].end());
  }
  accesses.clear();
}

// A traced launch has ended: its summary lines (see stop_memory_trace).
void summarise_launch_accesses(const char* kernel_name, uint64_t serial) {
  // Distinct bytes, and the bytes of the distinct 32-byte sectors (what DRAM moves at least: a
  // kernel that skips elements of a sector still moves the sector).
  int64_t distinct[2] = {0, 0}, sector_bytes[2] = {0, 0};
  for (int w = 0; w < 2; ++w) {
    auto& ranges = tl_memory.ranges[w];
    merge_ranges(ranges);
    for (auto& r : ranges) {
      distinct[w] += static_cast<int64_t>(r.second - r.first);
      r = {r.first / 32 * 32, (r.second + 31) / 32 * 32};
    }
    merge_ranges(ranges);
    for (const auto& r : ranges) sector_bytes[w] += static_cast<int64_t>(r.second - r.first);
    ranges.clear();
  }
  std::ostringstream out;
  out << "L\t" << serial << "\t" << kernel_name << "\t" << distinct[0] << "\t" << distinct[1] << "\t"
      << sector_bytes[0] << "\t" << sector_bytes[1] << "\n";
  std::vector<std::pair<uint64_t, SiteStats>> sites(tl_memory.site_stats.begin(), tl_memory.site_stats.end());
  std::sort(sites.begin(), sites.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (const auto& [key, stats] : sites) {
    out << "S\t" << serial << "\t" << kernel_name << "\t" << tl_memory.site_names[key >> 1] << "\t"
        << ((key & 1) ? "w" : "r") << "\t" << stats.requests << "\t" << stats.bytes << "\t" << stats.sectors << "\t"
        << stats.widest << "\t" << stats.lowest << "\t" << stats.highest << "\n";
  }
  tl_memory.site_stats.clear();
  tl_memory.summary += out.str();
}

void run_block(const LaunchInfo& launch, const dim3& block_index, uint64_t block_seed) {
  const unsigned threads = launch.block.x * launch.block.y * launch.block.z;
  BlockRun block;
  block.launch = &launch;
  block.index = block_index;
  block.fibers.resize(threads);
  BlockRun* const outer = tl_block;
  tl_block = &block;
  struct Cleanup {
    BlockRun& block;
    BlockRun* outer;
    ~Cleanup() {
      for (Fiber& f : block.fibers) {
        if (f.stack.base) tl_stacks.release(f.stack);
      }
      tl_block = outer;
    }
  } cleanup{block, outer};
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = block.fibers[t];
    f.index = unlinear(t, launch.block);
    f.stack = tl_stacks.acquire();
    make_context(f.context, f.stack, &fiber_entry);
  }
  g_counters.threads += threads;

  std::vector<int> order(threads);
  std::mt19937_64 random(block_seed);
  while (true) {
    std::iota(order.begin(), order.end(), 0);
    if (tl_schedule == Schedule::kDescending) std::reverse(order.begin(), order.end());
    if (tl_schedule == Schedule::kShuffled) std::shuffle(order.begin(), order.end(), random);
    bool any_live = false;
    for (const int t : order) {
      Fiber& f = block.fibers[static_cast<std::size_t>(t)];
      if (f.state != State::kRunnable) continue;
      block.current = t;
      switch_context(block.scheduler, f.context);
      block.current = -1;
      if (f.error) std::rethrow_exception(f.error);
    }
    for (const Fiber& f : block.fibers) any_live = any_live || f.state != State::kExited;
    if (!any_live) {
      if (detail::tl_trace_memory) summarise_block_accesses();
      return;
    }
    if (complete_collectives(block)) continue;
    resolve_barrier_or_report(block);
  }
}

}  // namespace

// ------------------------------------------------------------------------------ public API
const char* schedule_name(Schedule schedule) {
  switch (schedule) {
    case Schedule::kAscending: return "ascending lanes, blocks in order";
    case Schedule::kDescending: return "descending lanes, blocks in reverse order";
    case Schedule::kShuffled: return "shuffled lanes, blocks shuffled";
  }
  return "?";
}

ScheduleGuard::ScheduleGuard(Schedule schedule) : previous_(tl_schedule) { tl_schedule = schedule; }
ScheduleGuard::~ScheduleGuard() { tl_schedule = previous_; }

Counters counters() { return g_counters; }

std::string take_launched_kernel_names() {
  std::string names;
  for (const std::string& name : tl_launched) {
    if (names.find(name) != std::string::npos) continue;
    names += (names.empty() ? "" : ", ") + name;
  }
  tl_launched.clear();
  return names;
}

const dim3& thread_index() { return running_fiber("threadIdx").index; }
const dim3& block_index() { return running_block("blockIdx").index; }
const dim3& block_dim() { return running_block("blockDim").launch->block; }
const dim3& grid_dim() { return running_block("gridDim").launch->grid; }

void syncthreads(const std::source_location& where) {
  Fiber& fiber = running_fiber("__syncthreads");
  fiber.state = State::kBarrier;
  fiber.site = where;
  ++fiber.epoch;
  yield_to_scheduler(fiber);
}

void kernel_assert_failed(const char* condition, const std::source_location& where) {
  BlockRun& block = running_block("CUDA_KERNEL_ASSERT");
  throw Error(context_prefix(block, block.current) + "CUDA_KERNEL_ASSERT(" + condition + ") failed at " +
              location(where) + " (on a GPU: a device-side assert, which ends the CUDA context)");
}

namespace detail {

thread_local bool tl_trace_memory = false;

void record_access(const std::source_location& where, const void* address, std::size_t bytes, bool write) {
  if (tl_schedule != Schedule::kAscending) return;  // the other schedules make the same accesses
  BlockRun& block = running_block("a global-memory access");
  Fiber& fiber = block.fibers[static_cast<std::size_t>(block.current)];
  const SiteKey key{where.file_name(), where.line(), where.column()};
  auto found = tl_memory.site_ids.find(key);
  if (found == tl_memory.site_ids.end()) {
    found = tl_memory.site_ids.emplace(key, static_cast<uint32_t>(tl_memory.site_names.size())).first;
    tl_memory.site_names.push_back(location(where) + ":" + std::to_string(where.column()));
  }
  const uint32_t site = found->second;
  if (fiber.site_executions.size() <= site) fiber.site_executions.resize(site + 1, {~0u, 0u});
  auto& [epoch, executions] = fiber.site_executions[site];
  if (epoch != fiber.epoch) {
    epoch = fiber.epoch;
    executions = 0;
  }
  tl_memory.block_accesses.push_back(Access{site, static_cast<uint32_t>(block.current / 32), fiber.epoch, executions++,
                                            reinterpret_cast<uint64_t>(address), static_cast<uint32_t>(bytes), write});
}

void mark_row_start() {
  if (tl_block == nullptr || tl_block->current < 0) return;
  ++tl_block->fibers[static_cast<std::size_t>(tl_block->current)].epoch;
}

void collective(const std::source_location& where, CollectiveKind kind, unsigned mask, const void* value,
                std::size_t size, int parameter, int width, void* result) {
  BlockRun& block = running_block("a warp collective");
  Fiber& fiber = block.fibers[static_cast<std::size_t>(block.current)];
  const int lane = block.current % 32;
  if (!(mask >> lane & 1u)) {
    throw Error(context_prefix(block, block.current) + "the warp collective at " + location(where) +
                " is called by lane " + std::to_string(lane) + ", which is not in its mask");
  }
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    throw Error(context_prefix(block, block.current) + "the shuffle at " + location(where) + " has width " +
                std::to_string(width) + ": expected a power of two in [1, 32]");
  }
  CollectiveRequest& request = fiber.request;
  request.kind = kind;
  request.mask = mask;
  request.parameter = parameter;
  request.width = width;
  request.size = size;
  if (size) std::memcpy(request.value, value, size);
  fiber.state = State::kCollective;
  fiber.site = where;
  ++fiber.epoch;
  yield_to_scheduler(fiber);
  if (result && kind != CollectiveKind::kSyncWarp) std::memcpy(result, request.result, kind == CollectiveKind::kBallot ? sizeof(unsigned) : size);
}

SharedStorage shared_storage(const SharedSite& site, std::size_t element_size, int64_t count) {
  BlockRun& block = running_block("__shared__ memory");
  auto& slot = block.shared[&site];
  if (!slot) {
    slot = std::make_unique<SharedBuffer>();
    // Poison: every byte 0xff (NaN for floats, -1 for integers), and nothing marked written.
    slot->bytes.assign(element_size * static_cast<std::size_t>(count), 0xff);
    slot->written.assign(static_cast<std::size_t>(count), 0);
    ++g_counters.shared_arrays;
  }
  return {slot->bytes.data(), slot->written.data()};
}

void shared_read_before_write(const SharedSite& site, int64_t index) {
  BlockRun& block = running_block("__shared__ memory");
  const Fiber& fiber = block.fibers[static_cast<std::size_t>(block.current)];
  std::ostringstream out;
  out << context_prefix(block, block.current) << "read of __shared__ " << site.name << "[" << index
      << "] (declared at " << short_file(site.file) << ":" << site.line
      << "), which no thread of this block has written ";
  if (fiber.passed_sync) out << "(this thread last passed the barrier at " << location(fiber.last_sync) << ")";
  else out << "(before this thread's first barrier)";
  throw Error(out.str());
}

void shared_index_out_of_range(const SharedSite& site, int64_t index, int64_t count) {
  BlockRun& block = running_block("__shared__ memory");
  throw Error(context_prefix(block, block.current) + "__shared__ " + site.name + "[" + std::to_string(index) +
              "] is out of bounds (declared at " + short_file(site.file) + ":" + std::to_string(site.line) +
              " with " + std::to_string(count) + " elements)");
}

void run_launch(const char* kernel_name, const std::source_location& where, dim3 grid, dim3 block,
                const std::function<void()>& body) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535) {
    throw Error(std::string("ltfast.simt: kernel ") + kernel_name + " launched with an invalid configuration: grid " + dims(grid) + ", block " + dims(block) +
                " (a GPU rejects it with cudaErrorInvalidConfiguration)");
  }
  LaunchInfo launch{kernel_name, where, grid, block, &body};
  tl_launched.emplace_back(kernel_name);
  ++g_counters.launches;
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order(blocks);
  std::iota(order.begin(), order.end(), uint64_t(0));
  const uint64_t serial = ++tl_launch_serial;
  if (tl_schedule == Schedule::kDescending) std::reverse(order.begin(), order.end());
  if (tl_schedule == Schedule::kShuffled) {
    std::mt19937_64 random(0x5eed0000ULL + serial);
    std::shuffle(order.begin(), order.end(), random);
  }
  try {
    for (const uint64_t b : order) {
      const dim3 index(static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                       static_cast<unsigned>(b / (uint64_t(grid.x) * grid.y)));
      run_block(launch, index, (serial << 32) ^ b);
      ++g_counters.blocks;
    }
  } catch (...) {
    tl_ticket_counter = 0;  // the blocks that did not run took no ticket
    throw;
  }
  if (tl_ticket_counter != 0) {
    const unsigned left = tl_ticket_counter;
    tl_ticket_counter = 0;
    throw Error(std::string("ltfast.simt: kernel ") + kernel_name + " left the ticket counter at " +
                std::to_string(left) + " (expected 0: a kernel that takes tickets takes one per block, and the "
                "last one wraps the counter to 0; the next launch on the stream would finish too early)");
  }
  if (tl_trace_memory && tl_schedule == Schedule::kAscending) summarise_launch_accesses(kernel_name, serial);
}

}  // namespace detail

unsigned int* ticket_counter() { return tl_force_finish_kernels ? nullptr : &tl_ticket_counter; }

bool force_finish_kernels(bool force) {
  const bool previous = tl_force_finish_kernels;
  tl_force_finish_kernels = force;
  return previous;
}

void start_memory_trace() {
  tl_memory.summary.clear();
  tl_memory.block_accesses.clear();
  tl_memory.site_stats.clear();
  tl_memory.ranges[0].clear();
  tl_memory.ranges[1].clear();
  detail::tl_trace_memory = true;
}

std::string stop_memory_trace() {
  detail::tl_trace_memory = false;
  std::string summary;
  summary.swap(tl_memory.summary);
  return summary;
}

}  // namespace simt
}  // namespace ltfast
