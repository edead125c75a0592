// Introspection op of the SIMT test library: ltfast_simt::counters() returns the emulator's totals
// [launches, blocks, threads, barriers, collectives, shared_arrays] since the library was loaded;
// memory_trace_start() / memory_trace_stop() -> str record the global-memory accesses of the
// launches in between (simt.h, start_memory_trace); force_finish_kernels(force) -> bool (the
// previous setting) makes the reduced forwards take their two-launch path on this thread, as under
// CUDA graph capture (simt.h, ticket_counter).
#include <torch/library.h>

#include <string>
#include <vector>

#include "simt.h"

namespace {

std::vector<int64_t> counters() {
  const auto c = ltfast::simt::counters();
  return {c.launches, c.blocks, c.threads, c.barriers, c.collectives, c.shared_arrays};
}

void memory_trace_start() { ltfast::simt::start_memory_trace(); }
bool force_finish_kernels(bool force) { return ltfast::simt::force_finish_kernels(force); }
std::string memory_trace_stop() { return ltfast::simt::stop_memory_trace(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(ltfast_simt, m) {
  m.def("counters() -> int[]", &counters);
  m.def("memory_trace_start() -> ()", &memory_trace_start);
  m.def("memory_trace_stop() -> str", &memory_trace_stop);
  m.def("force_finish_kernels(bool force) -> bool", &force_finish_kernels);
}
