// The CUDA backend of the multi-expert losses, compiled for the SIMT emulator: the very same torch
// glue, launch plan and kernel bodies as the GPU build, registered as CPU kernels of ltfast_simt::* (tests only).
#include "../ops/multi_expert/multi_expert_cuda.cu"
