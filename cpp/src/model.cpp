#include "kiln/model.hpp"

#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>

#include "kiln/detail/mnist_cnn.hpp"
#include "kiln/detail/torchvision_models.hpp"
#include "kiln/error.hpp"
#include "kiln/scripted_model.hpp"

namespace kiln {
namespace {

// The basic residual block of ResNet (two 3x3 convs with batch norm), with a 1x1 projection when the
// shape changes.
class BasicBlock : public torch::nn::Module {
 public:
  BasicBlock(int in_channels, int out_channels, int stride) {
    using torch::nn::Conv2dOptions;
    conv1_ = register_module(
        "conv1", torch::nn::Conv2d(Conv2dOptions(in_channels, out_channels, 3).stride(stride).padding(1).bias(false)));
    bn1_ = register_module("bn1", torch::nn::BatchNorm2d(out_channels));
    conv2_ = register_module("conv2",
                             torch::nn::Conv2d(Conv2dOptions(out_channels, out_channels, 3).padding(1).bias(false)));
    bn2_ = register_module("bn2", torch::nn::BatchNorm2d(out_channels));
    if (stride != 1 || in_channels != out_channels) {
      shortcut_ = register_module(
          "shortcut", torch::nn::Sequential(
                          torch::nn::Conv2d(Conv2dOptions(in_channels, out_channels, 1).stride(stride).bias(false)),
                          torch::nn::BatchNorm2d(out_channels)));
    }
  }

  torch::Tensor forward(const torch::Tensor& input) {
    auto x = torch::relu(bn1_->forward(conv1_->forward(input)));
    x = bn2_->forward(conv2_->forward(x));
    return torch::relu(x + (shortcut_ ? shortcut_->forward(input) : input));
  }

 private:
  torch::nn::Conv2d conv1_{nullptr};
  torch::nn::BatchNorm2d bn1_{nullptr};
  torch::nn::Conv2d conv2_{nullptr};
  torch::nn::BatchNorm2d bn2_{nullptr};
  torch::nn::Sequential shortcut_{nullptr};
};

// A small CIFAR-style ResNet: 3x3 stem, three stages of one basic block (16, 32, 64 channels),
// global average pooling, fc.
class ResNet8 : public Classifier {
 public:
  explicit ResNet8(const ModelSpec& spec) {
    using torch::nn::Conv2dOptions;
    stem_ = register_module("stem", torch::nn::Conv2d(Conv2dOptions(spec.in_channels, 16, 3).padding(1).bias(false)));
    bn_ = register_module("bn", torch::nn::BatchNorm2d(16));
    layer1_ = register_module("layer1", std::make_shared<BasicBlock>(16, 16, 1));
    layer2_ = register_module("layer2", std::make_shared<BasicBlock>(16, 32, 2));
    layer3_ = register_module("layer3", std::make_shared<BasicBlock>(32, 64, 2));
    fc_ = register_module("fc", torch::nn::Linear(64, spec.num_classes));
  }

  torch::Tensor forward(const torch::Tensor& input) override {
    auto x = torch::relu(bn_->forward(stem_->forward(input)));
    x = layer3_->forward(layer2_->forward(layer1_->forward(x)));
    x = torch::adaptive_avg_pool2d(x, {1, 1}).flatten(1);
    return fc_->forward(x);
  }

 private:
  torch::nn::Conv2d stem_{nullptr};
  torch::nn::BatchNorm2d bn_{nullptr};
  std::shared_ptr<BasicBlock> layer1_, layer2_, layer3_;
  torch::nn::Linear fc_{nullptr};
};

}  // namespace

std::vector<std::string> model_names() {
  return {"mnist_cnn",          "resnet8",           "resnet18",       "resnet34", "resnet50",
          "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0"};
}

std::shared_ptr<Classifier> make_model(const ModelSpec& spec) {
  if (spec.in_channels < 1 || spec.num_classes < 2) {
    throw_data_error("a model needs at least 1 input channel and 2 classes, got " + std::to_string(spec.in_channels) +
                     " channel(s) and " + std::to_string(spec.num_classes) + " class(es)");
  }
  if (is_scripted_model_name(spec.name)) return make_scripted_model(spec.name);
  if (spec.name == "mnist_cnn") return detail::mnist_cnn::make(spec);
  if (spec.name == "resnet8") return std::make_shared<ResNet8>(spec);
  if (spec.name == "resnet18" || spec.name == "resnet34" || spec.name == "resnet50") return detail::make_resnet(spec);
  if (spec.name == "mobilenet_v3_small" || spec.name == "mobilenet_v3_large") return detail::make_mobilenet_v3(spec);
  if (spec.name == "efficientnet_b0") return detail::make_efficientnet(spec);
  std::string known;
  for (const auto& name : model_names()) known += (known.empty() ? "" : ", ") + name;
  throw_data_error("unknown model '" + spec.name + "' (known: " + known + ")");
}

std::int64_t freeze_backbone(Classifier& model) {
  auto parameters = model.parameters();
  const std::size_t head = parameters.size() >= 2 ? parameters.size() - 2 : 0;  // weight, bias
  std::int64_t trainable = 0;
  for (std::size_t i = 0; i < parameters.size(); ++i) {
    if (i < head) {
      parameters[i].set_requires_grad(false);
    } else {
      trainable += parameters[i].numel();
    }
  }
  return trainable;
}

}  // namespace kiln
