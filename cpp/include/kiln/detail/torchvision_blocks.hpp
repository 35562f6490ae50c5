// The building blocks torchvision's classification models share (torchvision/ops/misc.py,
// torchvision/ops/stochastic_depth.py), with torchvision's child names so that state dicts match key
// for key: a Conv2dNormActivation's conv is child "0" and its batch norm child "1", a Sequential's
// items are "0", "1", ... Parameterless layers (activations, pooling, dropout) have no child: they
// hold no state and torchvision's indices are kept by naming the children explicitly.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>

#include <memory>
#include <string>
#include <vector>

namespace kiln::detail {
struct DropoutStream;  // kiln/detail/dropout.hpp
}  // namespace kiln::detail

namespace kiln::detail::torchvision {

// A layer with a single-tensor forward.
class Block : public torch::nn::Module {
 public:
  virtual at::Tensor forward(const at::Tensor& input) = 0;
};

// torch.nn.Sequential of Blocks: children "0", "1", ... run in order.
class Chain : public Block {
 public:
  void push_back(std::shared_ptr<Block> block);
  at::Tensor forward(const at::Tensor& input) override;
  std::size_t size() const { return blocks_.size(); }

 private:
  std::vector<std::shared_ptr<Block>> blocks_;
};

enum class Activation { none, relu, hardswish, hardsigmoid, sigmoid, silu };
// ReLU runs in place, as torchvision's ReLU(inplace=True): pass a layer's fresh output that no backward needs.
at::Tensor activate(at::Tensor input, Activation activation);

// torch.nn.BatchNorm2d's eps and momentum (MobileNetV3 uses 0.001 and 0.01).
struct NormOptions {
  double eps = 1e-5;
  double momentum = 0.1;
};

// torchvision.ops.Conv2dNormActivation: conv ("0", no bias, padding (kernel - 1) / 2 * dilation),
// batch norm ("1"), activation.
class ConvNormActivation : public Block {
 public:
  ConvNormActivation(int in_channels, int out_channels, int kernel, int stride, int groups, NormOptions norm,
                     Activation activation, int dilation = 1);
  at::Tensor forward(const at::Tensor& input) override;
  torch::nn::Conv2d& conv() { return conv_; }

 private:
  torch::nn::Conv2d conv_{nullptr};
  torch::nn::BatchNorm2d bn_{nullptr};
  Activation activation_;
};

// torchvision.ops.SqueezeExcitation: input * scale_activation(fc2(activation(fc1(mean over H, W)))),
// fc1 and fc2 1x1 convs with bias.
class SqueezeExcitation : public Block {
 public:
  SqueezeExcitation(int channels, int squeeze_channels, Activation activation, Activation scale_activation);
  at::Tensor forward(const at::Tensor& input) override;

 private:
  torch::nn::Conv2d fc1_{nullptr};
  torch::nn::Conv2d fc2_{nullptr};
  Activation activation_;
  Activation scale_activation_;
};

// torchvision.ops.stochastic_depth in "row" mode: while training, each sample's residual branch is
// zeroed with probability p and the kept ones scaled by 1 / (1 - p). The per-sample mask comes from
// the model's dropout stream (kiln's reproducible stream; torch's generator when none), so it is
// random like torchvision's but not the same draw.
at::Tensor stochastic_depth(const at::Tensor& input, double p, bool training, DropoutStream* stream);

// torchvision.models._utils._make_divisible: `value` rounded to a multiple of `divisor`, at least
// `min_value` (default: divisor), never more than 10% below `value`.
int make_divisible(double value, int divisor, int min_value = 0);

// torchvision's initialisation for Conv2d weights: kaiming normal, fan_out, ReLU gain; biases zero.
void init_conv(torch::nn::Conv2d& conv);

}  // namespace kiln::detail::torchvision
