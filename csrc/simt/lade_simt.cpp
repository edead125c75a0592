// The CUDA backend of lade, compiled for the SIMT emulator: the very same torch glue, launch plan
// and kernel bodies as the GPU build, registered as CPU kernels of ltfast_simt::* (tests only).
#include "../ops/lade/lade_cuda.cu"
