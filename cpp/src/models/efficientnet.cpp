// torchvision/models/efficientnet.py: efficientnet_b0 (MBConv stages, squeeze-excitation with SiLU,
// stochastic depth rising linearly to 0.2 over the blocks, dropout 0.2 before the head), with the stem
// taking spec.in_channels.
#include <ATen/ATen.h>
#include <torch/nn/init.h>
#include <torch/nn/modules/linear.h>

#include <algorithm>
#include <cmath>
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

constexpr torchvision::NormOptions kNorm{};
constexpr double kDropout = 0.2;
constexpr double kStochasticDepth = 0.2;

// efficientnet.py's MBConvConfig (width and depth multipliers 1.0).
struct StageConfig {
  double expand_ratio;
  int kernel;
  int stride;
  int input_channels;
  int out_channels;
  int num_layers;
};

// Expand 1x1 (when expanded != input) -> depthwise -> squeeze-excitation -> project 1x1, in `block`;
// with a residual, the branch passes through stochastic depth first. `stream` points at the model's
// dropout stream pointer, set after construction.
class MBConv : public Block {
 public:
  MBConv(const StageConfig& c, double stochastic_depth_prob, DropoutStream* const* stream)
      : use_residual_(c.stride == 1 && c.input_channels == c.out_channels),
        stochastic_depth_prob_(stochastic_depth_prob),
        stream_(stream) {
    const int expanded = torchvision::make_divisible(c.input_channels * c.expand_ratio, 8);
    auto block = std::make_shared<Chain>();
    if (expanded != c.input_channels) {
      block->push_back(
          std::make_shared<ConvNormActivation>(c.input_channels, expanded, 1, 1, 1, kNorm, Activation::silu));
    }
    block->push_back(std::make_shared<ConvNormActivation>(expanded, expanded, c.kernel, c.stride, expanded, kNorm,
                                                          Activation::silu));
    block->push_back(std::make_shared<torchvision::SqueezeExcitation>(expanded, std::max(1, c.input_channels / 4),
                                                                      Activation::silu, Activation::sigmoid));
    block->push_back(std::make_shared<ConvNormActivation>(expanded, c.out_channels, 1, 1, 1, kNorm, Activation::none));
    block_ = register_module("block", block);
  }

  at::Tensor forward(const at::Tensor& input) override {
    at::Tensor result = block_->forward(input);
    if (!use_residual_) return result;
    return torchvision::stochastic_depth(result, stochastic_depth_prob_, is_training(), *stream_) + input;
  }

 private:
  bool use_residual_;
  double stochastic_depth_prob_;
  DropoutStream* const* stream_;
  std::shared_ptr<Chain> block_;
};

// classifier: Sequential(Dropout, Linear "1").
class Head : public torch::nn::Module {
 public:
  Head(int in_features, int classes) {
    out_ = register_module("1", torch::nn::Linear(in_features, classes));
    torch::NoGradGuard no_grad;
    const double range = 1.0 / std::sqrt(static_cast<double>(classes));
    torch::nn::init::uniform_(out_->weight, -range, range);
    out_->bias.zero_();
  }
  at::Tensor forward(const at::Tensor& features, DropoutStream* stream) {
    return out_->forward(dropout(features, kDropout, is_training(), stream));
  }

 private:
  torch::nn::Linear out_{nullptr};
};

// efficientnet.py's _efficientnet_conf("efficientnet_b0").
const std::vector<StageConfig> kB0{
    {1, 3, 1, 32, 16, 1}, {6, 3, 2, 16, 24, 2},  {6, 5, 2, 24, 40, 2},   {6, 3, 2, 40, 80, 3},
    {6, 5, 1, 80, 112, 3}, {6, 5, 2, 112, 192, 4}, {6, 3, 1, 192, 320, 1},
};

class EfficientNet : public Classifier {
 public:
  EfficientNet(const ModelSpec& spec, const std::vector<StageConfig>& stages) {
    auto features = std::make_shared<Chain>();
    features->push_back(std::make_shared<ConvNormActivation>(spec.in_channels, stages.front().input_channels, 3, 2, 1,
                                                             kNorm, Activation::silu));
    int total_blocks = 0;
    for (const auto& stage : stages) total_blocks += stage.num_layers;
    int block_id = 0;
    for (const auto& stage : stages) {
      auto chain = std::make_shared<Chain>();
      for (int i = 0; i < stage.num_layers; ++i) {
        StageConfig block = stage;
        if (i > 0) {
          block.input_channels = block.out_channels;
          block.stride = 1;
        }
        const double probability = kStochasticDepth * static_cast<double>(block_id) / total_blocks;
        chain->push_back(std::make_shared<MBConv>(block, probability, &dropout_stream_));
        ++block_id;
      }
      features->push_back(chain);
    }
    const int last_conv_in = stages.back().out_channels;
    features->push_back(
        std::make_shared<ConvNormActivation>(last_conv_in, 4 * last_conv_in, 1, 1, 1, kNorm, Activation::silu));
    features_ = register_module("features", features);
    classifier_ = register_module("classifier", std::make_shared<Head>(4 * last_conv_in, spec.num_classes));
  }

  at::Tensor forward(const at::Tensor& input) override {
    const at::Tensor x = at::adaptive_avg_pool2d(features_->forward(input), {1, 1}).flatten(1);
    return classifier_->forward(x, dropout_stream_);
  }

 private:
  std::shared_ptr<Chain> features_;
  std::shared_ptr<Head> classifier_;
};

}  // namespace

std::shared_ptr<Classifier> make_efficientnet(const ModelSpec& spec) {
  if (spec.name == "efficientnet_b0") return std::make_shared<EfficientNet>(spec, kB0);
  throw_data_error("not an EfficientNet: '" + spec.name + "'");
}

}  // namespace kiln::detail
