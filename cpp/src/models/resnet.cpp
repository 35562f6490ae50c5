// torchvision/models/resnet.py: resnet18, resnet34 (BasicBlock) and resnet50 (Bottleneck, the V1.5
// variant with the stride on the 3x3 conv), with the stem taking spec.in_channels.
#include <ATen/ATen.h>
#include <torch/nn/init.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>

#include <algorithm>
#include <array>
#include <limits>
#include <vector>

#include "kiln/detail/isa_dispatch.hpp"
#include "kiln/detail/small_map_conv.hpp"
#include "kiln/detail/torchvision_blocks.hpp"
#include "kiln/detail/torchvision_models.hpp"
#include "kiln/detail/winograd_conv.hpp"
#include "kiln/error.hpp"

namespace kiln::detail {
namespace {

using torchvision::Block;
using torchvision::Chain;

torch::nn::Conv2d conv(int in_channels, int out_channels, int kernel, int stride) {
  torch::nn::Conv2d layer(
      torch::nn::Conv2dOptions(in_channels, out_channels, kernel).stride(stride).padding(kernel / 2).bias(false));
  torchvision::init_conv(layer);
  return layer;
}

// A stride-1 3x3 convolution (padding 1, no bias) on a map with fewer pixels than the kernel's 9 (layer4's 2x2
// maps at 64 px) as pixel-pair matrix products (detail/small_map_conv.hpp) where that applies (float32 on the CPU
// outside autocast), else the module's own. resnet18 at 64 px, batch 32, 2 threads, forward + both gradients of
// one such layer (512 channels, channels-last weight): AVX2 7.0 ms vs oneDNN's 40 ms, AVX-512 5.7 vs 24 ms.
at::Tensor small_map_or_module(torch::nn::Conv2d& layer, const at::Tensor& input) {
  if (small_map_conv_applies(input, layer->weight, 1)) return small_map_conv(input, layer->weight, 1);
  return layer->forward(input);
}

// A stride-1 3x3 convolution (padding 1, no bias) in Winograd's F(4x4, 3x3) form (detail/winograd_conv.hpp)
// where that applies (float32 on the CPU outside autocast) and measured faster than oneDNN's direct kernels,
// else small_map_or_module. Measured for resnet18 at 64 px, batch 32, channels-last (forward + input and weight
// gradients): AVX2, 1 and 2 threads: 16x16 maps of 64 channels (layer1) 1.1x, 8x8 of 128 (layer2) 1.45x,
// 4x4 of 256 (layer3, one tile an image) 0.76-1.09x; AVX-512, where oneDNN's kernels are twice as fast:
// layer1 0.82x, layer2 1.22x. So maps of at least 8x8, and on AVX-512 only with 128 channels or more.
// Channels-last inputs only: Winograd's transforms read and write that layout, and a contiguous model
// (channels_last=false, which tests/test_torchvision_models.py's trainer step uses to compare with
// torchvision's own kernels) keeps oneDNN's roundings: in Winograd form that step's conv1.weight after one SGD
// step was 7.8e-4 from torchvision's (the test allows 1e-4).
at::Tensor conv3x3_stride1(torch::nn::Conv2d& layer, const at::Tensor& input) {
  const at::Tensor& weight = layer->weight;
  const bool wide_enough = isa_level() != IsaLevel::avx512 || weight.size(1) >= 128;
  if (input.dim() == 4 && input.size(2) >= 8 && input.size(3) >= 8 && wide_enough &&
      input.is_contiguous(at::MemoryFormat::ChannelsLast) && conv3x3_winograd_applies(input, weight, at::Tensor(), 1)) {
    return conv3x3_winograd(input, weight, at::Tensor(), 1);
  }
  return small_map_or_module(layer, input);
}

// resnet.py's `downsample`: Sequential(conv1x1 with stride, BatchNorm2d), children "0" and "1".
class Downsample : public Block {
 public:
  Downsample(int in_channels, int out_channels, int stride) {
    conv_ = register_module("0", conv(in_channels, out_channels, 1, stride));
    bn_ = register_module("1", torch::nn::BatchNorm2d(out_channels));
  }
  at::Tensor forward(const at::Tensor& input) override { return bn_->forward(conv_->forward(input)); }

 private:
  torch::nn::Conv2d conv_{nullptr};
  torch::nn::BatchNorm2d bn_{nullptr};
};

class BasicBlock : public Block {
 public:
  static constexpr int kExpansion = 1;

  BasicBlock(int in_channels, int planes, int stride) : conv1_stride1_(stride == 1) {
    conv1_ = register_module("conv1", conv(in_channels, planes, 3, stride));
    bn1_ = register_module("bn1", torch::nn::BatchNorm2d(planes));
    conv2_ = register_module("conv2", conv(planes, planes, 3, 1));
    bn2_ = register_module("bn2", torch::nn::BatchNorm2d(planes));
    if (stride != 1 || in_channels != planes * kExpansion) {
      downsample_ = register_module("downsample", std::make_shared<Downsample>(in_channels, planes, stride));
    }
  }

  at::Tensor forward(const at::Tensor& input) override {
    // In place, as torchvision's ReLU(inplace=True) and `out += identity`: batch norm's backward needs
    // its input, not its output, so the output's memory is reused instead of a new map per op.
    const at::Tensor conv1 = conv1_stride1_ ? conv3x3_stride1(conv1_, input) : conv1_->forward(input);
    at::Tensor out = bn1_->forward(conv1).relu_();
    out = bn2_->forward(conv3x3_stride1(conv2_, out));
    out += downsample_ ? downsample_->forward(input) : input;
    return out.relu_();
  }

  // The weights of the stride-1 3x3 convolutions, which run as pixel-pair products (small_map_or_module) on maps
  // with fewer pixels than the kernel, reading a channels-last weight's taps in place.
  std::vector<at::Tensor> stride1_weights() const {
    if (conv1_stride1_) return {conv1_->weight, conv2_->weight};
    return {conv2_->weight};
  }

 private:
  bool conv1_stride1_;
  torch::nn::Conv2d conv1_{nullptr}, conv2_{nullptr};
  torch::nn::BatchNorm2d bn1_{nullptr}, bn2_{nullptr};
  std::shared_ptr<Downsample> downsample_;
};

class Bottleneck : public Block {
 public:
  static constexpr int kExpansion = 4;

  Bottleneck(int in_channels, int planes, int stride) {
    conv1_ = register_module("conv1", conv(in_channels, planes, 1, 1));
    bn1_ = register_module("bn1", torch::nn::BatchNorm2d(planes));
    conv2_ = register_module("conv2", conv(planes, planes, 3, stride));
    bn2_ = register_module("bn2", torch::nn::BatchNorm2d(planes));
    conv3_ = register_module("conv3", conv(planes, planes * kExpansion, 1, 1));
    bn3_ = register_module("bn3", torch::nn::BatchNorm2d(planes * kExpansion));
    if (stride != 1 || in_channels != planes * kExpansion) {
      downsample_ =
          register_module("downsample", std::make_shared<Downsample>(in_channels, planes * kExpansion, stride));
    }
  }

  at::Tensor forward(const at::Tensor& input) override {
    at::Tensor out = bn1_->forward(conv1_->forward(input)).relu_();  // in place: see BasicBlock
    // conv2 stays oneDNN's: the training step of tests/test_torchvision_models.py (4 images, batch statistics,
    // random weights) amplifies any other rounding of it into conv1.weight's gradient. In Winograd form (layer2's
    // 8x8 maps of 128 channels, AVX-512) that gradient was 0.12 (of 59) from torchvision's, past the 1e-3 relative
    // tolerance (resnet18: 1.3e-5 of 1.9); as pixel-pair products on layer4's 2x2 maps it reached 0.4-0.9 of the
    // tolerance and, once in CI, crossed it (resnet18's BasicBlocks: 0.01).
    out = bn2_->forward(conv2_->forward(out)).relu_();
    out = bn3_->forward(conv3_->forward(out));
    out += downsample_ ? downsample_->forward(input) : input;
    return out.relu_();
  }

 private:
  torch::nn::Conv2d conv1_{nullptr}, conv2_{nullptr}, conv3_{nullptr};
  torch::nn::BatchNorm2d bn1_{nullptr}, bn2_{nullptr}, bn3_{nullptr};
  std::shared_ptr<Downsample> downsample_;
};

class ResNet : public Classifier, public LayoutSplit {
 public:
  template <typename BlockType>
  static std::shared_ptr<ResNet> make(const ModelSpec& spec, const std::array<int, 4>& layers) {
    auto model = std::make_shared<ResNet>(spec);
    int in_channels = 64;
    const std::array<int, 4> planes{64, 128, 256, 512};
    for (std::size_t stage = 0; stage < layers.size(); ++stage) {
      auto chain = std::make_shared<Chain>();
      for (int i = 0; i < layers[stage]; ++i) {
        const int stride = (stage > 0 && i == 0) ? 2 : 1;
        chain->push_back(std::make_shared<BlockType>(in_channels, planes[stage], stride));
        in_channels = planes[stage] * BlockType::kExpansion;
      }
      model->layers_.push_back(model->register_module("layer" + std::to_string(stage + 1), chain));
      model->layer_channels_.push_back(in_channels);
    }
    model->fc_ = model->register_module("fc", torch::nn::Linear(in_channels, spec.num_classes));
    return model;
  }

  explicit ResNet(const ModelSpec& spec) : height_(spec.height), width_(spec.width) {
    conv1_ = register_module(
        "conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(spec.in_channels, 64, 7).stride(2).padding(3).bias(false)));
    torchvision::init_conv(conv1_);
    bn1_ = register_module("bn1", torch::nn::BatchNorm2d(64));
  }

  at::Tensor forward(const at::Tensor& input) override {
    at::Tensor x = bn1_->forward(conv1_->forward(input)).relu_();  // in place: see BasicBlock
    x = at::max_pool2d(x, {3, 3}, {2, 2}, {1, 1});
    for (std::size_t stage = 0; stage < layers_.size(); ++stage) {
      if (stage == first_contiguous_) x = x.contiguous();
      x = layers_[stage]->forward(x);
    }
    x = at::adaptive_avg_pool2d(x, {1, 1}).flatten(1);
    return fc_->forward(x);
  }

  // By stage (layer1..4), whose maps shrink while the weights grow: resnet18 at 64 px, batch 32 trains
  // layer3 and layer4 contiguous (their 4x4 and 2x2 maps); one thread, float32, forward + backward of
  // torchvision's model so split: 628 ms vs 770 ms all channels-last, 717 ms all contiguous (AVX2 limit:
  // 492 vs 549 and 524 ms).
  void contiguous_late_layers(std::int64_t batch_size) override {
    // The stem's 7x7 convolution and 3x3 max pool, and each stage after layer1, halve the map (rounding up).
    const auto halve = [](std::int64_t side) { return (side - 1) / 2 + 1; };
    std::int64_t height = halve(halve(height_));
    std::int64_t width = halve(halve(width_));
    c10::NoGradGuard no_grad;
    for (std::size_t stage = 0; stage < layers_.size(); ++stage) {
      if (stage > 0) {
        height = halve(height);
        width = halve(width);
      }
      std::int64_t largest_weight = 0;
      for (const auto& param : layers_[stage]->parameters()) {
        if (param.dim() == 4) largest_weight = std::max(largest_weight, param.numel());
      }
      if (first_contiguous_ > stage && batch_size * layer_channels_[stage] * height * width < largest_weight) {
        first_contiguous_ = stage;
      }
      if (stage < first_contiguous_) continue;
      // Weights of convolutions that run as pixel-pair products on this stage's map keep their layout.
      std::vector<at::Tensor> small_map_weights;
      for (const auto& block : layers_[stage]->children()) {
        if (const auto* basic = dynamic_cast<const BasicBlock*>(block.get())) {
          for (const at::Tensor& weight : basic->stride1_weights()) {
            if (height * width < weight.size(2) * weight.size(3)) small_map_weights.push_back(weight);
          }
        }
      }
      const auto small_map = [&](const at::Tensor& param) {
        return std::any_of(small_map_weights.begin(), small_map_weights.end(),
                           [&](const at::Tensor& weight) { return weight.is_same(param); });
      };
      // clone: contiguous() keeps a channels-last 1x1 weight's strides (contiguous either way), with which
      // ATen still runs the convolution channels-last.
      for (auto& param : layers_[stage]->parameters()) {
        if (param.dim() == 4 && !small_map(param)) param.set_data(param.clone(at::MemoryFormat::Contiguous));
      }
    }
  }

 private:
  std::int64_t height_, width_;               // the input's
  std::vector<std::int64_t> layer_channels_;  // each stage's output channels
  // The first stage run on contiguous activations (none: layers_.size() or more).
  std::size_t first_contiguous_ = std::numeric_limits<std::size_t>::max();
  torch::nn::Conv2d conv1_{nullptr};
  torch::nn::BatchNorm2d bn1_{nullptr};
  std::vector<std::shared_ptr<Chain>> layers_;
  torch::nn::Linear fc_{nullptr};
};

}  // namespace

std::shared_ptr<Classifier> make_resnet(const ModelSpec& spec) {
  if (spec.name == "resnet18") return ResNet::make<BasicBlock>(spec, {2, 2, 2, 2});
  if (spec.name == "resnet34") return ResNet::make<BasicBlock>(spec, {3, 4, 6, 3});
  if (spec.name == "resnet50") return ResNet::make<Bottleneck>(spec, {3, 4, 6, 3});
  throw_data_error("not a ResNet: '" + spec.name + "'");
}

}  // namespace kiln::detail
