#include "kiln/model.hpp"

#include <torch/nn/functional/activation.h>
#include <torch/nn/functional/dropout.h>
#include <torch/nn/functional/pooling.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>

#include "kiln/error.hpp"

namespace kiln {
namespace F = torch::nn::functional;

namespace {

// pytorch/examples mnist/main.py's Net: conv 32 -> conv 64 -> max pool -> dropout -> fc 128 ->
// dropout -> fc classes. The fc input size follows the image size instead of assuming 28x28.
class MnistCnn : public Classifier {
 public:
  explicit MnistCnn(const ModelSpec& spec) {
    const int pooled_h = (spec.height - 4) / 2;
    const int pooled_w = (spec.width - 4) / 2;
    if (pooled_h < 1 || pooled_w < 1) {
      throw_data_error("mnist_cnn needs images of at least 6x6 pixels, got " + std::to_string(spec.height) + "x" +
                       std::to_string(spec.width));
    }
    conv1_ = register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(spec.in_channels, 32, 3)));
    conv2_ = register_module("conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(32, 64, 3)));
    fc1_ = register_module("fc1", torch::nn::Linear(64 * pooled_h * pooled_w, 128));
    fc2_ = register_module("fc2", torch::nn::Linear(128, spec.num_classes));
  }

  torch::Tensor forward(const torch::Tensor& input) override {
    auto x = torch::relu(conv1_->forward(input));
    x = torch::relu(conv2_->forward(x));
    x = torch::max_pool2d(x, 2);
    x = torch::dropout(x, 0.25, is_training());
    x = torch::flatten(x, 1);
    x = torch::relu(fc1_->forward(x));
    x = torch::dropout(x, 0.5, is_training());
    return fc2_->forward(x);
  }

 private:
  torch::nn::Conv2d conv1_{nullptr};
  torch::nn::Conv2d conv2_{nullptr};
  torch::nn::Linear fc1_{nullptr};
  torch::nn::Linear fc2_{nullptr};
};

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
  return {"mnist_cnn", "resnet8"};
}

std::shared_ptr<Classifier> make_model(const ModelSpec& spec) {
  if (spec.in_channels < 1 || spec.num_classes < 2) {
    throw_data_error("a model needs at least 1 input channel and 2 classes, got " + std::to_string(spec.in_channels) +
                     " channel(s) and " + std::to_string(spec.num_classes) + " class(es)");
  }
  if (spec.name == "mnist_cnn") return std::make_shared<MnistCnn>(spec);
  if (spec.name == "resnet8") return std::make_shared<ResNet8>(spec);
  std::string known;
  for (const auto& name : model_names()) known += (known.empty() ? "" : ", ") + name;
  throw_data_error("unknown model '" + spec.name + "' (known: " + known + ")");
}

}  // namespace kiln
