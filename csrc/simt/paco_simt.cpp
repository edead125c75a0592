// The CUDA backend of paco, compiled for the SIMT emulator: the very same torch glue, launch plan
// and kernel bodies as the GPU build, registered as CPU kernels of ltfast_simt::* (tests only).
#include "../ops/paco/paco_cuda.cu"
