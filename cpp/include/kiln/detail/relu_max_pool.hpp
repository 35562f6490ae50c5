// A fused ReLU + 2x2 max pooling for the models' hot path on the CPU.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <bit>
#include <cstdint>
#include <type_traits>

namespace kiln::detail {

// torch::max_pool2d(torch::relu(x), 2) with the same values and gradient, in one pass each way over
// channels-last float/bf16 CPU activations (other inputs: those two ops).
at::Tensor relu_max_pool2x2(const at::Tensor& x);

namespace pooling {

template <typename T>
[[gnu::always_inline]] inline float widen(T v) {
  return static_cast<float>(v);
}
// `v` is one of the inputs or 0: exactly representable, so the bits are cut, not rounded.
template <typename T>
[[gnu::always_inline]] inline T narrow(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return T(static_cast<std::uint16_t>(std::bit_cast<std::uint32_t>(v) >> 16), T::from_bits());
  }
}

// One 2x2 window of relu_max_pool2x2 for `c` channels: a and b the top row's two pixels, d and e the bottom
// row's (each c values, channels-last). torch's scan order: a later value wins if greater or NaN; nothing passes
// a maximum that is not positive (winner 4: no gradient). `winner` may be null. Branch-free, so it vectorises.
template <typename T>
[[gnu::always_inline]] inline void window(const T* __restrict a, const T* __restrict b, const T* __restrict d,
                                          const T* __restrict e, T* __restrict out, std::uint8_t* __restrict winner,
                                          std::int64_t c) {
  for (std::int64_t k = 0; k < c; ++k) {
    float best = widen(a[k]);
    std::uint8_t at = 0;
    const float vb = widen(b[k]), vd = widen(d[k]), ve = widen(e[k]);
    bool take = vb > best || vb != vb;
    best = take ? vb : best;
    at = take ? 1 : at;
    take = vd > best || vd != vd;
    best = take ? vd : best;
    at = take ? 2 : at;
    take = ve > best || ve != ve;
    best = take ? ve : best;
    at = take ? 3 : at;
    const bool passes = best > 0.0f || best != best;  // relu keeps NaN
    out[k] = narrow<T>(passes ? best : 0.0f);
    if (winner != nullptr) winner[k] = passes ? at : std::uint8_t{4};
  }
}

}  // namespace pooling

}  // namespace kiln::detail
