// Run-time choice of the CPU kernels' instruction set, as ATen's DispatchStub makes it.
//
// setup.py compiles every csrc/ops/<family>/<family>_cpu.cpp once per CPU capability: DEFAULT (no -m
// flags: any x86-64 CPU, and the only build on other architectures), AVX2 (-mavx2 -mfma -mf16c: 8
// float lanes) and AVX512 (-mavx512f -mavx512bw -mavx512vl -mavx512dq: 16 float lanes); each build puts
// its kernels in ltfast::<CAPABILITY>. The DEFAULT build also defines the entry points that the op
// registrations use (LTFAST_CPU_DISPATCH below): each one calls the kernels of
// cpu_kernel_capability(), which follows at::native::get_cpu_capability(), so ATEN_CPU_CAPABILITY=avx2
// (or default) forces the narrower path exactly as it does for ATen's own kernels. Nothing of the
// AVX2/AVX512 builds runs at load time: they have no static initialisers (the TORCH_LIBRARY_IMPL
// blocks live in the DEFAULT build only).
#pragma once

namespace ltfast {

enum class CpuKernelCapability : int { Default = 0, Avx2 = 1, Avx512 = 2 };

// The capability whose kernels run: at::native::get_cpu_capability() (CPU detection, or
// ATEN_CPU_CAPABILITY), capped by what this build holds and by the CPU's own feature bits (F16C is
// part of our AVX2 build but not of ATen's AVX2 test). Computed once. Defined in csrc/cpu_capability.cpp.
CpuKernelCapability cpu_kernel_capability();
const char* cpu_kernel_capability_name();  // "DEFAULT", "AVX2" or "AVX512"

}  // namespace ltfast

// Set by setup.py for every translation unit when it builds the AVX2 and AVX512 kernels (x86-64).
#if defined(LTFAST_CPU_DISPATCH_X86)
#define LTFAST_CPU_DISPATCH_DECLARE_(return_type, name, params) \
  namespace DEFAULT {                                           \
  return_type name params;                                      \
  }                                                             \
  namespace AVX2 {                                              \
  return_type name params;                                      \
  }                                                             \
  namespace AVX512 {                                            \
  return_type name params;                                      \
  }
#define LTFAST_CPU_DISPATCH_CALL_(name, args)                                \
  switch (::ltfast::cpu_kernel_capability()) {                               \
    case ::ltfast::CpuKernelCapability::Avx512: return AVX512::name args;    \
    case ::ltfast::CpuKernelCapability::Avx2: return AVX2::name args;        \
    default: return DEFAULT::name args;                                      \
  }
#else
#define LTFAST_CPU_DISPATCH_DECLARE_(return_type, name, params) \
  namespace DEFAULT {                                           \
  return_type name params;                                      \
  }
#define LTFAST_CPU_DISPATCH_CALL_(name, args) return DEFAULT::name args;
#endif

// Defines `return_type name params` in the enclosing namespace (ltfast) as a call of the
// capability's ltfast::<CAPABILITY>::name. Use it in namespace ltfast, e.g.
//   LTFAST_CPU_DISPATCH(at::Tensor, lade_backward_cpu, (const LadeArgs& a, const at::Tensor& g), (a, g))
#define LTFAST_CPU_DISPATCH(return_type, name, params, args) \
  LTFAST_CPU_DISPATCH_DECLARE_(return_type, name, params)    \
  return_type name params { LTFAST_CPU_DISPATCH_CALL_(name, args) }
