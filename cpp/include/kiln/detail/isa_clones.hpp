// KILN_ISA_CLONES marks a hot loop to be built three times on x86-64: for AVX-512 (x86-64-v4), for AVX2 + FMA
// (x86-64-v3) and for any x86-64 CPU, the one this CPU runs picked when the library loads (an ifunc), so the build
// assumes nothing of the build machine's CPU. Those names are x86's: other architectures (aarch64) build the one
// plain loop, which the compiler vectorises for their baseline (NEON on aarch64).
#pragma once

#if defined(__x86_64__)
#define KILN_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KILN_ISA_CLONES
#endif
