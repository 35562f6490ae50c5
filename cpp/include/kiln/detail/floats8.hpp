// 8 floats as one value for kiln's own vector loops (depthwise and pooled convolution gradients).
#pragma once

namespace kiln::detail {

// GCC's and Clang's vector extension: one AVX2 register, half an AVX-512 one, loaded and stored anywhere
// (aligned to a float, may alias floats) as _mm256_loadu_ps would; `sum += a * b` compiles to one FMA where the
// target has it. GCC does not vectorise the same sums written over a local float array (it kept them in
// scalars), lowers a 16-float vector to AVX2 through the stack, and copied memcpy'd vectors through the stack in
// 16-byte halves (each reload a stalled store forward).
using Floats8 = float __attribute__((vector_size(8 * sizeof(float)), aligned(alignof(float)), may_alias));
constexpr long kFloats8Lanes = 8;

[[gnu::always_inline]] inline const Floats8& floats8_at(const float* p) {
  return *reinterpret_cast<const Floats8*>(p);
}
[[gnu::always_inline]] inline Floats8& floats8_at(float* p) {
  return *reinterpret_cast<Floats8*>(p);
}

}  // namespace kiln::detail
