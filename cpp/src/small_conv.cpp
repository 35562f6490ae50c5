#include "kiln/detail/small_conv.hpp"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "kiln/detail/isa_dispatch.hpp"

namespace kiln::detail {
namespace {

constexpr std::int64_t kMaxInputChannels = 4;
constexpr std::int64_t kMaxTaps = kMaxInputChannels * 9;
constexpr std::int64_t kMaxOutputChannels = 256;

// One image's input, read through its strides: NCHW and channels-last alike.
struct ImageView {
  const float* data;
  std::int64_t channels, stride_c, stride_h, stride_w;
  std::int64_t out_height, out_width;
};

// The 9 x C input values under output position (y, x), in the weight's (c, ky, kx) order.
[[gnu::always_inline]] inline void gather_patch(const ImageView& image, std::int64_t y, std::int64_t x, float* patch) {
  std::int64_t k = 0;
  for (std::int64_t c = 0; c < image.channels; ++c) {
    for (std::int64_t dy = 0; dy < 3; ++dy) {
      const float* row = image.data + c * image.stride_c + (y + dy) * image.stride_h + x * image.stride_w;
      for (std::int64_t dx = 0; dx < 3; ++dx) patch[k++] = row[dx * image.stride_w];
    }
  }
}

// out[p][o] = max(bias[o] + sum_k patch_p[k] * taps[k][o], 0) for every output position p of one image;
// `taps` is the weight as [C * 9][O]. Vectorised over the output channels o.
[[gnu::always_inline]] inline void forward_image_body(const ImageView& image, const float* __restrict taps,
                                                      const float* __restrict bias, std::int64_t outputs,
                                                      float* __restrict out) {
  const std::int64_t k_count = image.channels * 9;
  std::array<float, kMaxTaps> patch{};
  std::array<float, kMaxOutputChannels> acc{};
  for (std::int64_t y = 0; y < image.out_height; ++y) {
    for (std::int64_t x = 0; x < image.out_width; ++x) {
      gather_patch(image, y, x, patch.data());
      for (std::int64_t o = 0; o < outputs; ++o) acc[o] = bias[o];
      for (std::int64_t k = 0; k < k_count; ++k) {
        const float v = patch[k];
        const float* __restrict t = taps + k * outputs;
        for (std::int64_t o = 0; o < outputs; ++o) acc[o] += v * t[o];
      }
      float* __restrict o_row = out + (y * image.out_width + x) * outputs;
      for (std::int64_t o = 0; o < outputs; ++o) o_row[o] = std::max(acc[o], 0.0f);  // keeps NaN, as relu does
    }
  }
}
KILN_ISA_VARIANTS(void, forward_image,
                  (const ImageView& image, const float* __restrict taps, const float* __restrict bias,
                   std::int64_t outputs, float* __restrict out),
                  forward_image_body(image, taps, bias, outputs, out))

// One image's share of the weight and bias gradients: the output gradient where the ReLU passed
// (out > 0, as torch's threshold_backward), times the patches. `grad_taps` [C * 9][O] and `grad_bias`
// [O] are this image's own partial sums (zeroed by the caller).
[[gnu::always_inline]] inline void backward_image_body(const ImageView& image, const float* __restrict out,
                                                       const float* __restrict grad, std::int64_t outputs,
                                                       float* __restrict grad_taps, float* __restrict grad_bias) {
  const std::int64_t k_count = image.channels * 9;
  std::array<float, kMaxTaps> patch{};
  std::array<float, kMaxOutputChannels> passed{};
  for (std::int64_t y = 0; y < image.out_height; ++y) {
    for (std::int64_t x = 0; x < image.out_width; ++x) {
      const std::int64_t p = (y * image.out_width + x) * outputs;
      for (std::int64_t o = 0; o < outputs; ++o) {
        passed[o] = out[p + o] > 0.0f ? grad[p + o] : 0.0f;
        grad_bias[o] += passed[o];
      }
      gather_patch(image, y, x, patch.data());
      for (std::int64_t k = 0; k < k_count; ++k) {
        const float v = patch[k];
        float* __restrict g = grad_taps + k * outputs;
        for (std::int64_t o = 0; o < outputs; ++o) g[o] += v * passed[o];
      }
    }
  }
}
KILN_ISA_VARIANTS(void, backward_image,
                  (const ImageView& image, const float* __restrict out, const float* __restrict grad,
                   std::int64_t outputs, float* __restrict grad_taps, float* __restrict grad_bias),
                  backward_image_body(image, out, grad, outputs, grad_taps, grad_bias))

ImageView image_view(const at::Tensor& x, std::int64_t n) {
  return {x.const_data_ptr<float>() + n * x.stride(0),
          x.size(1),
          x.stride(1),
          x.stride(2),
          x.stride(3),
          x.size(2) - 2,
          x.size(3) - 2};
}

// The weight [O, C, 3, 3] as [C * 9][O], whatever its memory format.
at::Tensor taps_of(const at::Tensor& weight) {
  return weight.permute({1, 2, 3, 0}).contiguous();
}

struct Conv3x3Relu : torch::autograd::Function<Conv3x3Relu> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias) {
    const std::int64_t n = x.size(0), outputs = weight.size(0);
    at::Tensor out = at::empty({n, outputs, x.size(2) - 2, x.size(3) - 2},
                               x.options().memory_format(at::MemoryFormat::ChannelsLast));
    const at::Tensor taps = taps_of(weight);
    const at::Tensor bias_values = bias.contiguous();
    const std::int64_t image_size = out.size(2) * out.size(3) * outputs;
    at::parallel_for(0, n, 1, [&](std::int64_t begin, std::int64_t end) {
      for (std::int64_t i = begin; i < end; ++i) {
        forward_image(image_view(x, i), taps.const_data_ptr<float>(), bias_values.const_data_ptr<float>(), outputs,
                      out.data_ptr<float>() + i * image_size);
      }
    });
    if (ctx != nullptr) ctx->save_for_backward({x, weight, out});
    return out;
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& out = saved[2];
    const at::Tensor grad = grads[0].contiguous(at::MemoryFormat::ChannelsLast);
    const std::int64_t n = x.size(0), outputs = weight.size(0), k_count = x.size(1) * 9;
    const std::int64_t image_size = out.size(2) * out.size(3) * outputs;
    // Per-image partial sums, added in image order: the same gradient for any thread count.
    const std::int64_t partial_size = (k_count + 1) * outputs;
    std::vector<float> partials(static_cast<std::size_t>(n * partial_size), 0.0f);
    at::parallel_for(0, n, 1, [&](std::int64_t begin, std::int64_t end) {
      for (std::int64_t i = begin; i < end; ++i) {
        float* partial = partials.data() + i * partial_size;
        backward_image(image_view(x, i), out.const_data_ptr<float>() + i * image_size,
                       grad.const_data_ptr<float>() + i * image_size, outputs, partial, partial + k_count * outputs);
      }
    });
    at::Tensor sums = at::zeros({k_count + 1, outputs}, x.options());
    float* total = sums.data_ptr<float>();
    for (std::int64_t i = 0; i < n; ++i) {
      const float* partial = partials.data() + i * partial_size;
      for (std::int64_t j = 0; j < partial_size; ++j) total[j] += partial[j];
    }
    // In the weight's own strides, which the fused optimizer step needs of a gradient.
    at::Tensor grad_weight = at::empty_like(weight);
    grad_weight.copy_(sums.narrow(0, 0, k_count).view({x.size(1), 3, 3, outputs}).permute({3, 0, 1, 2}));
    return {at::Tensor(), grad_weight, sums[k_count].clone()};
  }
};

bool applies(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  return x.device().is_cpu() && x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && bias.defined() &&
         bias.scalar_type() == at::kFloat && x.dim() == 4 && weight.dim() == 4 && weight.size(1) == x.size(1) &&
         x.size(1) <= kMaxInputChannels && weight.size(0) <= kMaxOutputChannels && weight.size(2) == 3 &&
         weight.size(3) == 3 && x.size(2) >= 3 && x.size(3) >= 3 && !x.requires_grad() &&
         !at::autocast::is_autocast_enabled(at::kCPU);
}

}  // namespace

at::Tensor conv3x3_relu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  if (!applies(x, weight, bias)) {
    return at::relu(at::conv2d(x, weight, bias)).contiguous(at::MemoryFormat::ChannelsLast);
  }
  if (at::GradMode::is_enabled() && (weight.requires_grad() || bias.requires_grad())) {
    return Conv3x3Relu::apply(x, weight, bias);
  }
  return Conv3x3Relu::forward(nullptr, x, weight, bias);  // evaluation: nothing kept for a backward pass
}

}  // namespace kiln::detail
