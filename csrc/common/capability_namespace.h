// The namespace that keeps ltfast's CPU kernel code of one CPU capability apart from the others.
//
// Every csrc/ops/<family>/<family>_cpu.cpp is compiled three times on x86-64 (setup.py), with
// -DCPU_CAPABILITY=DEFAULT (no -m flags), =AVX2 (-mavx2 -mfma -mf16c) and =AVX512 (-mavx512f/bw/vl/dq),
// the way ATen builds aten/src/ATen/native/cpu/. Inline functions and templates of the headers those
// files include would otherwise be emitted three times under one name, compiled for three instruction
// sets: the linker keeps one copy and the DEFAULT path could end up calling AVX-512 code (an ODR
// violation, SIGILL on a CPU without it). As at::vec does (at::vec::CPU_CAPABILITY), the headers shared
// by the CPU kernels put their code in an inline namespace named after the capability, so each build
// has its own symbols while the code keeps writing math::hash32, cpu::vec_exp, ...
//
// Outside a capability build (the generic translation units: argument checks, autograd, schemas; the
// CUDA files; the SIMT emulator) CPU_CAPABILITY is undefined and the macros add nothing.
#pragma once

#if defined(CPU_CAPABILITY) && !defined(__CUDACC__) && !defined(__HIPCC__)
#define LTFAST_CAPABILITY_NAMESPACE_BEGIN inline namespace CPU_CAPABILITY {
#define LTFAST_CAPABILITY_NAMESPACE_END }
#else
#define LTFAST_CAPABILITY_NAMESPACE_BEGIN
#define LTFAST_CAPABILITY_NAMESPACE_END
#endif
