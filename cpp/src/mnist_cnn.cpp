#include "kiln/detail/mnist_cnn.hpp"

#include <c10/core/GradMode.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>

#include "kiln/detail/activation_observer.hpp"
#include "kiln/detail/conv_relu_pool.hpp"
#include "kiln/detail/dropout.hpp"
#include "kiln/detail/relu_max_pool.hpp"
#include "kiln/detail/small_conv.hpp"
#include "kiln/detail/sparse_linear.hpp"
#include "kiln/error.hpp"

namespace kiln::detail::mnist_cnn {
namespace {

// pytorch/examples mnist/main.py's Net: conv1 -> conv2 -> max pool -> dropout -> fc1 -> dropout -> fc2.
// The fc1 input size follows the image size instead of assuming 28x28.
class MnistCnn : public Classifier {
 public:
  explicit MnistCnn(const ModelSpec& spec) {
    pooled_ = pooled_size(spec.height, spec.width);
    if (pooled_.height < 1 || pooled_.width < 1) {
      throw_data_error("mnist_cnn needs images of at least 6x6 pixels, got " + std::to_string(spec.height) + "x" +
                       std::to_string(spec.width));
    }
    conv1_ = register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(spec.in_channels, kConv1Channels, 3)));
    conv2_ = register_module("conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(kConv1Channels, kConv2Channels, 3)));
    fc1_ = register_module("fc1", torch::nn::Linear(kConv2Channels * pooled_.height * pooled_.width, kFc1Features));
    fc2_ = register_module("fc2", torch::nn::Linear(kFc1Features, spec.num_classes));
    // Same values, stored [in, out]: linear() multiplies by weight.t(), which is then contiguous, so
    // the bf16 matmul needs no transposed copy of the 1.2M weights per step (nor of their gradient).
    c10::NoGradGuard no_grad;
    fc1_->weight.set_data(fc1_->weight.t().contiguous().t());
  }

  torch::Tensor forward(const torch::Tensor& input) override {
    // With one input channel, "channels-last" and "contiguous" are the same memory, and conv1 picks
    // contiguous output from contiguous strides; the rest of the network then mixes layouts (slow
    // kernels, extra copies). Given channels-last strides for the same memory, conv1 writes
    // channels-last itself (measured: saves a 0.4 ms copy per 32-image training step, each way).
    const bool channels_last = conv2_->weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
    torch::Tensor x = input;
    if (channels_last && x.size(1) == 1 && x.is_contiguous()) {
      x = x.as_strided(x.sizes(), {x.size(2) * x.size(3), 1, x.size(3), 1});
    }
    // conv1 + ReLU in kiln's own loop for few input channels (detail/small_conv.hpp) where it applies.
    const auto conv1 =
        channels_last ? conv3x3_relu(x, conv1_->weight, conv1_->bias) : torch::relu(conv1_->forward(x).contiguous());
    // conv2 in Winograd's form, then ReLU and pooling, with a backward that only computes the gradients of the
    // outputs pooling kept (detail/conv_relu_pool.hpp). Pooling keeps conv2's largest activation: it is observed
    // after pooling (4x fewer values).
    x = channels_last ? conv3x3_relu_max_pool2x2(conv1, conv2_->weight, conv2_->bias)
                      : relu_max_pool2x2(conv2_->forward(conv1));
    const auto pooled = x;
    x = dropout(x, 0.25, is_training(), dropout_stream_);
    // Flattened in memory order: (h, w, c) for channels-last activations, which fc1's weights then
    // follow (prepare_channels_last_inference), so no copy is made.
    x = hwc_flatten_ ? x.permute({0, 2, 3, 1}).flatten(1) : torch::flatten(x, 1);
    // fc1 reads pooled, dropped-out activations: mostly zeros once training is under way (detail/sparse_linear.hpp).
    x = torch::relu(sparse_input_linear(x, fc1_->weight, fc1_->bias));
    if (observer_ != nullptr) observer_->observe({conv1, pooled, x}, input.size(0));  // kObservedActivations
    x = dropout(x, 0.5, is_training(), dropout_stream_);
    return fc2_->forward(x);
  }

  void prepare_channels_last_inference() override {
    if (hwc_flatten_) return;
    c10::NoGradGuard no_grad;
    // Stored [in, out] as before.
    fc1_->weight.set_data(fc1_weight_for_channels_last(fc1_->weight, pooled_).t().contiguous().t());
    hwc_flatten_ = true;
  }

 private:
  PooledSize pooled_;
  bool hwc_flatten_ = false;
  torch::nn::Conv2d conv1_{nullptr};
  torch::nn::Conv2d conv2_{nullptr};
  torch::nn::Linear fc1_{nullptr};
  torch::nn::Linear fc2_{nullptr};
};

}  // namespace

at::Tensor fc1_weight_for_channels_last(const at::Tensor& fc1_weight, PooledSize pooled) {
  return fc1_weight.view({fc1_weight.size(0), kConv2Channels, pooled.height, pooled.width})
      .permute({0, 2, 3, 1})
      .reshape({fc1_weight.size(0), -1});
}

std::shared_ptr<Classifier> make(const ModelSpec& spec) {
  return std::make_shared<MnistCnn>(spec);
}

}  // namespace kiln::detail::mnist_cnn
