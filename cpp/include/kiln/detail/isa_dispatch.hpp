// kiln's own vector loops (optimizer steps, pooling, the small convolution, pixel loops) come in one build
// for any CPU: on x86-64 with GCC each is compiled three times — for AVX-512 (x86-64-v4), for AVX2 + FMA
// (x86-64-v3) and for any x86-64 CPU — and the copy this process runs is picked once, when the library
// loads, from the CPU and ATEN_CPU_CAPABILITY (ATen's own switch: default | avx2 | avx512), so
// `ATEN_CPU_CAPABILITY=avx2` runs kiln's AVX2 loops as it runs ATen's, and tests can run every copy on one
// machine. The build assumes nothing of the build machine's CPU. Other architectures (aarch64) and other
// compilers build the one plain loop, which the compiler vectorises for their baseline (NEON on aarch64).
#pragma once

namespace kiln::detail {

enum class IsaLevel { baseline, avx2, avx512 };

// The CPU's level (x86-64-v4 / v3 / below), lowered by ATEN_CPU_CAPABILITY when that names a lower one.
// Always baseline off x86-64.
IsaLevel isa_level();

// "avx512", "avx2" or "baseline": the copy of kiln's loops this process runs.
const char* isa_level_name();

template <typename F>
F pick_isa(F avx512, F avx2, F baseline) {
  switch (isa_level()) {
    case IsaLevel::avx512:
      return avx512;
    case IsaLevel::avx2:
      return avx2;
    case IsaLevel::baseline:
      break;
  }
  return baseline;
}

}  // namespace kiln::detail

// KILN_ISA_VARIANTS(Ret, name, (params), call): `name` runs `call` (an always-inline body over the params)
// in the copy isa_level() picks. `name` is a function pointer on x86-64 GCC builds and a plain function
// elsewhere; both are called as name(args).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KILN_ISA_VARIANTS(Ret, name, Params, Call)                     \
  __attribute__((target("arch=x86-64-v4"))) Ret name##_avx512 Params { \
    return Call;                                                       \
  }                                                                    \
  __attribute__((target("arch=x86-64-v3"))) Ret name##_avx2 Params {   \
    return Call;                                                       \
  }                                                                    \
  Ret name##_baseline Params {                                         \
    return Call;                                                       \
  }                                                                    \
  [[maybe_unused]] const auto name = ::kiln::detail::pick_isa(&name##_avx512, &name##_avx2, &name##_baseline);
#else
#define KILN_ISA_VARIANTS(Ret, name, Params, Call) \
  Ret name Params {                                \
    return Call;                                   \
  }
#endif
