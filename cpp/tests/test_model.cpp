#include "kiln/model.hpp"

#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <c10/core/GradMode.h>

#include <string>
#include <tuple>
#include <vector>

#include "kernel_testing.hpp"
#include "kiln/detail/mnist_cnn.hpp"
#include "kiln/detail/relu_max_pool.hpp"
#include "kiln/detail/small_conv.hpp"
#include "kiln/detail/torchvision_models.hpp"
#include "kiln/detail/winograd_conv.hpp"
#include "kiln/error.hpp"

namespace kiln {
namespace {

class model_architecture : public ::testing::TestWithParam<std::string> {};

TEST_P(model_architecture, produces_class_logits_for_any_image_size_and_channel_count) {
  const auto model = make_model({GetParam(), 3, 5, 20, 16});
  EXPECT_EQ(model->forward(at::randn({2, 3, 20, 16})).sizes(), (std::vector<std::int64_t>{2, 5}));
}

INSTANTIATE_TEST_SUITE_P(all, model_architecture, ::testing::ValuesIn(model_names()),
                         [](const auto& info) { return info.param; });

TEST_P(model_architecture, frozen_backbone_leaves_only_the_classifier_head_trainable) {
  const auto model = make_model({GetParam(), 3, 5, 32, 32});
  freeze_backbone(*model);
  std::vector<std::string> trainable;
  for (const auto& item : model->named_parameters()) {
    if (item.value().requires_grad()) trainable.push_back(item.key());
  }
  ASSERT_EQ(trainable.size(), 2U);
  const auto head = model->named_parameters()[trainable[0]];
  EXPECT_EQ(head.size(0), 5);  // the class count: the head, not another layer
  const at::Tensor loss = model->forward(at::randn({2, 3, 32, 32})).sum();
  loss.backward();
  for (const auto& item : model->named_parameters()) {
    EXPECT_EQ(item.value().grad().defined(), item.value().requires_grad()) << item.key();
  }
}

TEST(model, unknown_names_and_too_small_inputs_are_data_errors) {
  EXPECT_THROW(make_model({"mnist_cnn", 1, 10, 4, 4}), DataError);
  EXPECT_THROW(make_model({"no_such_model", 1, 10, 28, 28}), DataError);
  EXPECT_THROW(make_model({"resnet8", 1, 1, 28, 28}), DataError);  // one class
}

TEST(resnet, late_layers_go_contiguous_but_for_small_map_convolution_weights) {
  // resnet18 at 64 px, batch 32 (as the trainer prepares it): layer3's 4x4 and layer4's 2x2 maps hold fewer values
  // than their weights, so those stages run contiguous; layer4's stride-1 3x3 convolutions run as pixel-pair
  // products on 2x2 maps, which read a channels-last weight in place.
  const auto model = make_model({"resnet18", 3, 5, 64, 64});
  {
    c10::NoGradGuard no_grad;
    for (auto& param : model->parameters()) {
      if (param.dim() == 4) param.set_data(param.clone(at::MemoryFormat::ChannelsLast));
    }
  }
  auto* split = dynamic_cast<detail::LayoutSplit*>(model.get());
  ASSERT_NE(split, nullptr);
  split->contiguous_late_layers(32);
  const auto params = model->named_parameters();
  for (const char* name : {"layer4.0.conv2.weight", "layer4.1.conv1.weight", "layer4.1.conv2.weight",
                           "layer2.0.conv1.weight", "layer1.0.conv2.weight"}) {
    EXPECT_TRUE(params[name].is_contiguous(at::MemoryFormat::ChannelsLast)) << name;
  }
  for (const char* name :
       {"layer4.0.conv1.weight", "layer4.0.downsample.0.weight", "layer3.0.conv1.weight", "layer3.1.conv2.weight"}) {
    EXPECT_TRUE(params[name].is_contiguous()) << name;
  }
}

TEST(mnist_cnn, reordered_fc1_reads_channels_last_activations_as_fc1_reads_flattened_ones) {
  // The one reordering the float model's channels-last inference and int8's fc1 both use.
  at::manual_seed(4);
  const detail::mnist_cnn::PooledSize pooled = detail::mnist_cnn::pooled_size(12, 10);
  ASSERT_EQ(pooled.height, 4);
  ASSERT_EQ(pooled.width, 3);
  const std::int64_t channels = detail::mnist_cnn::kConv2Channels;
  const at::Tensor activations = at::randn({2, channels, pooled.height, pooled.width});
  const at::Tensor weight = at::randn({5, channels * pooled.height * pooled.width});
  const at::Tensor expected = at::matmul(activations.flatten(1), weight.t());
  const at::Tensor hwc = activations.permute({0, 2, 3, 1}).flatten(1);
  const at::Tensor actual = at::matmul(hwc, detail::mnist_cnn::fc1_weight_for_channels_last(weight, pooled).t());
  EXPECT_TRUE(at::allclose(actual, expected, 1e-5, 1e-5));
}

// (dtype, activation shape): ties, odd sizes, and both dtypes the training runs in.
class relu_max_pool : public ::testing::TestWithParam<std::tuple<at::ScalarType, std::vector<std::int64_t>>> {};

TEST_P(relu_max_pool, matches_torch_forward_and_backward) {
  const auto& [dtype, size] = GetParam();
  at::manual_seed(2);
  // Rounded values make ties (between positives and among negatives) common.
  const at::Tensor values = (at::randn(size) * 3).round().to(dtype).contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor ours = values.clone().set_requires_grad(true);
  at::Tensor theirs = values.clone().set_requires_grad(true);
  const at::Tensor out = detail::relu_max_pool2x2(ours);
  const at::Tensor expected = at::max_pool2d(at::relu(theirs), {2, 2});
  ASSERT_TRUE(at::equal(out, expected));
  const at::Tensor grad = at::randn(expected.sizes()).to(dtype);
  out.backward(grad);
  expected.backward(grad);
  EXPECT_TRUE(at::equal(ours.grad(), theirs.grad()));
  c10::NoGradGuard no_grad;  // evaluation takes the no-record path: same values
  EXPECT_TRUE(at::equal(detail::relu_max_pool2x2(values), expected.detach()));
}

INSTANTIATE_TEST_SUITE_P(dtypes_and_shapes, relu_max_pool,
                         ::testing::Combine(::testing::Values(at::kFloat, at::kBFloat16),
                                            ::testing::Values(std::vector<std::int64_t>{3, 16, 8, 8},
                                                              std::vector<std::int64_t>{2, 8, 7, 9})));

// (input channels, input memory format): grayscale and RGB images, as the trainer hands them over.
class conv3x3_relu : public ::testing::TestWithParam<std::tuple<std::int64_t, at::MemoryFormat>> {};

TEST_P(conv3x3_relu, matches_torch_values_and_weight_gradients) {
  const auto& [channels, format] = GetParam();
  at::manual_seed(3);
  const at::Tensor x = at::randn({5, channels, 11, 9}).contiguous(format);
  const at::Tensor weight = at::randn({32, channels, 3, 3}).contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor bias = at::randn({32});
  at::Tensor w_ours = weight.clone().set_requires_grad(true), b_ours = bias.clone().set_requires_grad(true);
  at::Tensor w_theirs = weight.clone().set_requires_grad(true), b_theirs = bias.clone().set_requires_grad(true);
  const at::Tensor out = detail::conv3x3_relu(x, w_ours, b_ours);
  const at::Tensor expected = at::relu(at::conv2d(x, w_theirs, b_theirs));
  EXPECT_TRUE(out.is_contiguous(at::MemoryFormat::ChannelsLast));
  ASSERT_TRUE(at::allclose(out, expected, 1e-5, 1e-5));
  EXPECT_TRUE(out.eq(0).any().item<bool>());  // the ReLU's gradient mask is exercised
  const at::Tensor grad = at::randn(expected.sizes());
  out.backward(grad);
  expected.backward(grad);
  EXPECT_TRUE(at::allclose(w_ours.grad(), w_theirs.grad(), 1e-4, 1e-4));
  EXPECT_TRUE(at::allclose(b_ours.grad(), b_theirs.grad(), 1e-4, 1e-4));
  EXPECT_EQ(w_ours.grad().strides(), w_ours.strides());
  c10::NoGradGuard no_grad;  // evaluation: the same values, nothing recorded
  EXPECT_TRUE(at::equal(detail::conv3x3_relu(x, weight, bias), out.detach()));
}

INSTANTIATE_TEST_SUITE_P(channels_and_layouts, conv3x3_relu,
                         ::testing::Combine(::testing::Values(std::int64_t{1}, std::int64_t{3}),
                                            ::testing::Values(at::MemoryFormat::Contiguous,
                                                              at::MemoryFormat::ChannelsLast)));

TEST(conv3x3_relu_fallback, other_dtypes_and_inputs_that_need_a_gradient_take_torch_s_ops) {
  at::manual_seed(4);
  const at::Tensor x = at::randn({2, 1, 8, 8});
  const at::Tensor weight = at::randn({4, 1, 3, 3}), bias = at::randn({4});
  const at::Tensor bf16 = detail::conv3x3_relu(x.to(at::kBFloat16), weight.to(at::kBFloat16), bias.to(at::kBFloat16));
  EXPECT_EQ(bf16.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::allclose(bf16.to(at::kFloat), at::relu(at::conv2d(x, weight, bias)), 0.1, 0.1));
  at::Tensor input = x.clone().set_requires_grad(true);
  detail::conv3x3_relu(input, weight, bias).sum().backward();
  EXPECT_TRUE(input.grad().defined());
}

// (input size, input memory format): mnist_cnn's conv2 (26x26 -> 24x24, whole 4x4 tiles; 5 images, an
// odd block), and odd sizes whose edge tiles are cut, as the trainer and the tests hand them over.
class conv3x3_winograd : public ::testing::TestWithParam<std::tuple<std::vector<std::int64_t>, at::MemoryFormat>> {};

// Winograd's transforms round differently from a direct sum: close_to, within 1e-5 of the largest value
// (measured: 3.4e-6 for the outputs, 5.1e-6 for the weight gradient of mnist_cnn's conv2 shape).
using testing::close_to;
using testing::ThreadCount;

// conv3x3_winograd(x, weight, bias, padding) against at::conv2d: channels-last output, values, the input, weight
// and (where there is one) bias gradients, the weight gradient in the weight's own strides, and evaluation's
// output (nothing recorded) equal to training's.
void expect_matches_conv2d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           std::int64_t padding) {
  const auto leaf = [](const at::Tensor& t) { return t.defined() ? t.clone().set_requires_grad(true) : at::Tensor(); };
  at::Tensor x_ours = leaf(x), w_ours = leaf(weight), b_ours = leaf(bias);
  at::Tensor x_theirs = leaf(x), w_theirs = leaf(weight), b_theirs = leaf(bias);
  const at::Tensor out = detail::conv3x3_winograd(x_ours, w_ours, b_ours, padding);
  const at::Tensor expected = at::conv2d(x_theirs, w_theirs, b_theirs, 1, padding);
  EXPECT_TRUE(out.is_contiguous(at::MemoryFormat::ChannelsLast));
  ASSERT_EQ(out.sizes(), expected.sizes());
  ASSERT_TRUE(close_to(out, expected));
  const at::Tensor grad = at::randn(expected.sizes());
  out.backward(grad);
  expected.backward(grad);
  EXPECT_TRUE(close_to(x_ours.grad(), x_theirs.grad()));
  EXPECT_TRUE(close_to(w_ours.grad(), w_theirs.grad()));
  if (bias.defined()) {
    EXPECT_TRUE(at::allclose(b_ours.grad(), b_theirs.grad(), 1e-4, 1e-4));
  }
  EXPECT_EQ(w_ours.grad().strides(), w_ours.strides());
  c10::NoGradGuard no_grad;  // evaluation: the same values, nothing recorded
  EXPECT_TRUE(at::equal(detail::conv3x3_winograd(x, weight, bias, padding), out.detach()));
}

TEST_P(conv3x3_winograd, matches_torch_values_and_all_three_gradients) {
  const auto& [size, format] = GetParam();
  const ThreadCount one_thread(1);
  at::manual_seed(5);
  const std::int64_t channels = size[1];
  const at::Tensor x = at::relu(at::randn(size)).contiguous(format);
  const at::Tensor weight = (at::randn({16, channels, 3, 3}) * 0.1).contiguous(at::MemoryFormat::ChannelsLast);
  expect_matches_conv2d(x, weight, at::randn({16}), 0);
}

INSTANTIATE_TEST_SUITE_P(
    sizes_and_layouts, conv3x3_winograd,
    ::testing::Combine(::testing::Values(std::vector<std::int64_t>{5, 32, 26, 26},
                                         std::vector<std::int64_t>{3, 8, 11, 9}, std::vector<std::int64_t>{1, 4, 3, 5}),
                       ::testing::Values(at::MemoryFormat::Contiguous, at::MemoryFormat::ChannelsLast)));

// Padding 1 (ResNet's stride-1 3x3 convolutions, whose input gradient takes the Winograd form too), with and
// without a bias, with one and two threads: (input size, bias, threads). Sizes: a map of whole tiles (16x16, 16
// tiles an image: resnet18's layer1 at 64 px), a 4x4 map (one tile whose 6x6 input reaches into the padding on
// all four sides), odd sizes whose edge tiles are cut, and a 1x2 map smaller than one tile.
class conv3x3_winograd_padded : public ::testing::TestWithParam<std::tuple<std::vector<std::int64_t>, bool, int>> {};

TEST_P(conv3x3_winograd_padded, matches_torch_values_and_all_gradients) {
  const auto& [size, with_bias, threads] = GetParam();
  const ThreadCount count(threads);
  at::manual_seed(8);
  const at::Tensor x = at::randn(size).contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor weight = at::randn({12, size[1], 3, 3}) * 0.1;
  expect_matches_conv2d(x, weight, with_bias ? at::randn({12}) : at::Tensor(), 1);
}

INSTANTIATE_TEST_SUITE_P(sizes_bias_and_threads, conv3x3_winograd_padded,
                         ::testing::Combine(::testing::Values(std::vector<std::int64_t>{6, 16, 16, 16},
                                                              std::vector<std::int64_t>{5, 8, 4, 4},
                                                              std::vector<std::int64_t>{3, 5, 7, 10},
                                                              std::vector<std::int64_t>{2, 3, 1, 2}),
                                            ::testing::Bool(), ::testing::Values(1, 2)));

// The intra-op threads share out blocks of images, and the weight gradient adds the blocks' sums in block order:
// the same values and gradients, to the bit, whatever the thread count (9 images: blocks of 4 and 5), with
// padding 0 and with padding 1 (whose input gradient is Winograd's too).
TEST(conv3x3_winograd, gives_the_same_bits_with_one_and_two_threads) {
  at::manual_seed(7);
  const at::Tensor x = at::randn({9, 8, 14, 14}).contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor weight = at::randn({16, 8, 3, 3}) * 0.1, bias = at::randn({16});
  for (const std::int64_t padding : {0, 1}) {
    const std::int64_t side = 12 + 2 * padding;
    const at::Tensor grad = at::randn({9, 16, side, side}).contiguous(at::MemoryFormat::ChannelsLast);
    std::vector<at::Tensor> outputs, weight_grads, input_grads;
    for (const int threads : {1, 2}) {
      const ThreadCount count(threads);
      at::Tensor input = x.clone().set_requires_grad(true), w = weight.clone().set_requires_grad(true);
      const at::Tensor out = detail::conv3x3_winograd(input, w, bias, padding);
      out.backward(grad);
      outputs.push_back(out.detach());
      weight_grads.push_back(w.grad());
      input_grads.push_back(input.grad());
    }
    EXPECT_TRUE(at::equal(outputs[0], outputs[1])) << "padding " << padding;
    EXPECT_TRUE(at::equal(weight_grads[0], weight_grads[1])) << "padding " << padding;
    if (padding == 1) {  // padding 0's is oneDNN's
      EXPECT_TRUE(at::equal(input_grads[0], input_grads[1]));
    }
    EXPECT_TRUE(close_to(outputs[1], at::conv2d(x, weight, bias, 1, padding))) << "padding " << padding;
  }
}

TEST(conv3x3_winograd_fallback, other_dtypes_and_autocast_take_torch_s_convolution) {
  const ThreadCount one_thread(1);
  at::manual_seed(6);
  const at::Tensor x = at::randn({2, 4, 8, 8});
  const at::Tensor weight = at::randn({4, 4, 3, 3}), bias = at::randn({4});
  const at::Tensor expected = at::conv2d(x, weight, bias);
  const at::Tensor bf16 =
      detail::conv3x3_winograd(x.to(at::kBFloat16), weight.to(at::kBFloat16), bias.to(at::kBFloat16));
  EXPECT_EQ(bf16.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::allclose(bf16.to(at::kFloat), expected, 0.1, 0.5));
  const at::Tensor padded = detail::conv3x3_winograd(x.to(at::kBFloat16), weight.to(at::kBFloat16), at::Tensor(), 1);
  EXPECT_TRUE(at::allclose(padded.to(at::kFloat), at::conv2d(x, weight, {}, 1, 1), 0.1, 0.5));
  {
    at::autocast::set_autocast_enabled(at::kCPU, true);
    const at::Tensor autocast = detail::conv3x3_winograd(x, weight, bias);
    at::autocast::set_autocast_enabled(at::kCPU, false);
    at::autocast::clear_cache();
    EXPECT_EQ(autocast.scalar_type(), at::kBFloat16);  // autocast's own conv2d ran
  }
}

}  // namespace
}  // namespace kiln
