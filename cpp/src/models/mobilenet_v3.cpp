// torchvision/models/mobilenetv3.py: mobilenet_v3_large and mobilenet_v3_small (width 1.0, no
// dilation, full tail), batch norm with eps 0.001 and momentum 0.01, with the stem taking
// spec.in_channels.
#include <ATen/ATen.h>
#include <torch/nn/init.h>
#include <torch/nn/modules/linear.h>

#include <vector>

#include "kiln/detail/dropout.hpp"
#include "kiln/detail/torchvision_blocks.hpp"
#include "kiln/detail/torchvision_models.hpp"
#include "kiln/error.hpp"

namespace kiln::detail {
namespace {

using torchvision::Activation;
using torchvision::Block;
using torchvision::Chain;
using torchvision::ConvNormActivation;

constexpr torchvision::NormOptions kNorm{0.001, 0.01};
constexpr double kDropout = 0.2;

// mobilenetv3.py's InvertedResidualConfig (width_mult 1.0: channels are already multiples of 8).
struct BlockConfig {
  int input_channels;
  int kernel;
  int expanded_channels;
  int out_channels;
  bool use_se;
  bool use_hardswish;
  int stride;
};

// Expand 1x1 (when expanded != input) -> depthwise -> squeeze-excitation (optional) -> project 1x1,
// in `block` ("0", "1", ...), plus the input when shape allows.
class InvertedResidual : public Block {
 public:
  explicit InvertedResidual(const BlockConfig& c)
      : use_residual_(c.stride == 1 && c.input_channels == c.out_channels) {
    const Activation activation = c.use_hardswish ? Activation::hardswish : Activation::relu;
    auto block = std::make_shared<Chain>();
    if (c.expanded_channels != c.input_channels) {
      block->push_back(
          std::make_shared<ConvNormActivation>(c.input_channels, c.expanded_channels, 1, 1, 1, kNorm, activation));
    }
    block->push_back(std::make_shared<ConvNormActivation>(c.expanded_channels, c.expanded_channels, c.kernel,
                                                          c.stride, c.expanded_channels, kNorm, activation));
    if (c.use_se) {
      block->push_back(std::make_shared<torchvision::SqueezeExcitation>(
          c.expanded_channels, torchvision::make_divisible(c.expanded_channels / 4, 8), Activation::relu,
          Activation::hardsigmoid));
    }
    block->push_back(
        std::make_shared<ConvNormActivation>(c.expanded_channels, c.out_channels, 1, 1, 1, kNorm, Activation::none));
    block_ = register_module("block", block);
  }

  at::Tensor forward(const at::Tensor& input) override {
    at::Tensor result = block_->forward(input);
    return use_residual_ ? result + input : result;
  }

 private:
  bool use_residual_;
  std::shared_ptr<Chain> block_;
};

// classifier: Sequential(Linear "0", Hardswish, Dropout, Linear "3").
class Head : public torch::nn::Module {
 public:
  Head(int in_features, int hidden, int classes) {
    hidden_ = register_module("0", torch::nn::Linear(in_features, hidden));
    out_ = register_module("3", torch::nn::Linear(hidden, classes));
    torch::NoGradGuard no_grad;
    for (auto* linear : {&hidden_, &out_}) {
      torch::nn::init::normal_((*linear)->weight, 0, 0.01);
      (*linear)->bias.zero_();
    }
  }
  at::Tensor forward(const at::Tensor& features, DropoutStream* stream) {
    at::Tensor x = at::hardswish(hidden_->forward(features));
    return out_->forward(dropout(x, kDropout, is_training(), stream));
  }

 private:
  torch::nn::Linear hidden_{nullptr};
  torch::nn::Linear out_{nullptr};
};

class MobileNetV3 : public Classifier {
 public:
  MobileNetV3(const ModelSpec& spec, const std::vector<BlockConfig>& blocks, int last_channel) {
    auto features = std::make_shared<Chain>();
    features->push_back(std::make_shared<ConvNormActivation>(spec.in_channels, blocks.front().input_channels, 3, 2, 1,
                                                             kNorm, Activation::hardswish));
    for (const auto& block : blocks) features->push_back(std::make_shared<InvertedResidual>(block));
    const int last_conv_in = blocks.back().out_channels;
    features->push_back(
        std::make_shared<ConvNormActivation>(last_conv_in, 6 * last_conv_in, 1, 1, 1, kNorm, Activation::hardswish));
    features_ = register_module("features", features);
    classifier_ =
        register_module("classifier", std::make_shared<Head>(6 * last_conv_in, last_channel, spec.num_classes));
  }

  at::Tensor forward(const at::Tensor& input) override {
    const at::Tensor x = at::adaptive_avg_pool2d(features_->forward(input), {1, 1}).flatten(1);
    return classifier_->forward(x, dropout_stream_);
  }

 private:
  std::shared_ptr<Chain> features_;
  std::shared_ptr<Head> classifier_;
};

// mobilenetv3.py's _mobilenet_v3_conf: (input, kernel, expanded, out, SE, hardswish, stride).
const std::vector<BlockConfig> kLarge{
    {16, 3, 16, 16, false, false, 1},   {16, 3, 64, 24, false, false, 2},   {24, 3, 72, 24, false, false, 1},
    {24, 5, 72, 40, true, false, 2},    {40, 5, 120, 40, true, false, 1},   {40, 5, 120, 40, true, false, 1},
    {40, 3, 240, 80, false, true, 2},   {80, 3, 200, 80, false, true, 1},   {80, 3, 184, 80, false, true, 1},
    {80, 3, 184, 80, false, true, 1},   {80, 3, 480, 112, true, true, 1},   {112, 3, 672, 112, true, true, 1},
    {112, 5, 672, 160, true, true, 2},  {160, 5, 960, 160, true, true, 1},  {160, 5, 960, 160, true, true, 1},
};
const std::vector<BlockConfig> kSmall{
    {16, 3, 16, 16, true, false, 2},  {16, 3, 72, 24, false, false, 2}, {24, 3, 88, 24, false, false, 1},
    {24, 5, 96, 40, true, true, 2},   {40, 5, 240, 40, true, true, 1},  {40, 5, 240, 40, true, true, 1},
    {40, 5, 120, 48, true, true, 1},  {48, 5, 144, 48, true, true, 1},  {48, 5, 288, 96, true, true, 2},
    {96, 5, 576, 96, true, true, 1},  {96, 5, 576, 96, true, true, 1},
};

}  // namespace

std::shared_ptr<Classifier> make_mobilenet_v3(const ModelSpec& spec) {
  if (spec.name == "mobilenet_v3_large") return std::make_shared<MobileNetV3>(spec, kLarge, 1280);
  if (spec.name == "mobilenet_v3_small") return std::make_shared<MobileNetV3>(spec, kSmall, 1024);
  throw_data_error("not a MobileNetV3: '" + spec.name + "'");
}

}  // namespace kiln::detail
