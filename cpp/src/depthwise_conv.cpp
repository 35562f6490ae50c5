#include "kiln/detail/depthwise_conv.hpp"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "kiln/detail/floats8.hpp"
#include "kiln/detail/isa_dispatch.hpp"

namespace kiln::detail {
namespace {

// Channels a work item sums at once: one cache line of each channels-last pixel, one AVX-512 vector, two AVX2
// ones. The blocks are cut from the channel count alone, never from the thread count, so each channel takes
// the same instructions (full block or the last, narrower one) whichever thread runs it.
constexpr std::int64_t kBlock = 16;

// The batch is summed a chunk of images at a time, all work items over one chunk before the next, so that the
// kh items of a channel block (one per tap row) find the chunk's pixels in the core's L2 cache: x and grad
// together up to this size. Without chunks, 144 channels of 16x16 maps (batch 32) read everything from memory
// once per tap row. The chunks depend on the geometry alone: each weight's sum still runs over the images in order.
constexpr std::int64_t kChunkBytes = std::int64_t{1} << 20;

struct Geometry {
  std::int64_t batch, channels, height, width;  // x, channels-last
  std::int64_t out_height, out_width;           // grad, channels-last
  std::int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  // Output columns [columns_first[j], columns_end[j]) are those whose tap column j reads inside the image.
  std::vector<std::int64_t> columns_first, columns_end;
  // The x columns the taps reach, from -pad_w on: (out_width - 1) * stride_w + (kernel_w - 1) * dilation_w + 1.
  std::int64_t padded_width;
};

// Both tap_row forms add, for tap row i, the channels [c0, c0 + count) and the images [n_first, n_end), to
// out[i][j][c0 + c] ([kh][kw][C]) the sum over images n, output rows oy and output columns ox (in that order)
// of grad[n, oy, ox, c0 + c] * x[n, oy*sh - ph + i*dh, ox*sw - pw + j*dw, c0 + c], zero outside the image.

constexpr std::int64_t kLanes = kFloats8Lanes;  // detail/floats8.hpp

// The kernel widths the models have (3 and 5), kKernelW of them, with a block of kVectors x 8 channels: all the
// running sums stay in registers (10 of AVX2's 16 for 5 taps x 16 channels) through the chunk, and each pixel of
// grad is read once for all the row's taps. The taps read x's row from `row` (padded_width pixels of kBlock
// floats), a copy with zeros in the padding, so no tap needs a branch (a branch per tap kept the sums on the
// stack); the zero products add nothing.
template <std::int64_t kKernelW, std::int64_t kVectors>
[[gnu::always_inline]] inline void tap_row_fixed(const Geometry& g, const float* __restrict x,
                                                 const float* __restrict grad, std::int64_t i, std::int64_t c0,
                                                 std::int64_t n_first, std::int64_t n_end, float* __restrict out,
                                                 float* __restrict row) {
  const std::int64_t channels = g.channels, tap_step = g.dilation_w * kBlock, column_step = g.stride_w * kBlock;
  const std::int64_t columns_end = std::min(g.width, g.padded_width - g.pad_w);
  std::fill(row, row + g.padded_width * kBlock, 0.0f);
  Floats8 sum[kKernelW][kVectors];
  for (std::int64_t j = 0; j < kKernelW; ++j) {
    for (std::int64_t v = 0; v < kVectors; ++v)
      sum[j][v] = floats8_at(out + (i * kKernelW + j) * channels + c0 + v * kLanes);
  }
  for (std::int64_t n = n_first; n < n_end; ++n) {
    for (std::int64_t oy = 0; oy < g.out_height; ++oy) {
      const std::int64_t iy = oy * g.stride_h - g.pad_h + i * g.dilation_h;
      if (iy < 0 || iy >= g.height) continue;
      const float* x_row = x + (n * g.height + iy) * g.width * channels + c0;
      for (std::int64_t column = 0; column < columns_end; ++column) {
        for (std::int64_t v = 0; v < kVectors; ++v) {
          floats8_at(row + (column + g.pad_w) * kBlock + v * kLanes) =
              floats8_at(x_row + column * channels + v * kLanes);
        }
      }
      const float* grad_row = grad + (n * g.out_height + oy) * g.out_width * channels + c0;
      for (std::int64_t ox = 0; ox < g.out_width; ++ox) {
        Floats8 grad_pixel[kVectors];
        for (std::int64_t v = 0; v < kVectors; ++v) grad_pixel[v] = floats8_at(grad_row + ox * channels + v * kLanes);
        const float* taps = row + ox * column_step;
        for (std::int64_t j = 0; j < kKernelW; ++j) {
          for (std::int64_t v = 0; v < kVectors; ++v)
            sum[j][v] += grad_pixel[v] * floats8_at(taps + j * tap_step + v * kLanes);
        }
      }
    }
  }
  for (std::int64_t j = 0; j < kKernelW; ++j) {
    for (std::int64_t v = 0; v < kVectors; ++v)
      floats8_at(out + (i * kKernelW + j) * channels + c0 + v * kLanes) = sum[j][v];
  }
}

// Any other kernel width or block width: the running sums of one tap at a time across a row's columns, all of
// them in `sums` (kw x kBlock floats) in between; the taps outside the image skipped.
[[gnu::always_inline]] inline void tap_row_any(const Geometry& g, const float* __restrict x,
                                               const float* __restrict grad, std::int64_t i, std::int64_t c0,
                                               std::int64_t count, std::int64_t n_first, std::int64_t n_end,
                                               float* __restrict out, float* __restrict sums) {
  const std::int64_t channels = g.channels;
  for (std::int64_t j = 0; j < g.kernel_w; ++j) {
    std::copy_n(out + (i * g.kernel_w + j) * channels + c0, count, sums + j * kBlock);
  }
  for (std::int64_t n = n_first; n < n_end; ++n) {
    for (std::int64_t oy = 0; oy < g.out_height; ++oy) {
      const std::int64_t iy = oy * g.stride_h - g.pad_h + i * g.dilation_h;
      if (iy < 0 || iy >= g.height) continue;
      const float* grad_row = grad + (n * g.out_height + oy) * g.out_width * channels + c0;
      const float* x_row = x + (n * g.height + iy) * g.width * channels + c0;
      for (std::int64_t j = 0; j < g.kernel_w; ++j) {
        float sum[kBlock];
        std::copy_n(sums + j * kBlock, count, sum);
        const std::int64_t shift = j * g.dilation_w - g.pad_w;
        for (std::int64_t ox = g.columns_first[j]; ox < g.columns_end[j]; ++ox) {
          const float* grad_pixel = grad_row + ox * channels;
          const float* x_pixel = x_row + (ox * g.stride_w + shift) * channels;
          for (std::int64_t c = 0; c < count; ++c) sum[c] += grad_pixel[c] * x_pixel[c];
        }
        std::copy_n(sum, count, sums + j * kBlock);
      }
    }
  }
  for (std::int64_t j = 0; j < g.kernel_w; ++j) {
    std::copy_n(sums + j * kBlock, count, out + (i * g.kernel_w + j) * channels + c0);
  }
}

// Work items [first, end) of (channel block, tap row) pairs, item = block * kh + i, over the images
// [n_first, n_end). `scratch` holds max(kw, padded_width) x kBlock floats.
[[gnu::always_inline]] inline void weight_grad_items_body(const Geometry& g, const float* __restrict x,
                                                          const float* __restrict grad, std::int64_t n_first,
                                                          std::int64_t n_end, std::int64_t first, std::int64_t end,
                                                          float* __restrict out, float* __restrict scratch) {
  for (std::int64_t item = first; item < end; ++item) {
    const std::int64_t c0 = item / g.kernel_h * kBlock, i = item % g.kernel_h;
    const std::int64_t count = std::min(kBlock, g.channels - c0);
    // 72, 88, 120, 184 and 200 channels end in half a block.
    if (g.kernel_w == 3 && count == kBlock) {
      tap_row_fixed<3, 2>(g, x, grad, i, c0, n_first, n_end, out, scratch);
    } else if (g.kernel_w == 3 && count == kBlock / 2) {
      tap_row_fixed<3, 1>(g, x, grad, i, c0, n_first, n_end, out, scratch);
    } else if (g.kernel_w == 5 && count == kBlock) {
      tap_row_fixed<5, 2>(g, x, grad, i, c0, n_first, n_end, out, scratch);
    } else if (g.kernel_w == 5 && count == kBlock / 2) {
      tap_row_fixed<5, 1>(g, x, grad, i, c0, n_first, n_end, out, scratch);
    } else {
      tap_row_any(g, x, grad, i, c0, count, n_first, n_end, out, scratch);
    }
  }
}
KILN_ISA_VARIANTS(void, weight_grad_items,
                  (const Geometry& g, const float* __restrict x, const float* __restrict grad, std::int64_t n_first,
                   std::int64_t n_end, std::int64_t first, std::int64_t end, float* __restrict out,
                   float* __restrict scratch),
                  weight_grad_items_body(g, x, grad, n_first, n_end, first, end, out, scratch))

// d(loss)/d(weight) [C, 1, kh, kw] of the depthwise convolution of `x` whose output gradient is `grad` (both
// channels-last), in the weight's own strides. Each (channel block, tap row) pair is one work item, so the
// threads share out the channels and rows without ever adding partial sums of one weight: every weight's sum
// runs in one order, on one thread.
at::Tensor depthwise_weight_grad(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& weight,
                                 c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  Geometry g{};
  g.batch = x.size(0);
  g.channels = x.size(1);
  g.height = x.size(2);
  g.width = x.size(3);
  g.out_height = grad.size(2);
  g.out_width = grad.size(3);
  g.kernel_h = weight.size(2);
  g.kernel_w = weight.size(3);
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dilation_h = dilation[0];
  g.dilation_w = dilation[1];
  for (std::int64_t j = 0; j < g.kernel_w; ++j) {
    const std::int64_t shift = j * g.dilation_w - g.pad_w;
    std::int64_t first = 0, end = g.out_width;
    while (first < end && first * g.stride_w + shift < 0) ++first;
    while (end > first && (end - 1) * g.stride_w + shift >= g.width) --end;
    g.columns_first.push_back(first);
    g.columns_end.push_back(end);
  }
  g.padded_width = (g.out_width - 1) * g.stride_w + (g.kernel_w - 1) * g.dilation_w + 1;
  at::Tensor summed = at::zeros({g.kernel_h, g.kernel_w, g.channels}, x.options());
  const float* x_data = x.const_data_ptr<float>();
  const float* grad_data = grad.const_data_ptr<float>();
  float* summed_data = summed.data_ptr<float>();
  const std::int64_t image_bytes =
      (g.height * g.width + g.out_height * g.out_width) * g.channels * static_cast<std::int64_t>(sizeof(float));
  const std::int64_t chunk = std::max(std::int64_t{1}, kChunkBytes / std::max(image_bytes, std::int64_t{1}));
  const std::int64_t blocks = (g.channels + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks * g.kernel_h, 1, [&](std::int64_t begin, std::int64_t end) {
    std::vector<float> scratch(static_cast<std::size_t>(std::max(g.kernel_w, g.padded_width) * kBlock));
    for (std::int64_t n_first = 0; n_first < g.batch; n_first += chunk) {
      weight_grad_items(g, x_data, grad_data, n_first, std::min(g.batch, n_first + chunk), begin, end, summed_data,
                        scratch.data());
    }
  });
  // [kh, kw, C] -> [C, 1, kh, kw], in the weight's own strides, which the fused optimizer step needs of a gradient.
  return at::empty_like(weight).copy_(summed.permute({2, 0, 1}).unsqueeze(1));
}

struct DepthwiseConv : torch::autograd::Function<DepthwiseConv> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::vector<std::int64_t>& stride, const std::vector<std::int64_t>& padding,
                            const std::vector<std::int64_t>& dilation) {
    if (ctx != nullptr) {
      ctx->save_for_backward({x, weight});
      ctx->saved_data["stride"] = stride;
      ctx->saved_data["padding"] = padding;
      ctx->saved_data["dilation"] = dilation;
    }
    return at::convolution(x, weight, std::nullopt, stride, padding, dilation, false, {0, 0}, weight.size(0));
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    const std::vector<std::int64_t> stride = ctx->saved_data["stride"].toIntVector();
    const std::vector<std::int64_t> padding = ctx->saved_data["padding"].toIntVector();
    const std::vector<std::int64_t> dilation = ctx->saved_data["dilation"].toIntVector();
    at::Tensor grad_input, grad_weight;
    if (ctx->needs_input_grad(0)) {
      // oneDNN's, from the same arguments autograd's own convolution backward passes it.
      grad_input = std::get<0>(at::convolution_backward(grads[0], x, weight, std::nullopt, stride, padding, dilation,
                                                        false, {0, 0}, weight.size(0), {true, false, false}));
    }
    if (ctx->needs_input_grad(1)) {
      grad_weight =
          depthwise_weight_grad(x.contiguous(at::MemoryFormat::ChannelsLast),
                                grads[0].contiguous(at::MemoryFormat::ChannelsLast), weight, stride, padding, dilation);
    }
    return {grad_input, grad_weight, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

bool depthwise_conv_applies(const at::Tensor& x, const at::Tensor& weight, std::int64_t groups) {
  return x.device().is_cpu() && weight.device().is_cpu() && x.scalar_type() == at::kFloat &&
         weight.scalar_type() == at::kFloat && x.dim() == 4 && weight.dim() == 4 && groups == x.size(1) &&
         groups == weight.size(0) && weight.size(1) == 1 && !at::autocast::is_autocast_enabled(at::kCPU);
}

at::Tensor depthwise_conv(const at::Tensor& x, const at::Tensor& weight, c10::IntArrayRef stride,
                          c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  TORCH_CHECK(weight.dim() == 4 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "kiln depthwise_conv: expected a 4-d weight [C, 1, kh, kw] and two strides, paddings and dilations, "
              "got weight ",
              weight.sizes(), ", stride ", stride, ", padding ", padding, ", dilation ", dilation);
  if (!depthwise_conv_applies(x, weight, weight.size(0))) {
    return at::conv2d(x, weight, {}, stride, padding, dilation, weight.size(0));
  }
  if (at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad())) {
    return DepthwiseConv::apply(x, weight, stride.vec(), padding.vec(), dilation.vec());
  }
  return DepthwiseConv::forward(nullptr, x, weight, stride.vec(), padding.vec(), dilation.vec());
}

}  // namespace kiln::detail
