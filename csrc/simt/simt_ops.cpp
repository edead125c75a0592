// Introspection op of the SIMT test library: ltfast_simt::counters() returns the emulator's totals
// [launches, blocks, threads, barriers, collectives, shared_arrays] since the library was loaded.
#include <torch/library.h>

#include <vector>

#include "simt.h"

namespace {

std::vector<int64_t> counters() {
  const auto c = ltfast::simt::counters();
  return {c.launches, c.blocks, c.threads, c.barriers, c.collectives, c.shared_arrays};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ltfast_simt, m) { m.def("counters() -> int[]", &counters); }
