#include <ATen/ATen.h>
#include <torch/nn/init.h>

#include <algorithm>
#include <variant>

#include "kiln/detail/depthwise_conv.hpp"
#include "kiln/detail/dropout.hpp"
#include "kiln/detail/torchvision_blocks.hpp"

namespace kiln::detail::torchvision {

void Chain::push_back(std::shared_ptr<Block> block) {
  blocks_.push_back(register_module(std::to_string(blocks_.size()), std::move(block)));
}

at::Tensor Chain::forward(const at::Tensor& input) {
  at::Tensor x = input;
  for (const auto& block : blocks_) x = block->forward(x);
  return x;
}

at::Tensor activate(at::Tensor input, Activation activation) {
  switch (activation) {
    case Activation::none:
      return input;
    case Activation::relu:
      return at::relu_(input);
    case Activation::hardswish:
      return at::hardswish(input);
    case Activation::hardsigmoid:
      return at::hardsigmoid(input);
    case Activation::sigmoid:
      return at::sigmoid(input);
    case Activation::silu:
      return at::silu(input);
  }
  return input;
}

void init_conv(torch::nn::Conv2d& conv) {
  torch::NoGradGuard no_grad;
  torch::nn::init::kaiming_normal_(conv->weight, 0.0, torch::kFanOut, torch::kReLU);
  if (conv->bias.defined()) conv->bias.zero_();
}

namespace {

// The convolution of ConvNormActivation: a depthwise one (MobileNetV3's and EfficientNet's k x k) with kiln's weight
// gradient (detail/depthwise_conv.hpp) where that applies (float32 on the CPU outside autocast) and measured faster
// than oneDNN's, else the module's own. Measured for every depthwise convolution of mobilenet_v3_small/large and
// efficientnet_b0 at 64 px (batch 32) and 224 px (batch 8), one thread, weight gradient alone: 5x5 kernels on any
// map 3.1-100x oneDNN's on AVX2 (576 channels of 2x2: 9.1 ms -> 0.09 ms; 144 of 56x56: 7.8 -> 1.9 ms) and 4.1-32x
// on AVX-512 (64 px, two threads: 2.9-125x and 3.0-21x); 3x3 kernels only on maps no larger than the kernel (1152
// channels of 2x2: 79x AVX2, 24x AVX-512), as elsewhere neither wins throughout (0.3-1.6x across the CPU classes
// and thread counts, oneDNN ahead on most shapes: 112x112 maps 0.3-0.8x).
at::Tensor convolve(torch::nn::Conv2d& conv, const at::Tensor& input) {
  const at::Tensor& weight = conv->weight;
  const auto& options = conv->options;
  const auto* padding = std::get_if<torch::ExpandingArray<2>>(&options.padding());
  if (padding == nullptr || conv->bias.defined() ||
      !std::holds_alternative<torch::enumtype::kZeros>(options.padding_mode()) ||
      !depthwise_conv_applies(input, weight, options.groups())) {
    return conv->forward(input);
  }
  const bool five_by_five = weight.size(2) == 5 && weight.size(3) == 5;
  const bool within_kernel = input.size(2) <= weight.size(2) && input.size(3) <= weight.size(3);
  if (!five_by_five && !within_kernel) return conv->forward(input);
  return depthwise_conv(input, weight, *options.stride(), **padding, *options.dilation());
}

}  // namespace

ConvNormActivation::ConvNormActivation(int in_channels, int out_channels, int kernel, int stride, int groups,
                                       NormOptions norm, Activation activation, int dilation)
    : activation_(activation) {
  conv_ = register_module("0", torch::nn::Conv2d(torch::nn::Conv2dOptions(in_channels, out_channels, kernel)
                                                     .stride(stride)
                                                     .padding((kernel - 1) / 2 * dilation)
                                                     .dilation(dilation)
                                                     .groups(groups)
                                                     .bias(false)));
  bn_ = register_module(
      "1", torch::nn::BatchNorm2d(torch::nn::BatchNorm2dOptions(out_channels).eps(norm.eps).momentum(norm.momentum)));
  init_conv(conv_);
}

at::Tensor ConvNormActivation::forward(const at::Tensor& input) {
  return activate(bn_->forward(convolve(conv_, input)), activation_);
}

SqueezeExcitation::SqueezeExcitation(int channels, int squeeze_channels, Activation activation,
                                     Activation scale_activation)
    : activation_(activation), scale_activation_(scale_activation) {
  fc1_ = register_module("fc1", torch::nn::Conv2d(torch::nn::Conv2dOptions(channels, squeeze_channels, 1)));
  fc2_ = register_module("fc2", torch::nn::Conv2d(torch::nn::Conv2dOptions(squeeze_channels, channels, 1)));
  init_conv(fc1_);
  init_conv(fc2_);
}

at::Tensor SqueezeExcitation::forward(const at::Tensor& input) {
  at::Tensor scale = at::adaptive_avg_pool2d(input, {1, 1});
  scale = activate(fc1_->forward(scale), activation_);
  scale = activate(fc2_->forward(scale), scale_activation_);
  return scale * input;
}

at::Tensor stochastic_depth(const at::Tensor& input, double p, bool training, DropoutStream* stream) {
  if (!training || p == 0.0) return input;
  // One keep/drop draw per sample, already scaled by 1 / (1 - p).
  const at::Tensor mask = dropout(at::ones({input.size(0), 1, 1, 1}, input.options()), p, true, stream);
  return input * mask;
}

int make_divisible(double value, int divisor, int min_value) {
  if (min_value == 0) min_value = divisor;
  int rounded = std::max(min_value, static_cast<int>(value + divisor / 2.0) / divisor * divisor);
  if (rounded < 0.9 * value) rounded += divisor;
  return rounded;
}

}  // namespace kiln::detail::torchvision
