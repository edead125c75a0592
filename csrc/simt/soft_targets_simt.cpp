// The CUDA backend of the soft-target ops, compiled for the SIMT emulator: the very same torch glue, launch
// plans and kernel bodies as the GPU build, registered as CPU kernels of ltfast_simt::* (tests only).
#include "../ops/soft_targets/soft_targets_cuda.cu"
