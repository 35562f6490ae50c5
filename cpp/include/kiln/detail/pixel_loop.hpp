// KILN_PIXEL_LOOP marks a per-pixel loop to be built twice on x86-64 with GCC: for any x86-64 CPU and for
// AVX2 + FMA (x86-64-v3), the one picked when the library loads (an ifunc). The build then assumes nothing of
// the build machine's CPU, and other architectures (aarch64) build the plain loop.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KILN_PIXEL_LOOP __attribute__((target_clones("default", "arch=x86-64-v3")))
#else
#define KILN_PIXEL_LOOP
#endif
