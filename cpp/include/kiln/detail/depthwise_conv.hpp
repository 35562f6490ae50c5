// A depthwise convolution (one filter per channel: MobileNetV3's and EfficientNet's k x k convolutions) on the
// CPU in fp32, whose weight gradient is kiln's own loop over the channels instead of oneDNN's.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>

namespace kiln::detail {

// at::conv2d(x, weight, {}, stride, padding, dilation, /*groups=*/C) for x [N, C, H, W] and weight [C, 1, kh, kw]:
// the output and the input gradient are oneDNN's (at::convolution, at::convolution_backward), bit for bit. The
// weight gradient is kiln's: on AVX2, oneDNN's takes 3.6-7.5 ms for batch 32 of 4x4 or 2x2 maps under a 5x5
// kernel (about 1.8M multiply-adds, 0.05 ms of work), 40% of mobilenet_v3_small's training step at 64 px. kiln's
// sums grad[n, c, oy, ox] * x[n, c, oy*s - p + i*d, ox*s - p + j*d] over the channels-last data, channels
// innermost, each channel's taps by one thread in one fixed order: the same bits with any thread count, within a
// float rounding (1e-5 of the largest value) of oneDNN's. The gradient comes back in the weight's strides. Taken
// where depthwise_conv_applies; anything else takes at::conv2d.
at::Tensor depthwise_conv(const at::Tensor& x, const at::Tensor& weight, c10::IntArrayRef stride,
                          c10::IntArrayRef padding, c10::IntArrayRef dilation);

// Whether depthwise_conv computes this convolution with kiln's weight gradient: float32 CPU tensors outside CPU
// autocast, 4-d, groups == x's channels == weight.size(0) and one input channel a filter (weight.size(1) == 1).
bool depthwise_conv_applies(const at::Tensor& x, const at::Tensor& weight, std::int64_t groups);

}  // namespace kiln::detail
