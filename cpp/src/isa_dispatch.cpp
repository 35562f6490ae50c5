#include "kiln/detail/isa_dispatch.hpp"

#include <cstdlib>
#include <cstring>

namespace kiln::detail {
namespace {

IsaLevel cpu_level() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  if (__builtin_cpu_supports("x86-64-v4")) return IsaLevel::avx512;
  if (__builtin_cpu_supports("x86-64-v3")) return IsaLevel::avx2;
#endif
  return IsaLevel::baseline;
}

}  // namespace

IsaLevel isa_level() {
  static const IsaLevel level = [] {
    const IsaLevel cpu = cpu_level();
    const char* capability = std::getenv("ATEN_CPU_CAPABILITY");
    if (capability == nullptr) return cpu;
    // ATen's names (case as ATen takes them); another value, as ATen does, changes nothing.
    IsaLevel cap = cpu;
    if (std::strcmp(capability, "default") == 0) cap = IsaLevel::baseline;
    if (std::strcmp(capability, "avx2") == 0) cap = IsaLevel::avx2;
    if (std::strcmp(capability, "avx512") == 0) cap = IsaLevel::avx512;
    return cap < cpu ? cap : cpu;
  }();
  return level;
}

const char* isa_level_name() {
  switch (isa_level()) {
    case IsaLevel::avx512:
      return "avx512";
    case IsaLevel::avx2:
      return "avx2";
    case IsaLevel::baseline:
      break;
  }
  return "baseline";
}

}  // namespace kiln::detail
