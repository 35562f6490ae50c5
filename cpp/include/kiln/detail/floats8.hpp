// 8 floats as one value for kiln's own vector loops (depthwise and pooled convolution gradients, the sparse
// linear layer), and which of 8 floats are nonzero.
#pragma once

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

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

// Bit i: p[i] != 0 (NaN included), for 8 floats: two SSE2 compares and movemasks on x86, a loop elsewhere.
[[gnu::always_inline]] inline unsigned nonzero_bits8(const float* p) {
#if defined(__SSE2__)
  const __m128 zero = _mm_setzero_ps();
  return static_cast<unsigned>(_mm_movemask_ps(_mm_cmpneq_ps(_mm_loadu_ps(p), zero))) |
         (static_cast<unsigned>(_mm_movemask_ps(_mm_cmpneq_ps(_mm_loadu_ps(p + 4), zero))) << 4);
#else
  unsigned bits = 0;
  for (int i = 0; i < 8; ++i) bits |= static_cast<unsigned>(p[i] != 0.0f) << i;
  return bits;
#endif
}

}  // namespace kiln::detail
