// The choice of CPU kernels (csrc/common/cpu_dispatch.h). A generic translation unit: compiled
// without -mavx2, so it runs on any x86-64 CPU.
#include <ATen/Version.h>

#include <string>

#include "common/cpu_dispatch.h"

namespace ltfast {
namespace {

CpuKernelCapability compute_cpu_kernel_capability() {
#if defined(LTFAST_CPU_DISPATCH_X86)
  // at::get_cpu_capability() names ATen's own pick, at::native::get_cpu_capability() (cpuinfo,
  // lowered by ATEN_CPU_CAPABILITY; the enum function itself is not exported from libtorch_cpu). Its
  // AVX2 test is AVX2 + FMA and its AVX512 test AVX512F/BW/DQ/VL + FMA; our builds add F16C (half
  // conversions), so the CPU's bits are checked too (every AVX2 CPU so far has F16C).
  const std::string aten = at::get_cpu_capability();
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (aten == "AVX512" && avx512) return CpuKernelCapability::Avx512;
  if ((aten == "AVX512" || aten == "AVX2") && avx2) {
    return CpuKernelCapability::Avx2;
  }
#endif
  return CpuKernelCapability::Default;
}

}  // namespace

CpuKernelCapability cpu_kernel_capability() {
  static const CpuKernelCapability capability = compute_cpu_kernel_capability();  // thread-safe, once
  return capability;
}

const char* cpu_kernel_capability_name() {
  switch (cpu_kernel_capability()) {
    case CpuKernelCapability::Avx512: return "AVX512";
    case CpuKernelCapability::Avx2: return "AVX2";
    default: return "DEFAULT";
  }
}

}  // namespace ltfast
