#include "kiln/detail/conv_relu_pool.hpp"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "kiln/detail/floats8.hpp"
#include "kiln/detail/isa_dispatch.hpp"
#include "kiln/detail/relu_max_pool.hpp"
#include "kiln/detail/winograd_conv.hpp"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace kiln::detail {
namespace {

constexpr std::int64_t kTaps = 9;
constexpr std::int64_t kPositions = 4;  // in a 2x2 window, row by row; the pool's winner 4 means none

struct Geometry {
  std::int64_t batch, channels, height, width;  // x, channels-last
  std::int64_t outputs, padding;
  std::int64_t pooled_height, pooled_width;  // the windows, each over 2x2 convolution outputs
  std::int64_t padded_height() const { return height + 2 * padding; }
  std::int64_t padded_width() const { return width + 2 * padding; }
  std::int64_t windows() const { return batch * pooled_height * pooled_width; }
};

Geometry geometry_of(const at::Tensor& x, std::int64_t outputs, std::int64_t padding) {
  const std::int64_t out_height = x.size(2) + 2 * padding - 2, out_width = x.size(3) + 2 * padding - 2;
  return {x.size(0), x.size(1), x.size(2), x.size(3), outputs, padding, out_height / 2, out_width / 2};
}

// The nonzero output gradients, listed twice. By window, for the input gradient: window w's entries lie in
// [w * O, w * O + its count), grouped by the winner's position p in [group[w * 5 + p], group[w * 5 + p + 1]),
// each an output channel and its gradient. By output channel and image, for the weight gradient: channel o's
// entries in image n lie in [start[o * (N + 1) + n], start[o * (N + 1) + n + 1]), in window order, each the offset
// in the padded input of the 3x3 patch its convolution output read, and its gradient.
struct NonzeroGradients {
  std::unique_ptr<std::int32_t[]> channel;
  std::unique_ptr<std::int64_t[]> group;
  std::unique_ptr<float[]> window_value;
  std::vector<std::int64_t> start;
  std::unique_ptr<std::int64_t[]> patch;
  std::unique_ptr<float[]> channel_value;
};

// Bit i of the result: output i of the window gets a gradient (a nonzero `value` and a winning `position`), for
// `count` (at most 64) outputs. SSE2's compares and movemasks where there are 64, a loop otherwise.
[[gnu::always_inline]] inline std::uint64_t listed_bits(const float* values, const std::uint8_t* positions,
                                                        std::int64_t count) {
  std::uint64_t bits = 0;
#if defined(__SSE2__)
  if (count == 64) {
    const __m128i none = _mm_set1_epi8(static_cast<char>(kPositions));
    std::uint64_t won = 0, nonzero = 0;
    for (int i = 0; i < 4; ++i) {
      const __m128i chunk = _mm_loadu_si128(reinterpret_cast<const __m128i*>(positions + 16 * i));
      won |= static_cast<std::uint64_t>(_mm_movemask_epi8(_mm_cmplt_epi8(chunk, none))) << (16 * i);
    }
    for (int i = 0; i < 8; ++i) nonzero |= static_cast<std::uint64_t>(nonzero_bits8(values + 8 * i)) << (8 * i);
    return won & nonzero;
  }
#endif
  for (std::int64_t i = 0; i < count; ++i) {
    bits |= static_cast<std::uint64_t>(values[i] != 0.0f && positions[i] < kPositions) << i;
  }
  return bits;
}

// Image n's windows, listed by window, with how many entries each channel has in `image_counts` (zeros).
// `bits` holds (O + 63) / 64 words: which outputs are listed (a few in 10 once training is under way: the loops
// visit those only).
[[gnu::always_inline]] inline void list_image_body(const Geometry& g, const float* __restrict grad,
                                                   const std::uint8_t* __restrict winner, NonzeroGradients& lists,
                                                   std::int64_t n, std::int64_t* __restrict image_counts,
                                                   std::uint64_t* __restrict bits) {
  const std::int64_t outputs = g.outputs, image_windows = g.pooled_height * g.pooled_width;
  const std::int64_t words = (outputs + 63) / 64;
  for (std::int64_t w = n * image_windows; w < (n + 1) * image_windows; ++w) {
    const float* values = grad + w * outputs;
    const std::uint8_t* positions = winner + w * outputs;
    std::int64_t next[kPositions + 1] = {};
    for (std::int64_t word = 0; word < words; ++word) {
      bits[word] =
          listed_bits(values + 64 * word, positions + 64 * word, std::min<std::int64_t>(64, outputs - 64 * word));
      for (std::uint64_t b = bits[word]; b != 0; b &= b - 1) ++next[positions[64 * word + std::countr_zero(b)] + 1];
    }
    std::int64_t* group = lists.group.get() + w * (kPositions + 1);
    next[0] = w * outputs;
    for (std::int64_t p = 1; p <= kPositions; ++p) next[p] += next[p - 1];
    std::copy_n(next, kPositions + 1, group);
    for (std::int64_t word = 0; word < words; ++word) {
      for (std::uint64_t b = bits[word]; b != 0; b &= b - 1) {
        const std::int64_t o = 64 * word + std::countr_zero(b);
        const std::int64_t k = next[positions[o]]++;
        lists.channel[k] = static_cast<std::int32_t>(o);
        lists.window_value[k] = values[o];
        ++image_counts[o];
      }
    }
  }
}

KILN_ISA_VARIANTS(void, list_image,
                  (const Geometry& g, const float* grad, const std::uint8_t* winner, NonzeroGradients& lists,
                   std::int64_t n, std::int64_t* image_counts, std::uint64_t* bits),
                  list_image_body(g, grad, winner, lists, n, image_counts, bits))

// `grad`: the pooled output's gradient and `winner` the pool's winners, both [N, PH, PW, O]. Images are listed
// in parallel, each by one thread.
NonzeroGradients list_nonzero(const Geometry& g, const float* grad, const std::uint8_t* winner) {
  const std::int64_t windows = g.windows(), outputs = g.outputs, images = g.batch;
  const std::int64_t image_windows = g.pooled_height * g.pooled_width;
  NonzeroGradients lists;
  lists.channel = std::make_unique_for_overwrite<std::int32_t[]>(static_cast<std::size_t>(windows * outputs));
  lists.window_value = std::make_unique_for_overwrite<float[]>(static_cast<std::size_t>(windows * outputs));
  lists.group = std::make_unique_for_overwrite<std::int64_t[]>(static_cast<std::size_t>(windows * (kPositions + 1)));
  std::vector<std::int64_t> counts(static_cast<std::size_t>(images * outputs), 0);  // [n][o]
  at::parallel_for(0, images, 1, [&](std::int64_t begin, std::int64_t end) {
    std::vector<std::uint64_t> bits(static_cast<std::size_t>((outputs + 63) / 64));
    for (std::int64_t n = begin; n < end; ++n) {
      list_image(g, grad, winner, lists, n, counts.data() + n * outputs, bits.data());
    }
  });
  // Channel o's entries, image by image.
  lists.start.resize(static_cast<std::size_t>(outputs * (images + 1)));
  for (std::int64_t o = 0, at = 0; o < outputs; ++o) {
    for (std::int64_t n = 0; n < images; ++n) {
      lists.start[o * (images + 1) + n] = at;
      at += counts[n * outputs + o];
    }
    lists.start[o * (images + 1) + images] = at;
  }
  const std::int64_t total = std::max<std::int64_t>(lists.start.back(), 1);
  lists.patch = std::make_unique_for_overwrite<std::int64_t[]>(static_cast<std::size_t>(total));
  lists.channel_value = std::make_unique_for_overwrite<float[]>(static_cast<std::size_t>(total));
  const std::int64_t row = g.padded_width() * g.channels;
  at::parallel_for(0, images, 1, [&](std::int64_t begin, std::int64_t end) {
    std::vector<std::int64_t> next(static_cast<std::size_t>(outputs));
    for (std::int64_t n = begin; n < end; ++n) {
      for (std::int64_t o = 0; o < outputs; ++o) next[o] = lists.start[o * (images + 1) + n];
      for (std::int64_t w = n * image_windows; w < (n + 1) * image_windows; ++w) {
        const std::int64_t i = w / g.pooled_width % g.pooled_height, j = w % g.pooled_width;
        const std::int64_t* group = lists.group.get() + w * (kPositions + 1);
        for (std::int64_t p = 0; p < kPositions; ++p) {
          // The output at (2i + p / 2, 2j + p % 2) read the padded input's 3x3 patch from that pixel on.
          const std::int64_t patch = (n * g.padded_height() + 2 * i + p / 2) * row + (2 * j + p % 2) * g.channels;
          for (std::int64_t k = group[p]; k < group[p + 1]; ++k) {
            const std::int64_t at = next[lists.channel[k]]++;
            lists.patch[at] = patch;
            lists.channel_value[at] = lists.window_value[k];
          }
        }
      }
    }
  });
  return lists;
}

// The input gradient of the images [begin, end), into `out` ([N, H + 2p, W + 2p, C], zeros): each group of
// entries (a window's outputs at one position, which read the same 3x3 input pixels) adds the sum of its values
// times their channels' weights ([O][3][3][C]) to those pixels, 8 channels and all 9 taps at a time in registers
// (9 of AVX2's 16). Each image is one thread's, and its sums run in window order.
[[gnu::always_inline]] inline void input_grad_images_body(const Geometry& g, const NonzeroGradients& lists,
                                                          const float* __restrict weight_rows, float* __restrict out,
                                                          std::int64_t begin, std::int64_t end) {
  const std::int64_t channels = g.channels, row = g.padded_width() * channels;
  const std::int64_t image_windows = g.pooled_height * g.pooled_width;
  const std::int32_t* channel = lists.channel.get();
  const float* value = lists.window_value.get();
  for (std::int64_t n = begin; n < end; ++n) {
    for (std::int64_t w = n * image_windows; w < (n + 1) * image_windows; ++w) {
      const std::int64_t i = w / g.pooled_width % g.pooled_height, j = w % g.pooled_width;
      const std::int64_t* group = lists.group.get() + w * (kPositions + 1);
      for (std::int64_t p = 0; p < kPositions; ++p) {
        if (group[p] == group[p + 1]) continue;
        // The output at (2i + p / 2, 2j + p % 2) read the padded input's 3x3 patch from that pixel on.
        float* patch = out + (n * g.padded_height() + 2 * i + p / 2) * row + (2 * j + p % 2) * channels;
        for (std::int64_t c0 = 0; c0 < channels; c0 += kFloats8Lanes) {
          Floats8 sum[kTaps] = {};
          for (std::int64_t k = group[p]; k < group[p + 1]; ++k) {
            const Floats8 v = Floats8{} + value[k];
            const float* taps = weight_rows + static_cast<std::int64_t>(channel[k]) * kTaps * channels + c0;
            for (std::int64_t t = 0; t < kTaps; ++t) sum[t] += v * floats8_at(taps + t * channels);
          }
          for (std::int64_t ky = 0; ky < 3; ++ky) {
            for (std::int64_t kx = 0; kx < 3; ++kx)
              floats8_at(patch + ky * row + kx * channels + c0) += sum[ky * 3 + kx];
          }
        }
      }
    }
  }
}

// The weight gradient of the output channels [begin, end), written [O][3][3][C] (a channels-last weight's
// layout), and their bias gradient: each channel's entries, in list order, times the input patches they read.
// Image by image, so that an image's pixels stay in the core's caches for all the channels, and one kernel row of
// 32 channels at a time (12 of AVX2's 16 registers: 3 taps x 4 vectors, 96 contiguous floats of a patch row).
template <std::int64_t kVectors>
[[gnu::always_inline]] inline void weight_grad_block(const Geometry& g, const NonzeroGradients& lists,
                                                     const float* __restrict padded, float* __restrict grad_weight,
                                                     std::int64_t o, std::int64_t n, std::int64_t c0) {
  const std::int64_t channels = g.channels, row = g.padded_width() * channels;
  const std::int64_t first = lists.start[o * (g.batch + 1) + n], last = lists.start[o * (g.batch + 1) + n + 1];
  const std::int64_t* patch = lists.patch.get();
  const float* value = lists.channel_value.get();
  for (std::int64_t ky = 0; ky < 3; ++ky) {
    float* out = grad_weight + (o * kTaps + ky * 3) * channels + c0;
    Floats8 sum[3][kVectors];
    for (std::int64_t kx = 0; kx < 3; ++kx) {
      for (std::int64_t i = 0; i < kVectors; ++i) sum[kx][i] = floats8_at(out + kx * channels + i * kFloats8Lanes);
    }
    for (std::int64_t k = first; k < last; ++k) {
      const Floats8 v = Floats8{} + value[k];
      const float* pixels = padded + patch[k] + ky * row + c0;
      for (std::int64_t kx = 0; kx < 3; ++kx) {
        for (std::int64_t i = 0; i < kVectors; ++i)
          sum[kx][i] += v * floats8_at(pixels + kx * channels + i * kFloats8Lanes);
      }
    }
    for (std::int64_t kx = 0; kx < 3; ++kx) {
      for (std::int64_t i = 0; i < kVectors; ++i) floats8_at(out + kx * channels + i * kFloats8Lanes) = sum[kx][i];
    }
  }
}

[[gnu::always_inline]] inline void weight_grad_channels_body(const Geometry& g, const NonzeroGradients& lists,
                                                             const float* padded, float* grad_weight, float* grad_bias,
                                                             std::int64_t begin, std::int64_t end) {
  const std::int64_t channels = g.channels;
  std::fill(grad_weight + begin * kTaps * channels, grad_weight + end * kTaps * channels, 0.0f);
  for (std::int64_t n = 0; n < g.batch; ++n) {
    for (std::int64_t o = begin; o < end; ++o) {
      // Channel blocks of 32, then one of 16 and one of 8 for the rest (channels: a multiple of 8).
      std::int64_t c0 = 0;
      for (; c0 + 32 <= channels; c0 += 32) weight_grad_block<4>(g, lists, padded, grad_weight, o, n, c0);
      if (c0 + 16 <= channels) {
        weight_grad_block<2>(g, lists, padded, grad_weight, o, n, c0);
        c0 += 16;
      }
      if (c0 < channels) weight_grad_block<1>(g, lists, padded, grad_weight, o, n, c0);
    }
  }
  if (grad_bias == nullptr) return;
  for (std::int64_t o = begin; o < end; ++o) {
    float bias = 0.0f;
    for (std::int64_t k = lists.start[o * (g.batch + 1)]; k < lists.start[(o + 1) * (g.batch + 1) - 1]; ++k) {
      bias += lists.channel_value[k];
    }
    grad_bias[o] = bias;
  }
}

KILN_ISA_VARIANTS(void, input_grad_images,
                  (const Geometry& g, const NonzeroGradients& lists, const float* weight_rows, float* out,
                   std::int64_t begin, std::int64_t end),
                  input_grad_images_body(g, lists, weight_rows, out, begin, end))
KILN_ISA_VARIANTS(void, weight_grad_channels,
                  (const Geometry& g, const NonzeroGradients& lists, const float* padded, float* grad_weight,
                   float* grad_bias, std::int64_t begin, std::int64_t end),
                  weight_grad_channels_body(g, lists, padded, grad_weight, grad_bias, begin, end))

// x (channels-last) with `padding` zero pixels around each image, as [N, H + 2p, W + 2p, C]; x itself without
// padding.
at::Tensor padded_input(const at::Tensor& x, std::int64_t padding) {
  const at::Tensor rows = x.permute({0, 2, 3, 1});  // [N, H, W, C], contiguous
  if (padding == 0) return rows;
  return at::constant_pad_nd(rows, {0, 0, padding, padding, padding, padding});
}

struct Conv3x3ReluMaxPool : torch::autograd::Function<Conv3x3ReluMaxPool> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, std::int64_t padding) {
    // Optional: autograd's Function takes no undefined tensor as an input.
    const at::Tensor bias_values = bias.has_value() ? *bias : at::Tensor();
    const at::Tensor input = x.contiguous(at::MemoryFormat::ChannelsLast);
    at::Tensor winner;
    at::Tensor out = conv3x3_winograd_relu_max_pool(input, weight, bias_values, padding, &winner);
    ctx->save_for_backward({input, weight, winner});
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["has_bias"] = bias_values.defined();
    ctx->saved_data["input_channels_last"] = x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
    return out;
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& winner = saved[2];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const Geometry g = geometry_of(x, weight.size(0), ctx->saved_data["padding"].toInt());
    const at::Tensor grad = grads[0].contiguous(at::MemoryFormat::ChannelsLast);  // [N, PH, PW, O] in memory
    const NonzeroGradients lists = list_nonzero(g, grad.const_data_ptr<float>(), winner.const_data_ptr<std::uint8_t>());
    at::Tensor grad_input, grad_weight, grad_bias;
    if (ctx->needs_input_grad(0)) {
      // The weight as [O][3][3][C]: a channels-last weight's own memory.
      const at::Tensor weight_rows = weight.permute({0, 2, 3, 1}).contiguous();
      at::Tensor padded = at::zeros({g.batch, g.padded_height(), g.padded_width(), g.channels}, x.options());
      const float* weight_data = weight_rows.const_data_ptr<float>();
      float* out = padded.data_ptr<float>();
      at::parallel_for(0, g.batch, 1, [&](std::int64_t begin, std::int64_t end) {
        input_grad_images(g, lists, weight_data, out, begin, end);
      });
      const std::int64_t p = g.padding;
      grad_input = padded.slice(1, p, p + g.height).slice(2, p, p + g.width).permute({0, 3, 1, 2});
      // In the input's own layout, as oneDNN's would be.
      grad_input =
          grad_input.contiguous(ctx->saved_data["input_channels_last"].toBool() ? at::MemoryFormat::ChannelsLast
                                                                                : at::MemoryFormat::Contiguous);
    }
    // needs_input_grad counts the tensor inputs only: no index 2 without a bias.
    const bool bias_grad = has_bias && ctx->needs_input_grad(2);
    if (ctx->needs_input_grad(1) || bias_grad) {
      const at::Tensor padded = padded_input(x, g.padding);
      at::Tensor grad_rows = at::empty({g.outputs, 3, 3, g.channels}, x.options());
      if (bias_grad) grad_bias = at::empty({g.outputs}, x.options());
      const float* padded_data = padded.const_data_ptr<float>();
      float* grad_data = grad_rows.data_ptr<float>();
      float* bias_data = bias_grad ? grad_bias.data_ptr<float>() : nullptr;
      at::parallel_for(0, g.outputs, 1, [&](std::int64_t begin, std::int64_t end) {
        weight_grad_channels(g, lists, padded_data, grad_data, bias_data, begin, end);
      });
      if (ctx->needs_input_grad(1)) {
        // In the weight's own strides, which the fused optimizer step needs of a gradient.
        grad_weight = at::empty_like(weight).copy_(grad_rows.permute({0, 3, 1, 2}));
      }
    }
    return {grad_input, grad_weight, grad_bias, at::Tensor()};
  }
};

// Where the Winograd form's output transform can pool: an output of at least 2x2.
bool pooled_winograd_applies(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                             std::int64_t padding) {
  return conv3x3_winograd_applies(x, weight, bias, padding) && x.size(2) + 2 * padding >= 4 &&
         x.size(3) + 2 * padding >= 4;
}

}  // namespace

bool conv3x3_relu_max_pool2x2_applies(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                      std::int64_t padding) {
  return pooled_winograd_applies(x, weight, bias, padding) && x.size(1) % kFloats8Lanes == 0 &&
         weight.size(0) <= INT32_MAX;
}

at::Tensor conv3x3_relu_max_pool2x2(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                    std::int64_t padding) {
  const bool recorded = at::GradMode::is_enabled() &&
                        (x.requires_grad() || weight.requires_grad() || (bias.defined() && bias.requires_grad()));
  if (recorded && conv3x3_relu_max_pool2x2_applies(x, weight, bias, padding)) {
    return Conv3x3ReluMaxPool::apply(x, weight, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt,
                                     padding);
  }
  // Evaluation: pooled in Winograd's output transform, nothing recorded.
  if (!recorded && pooled_winograd_applies(x, weight, bias, padding)) {
    return conv3x3_winograd_relu_max_pool(x, weight, bias, padding);
  }
  return relu_max_pool2x2(conv3x3_winograd(x, weight, bias, padding));
}

}  // namespace kiln::detail
