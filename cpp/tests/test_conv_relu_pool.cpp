#include "kiln/detail/conv_relu_pool.hpp"

#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/GradMode.h>

#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "kernel_testing.hpp"
#include "kiln/detail/relu_max_pool.hpp"
#include "kiln/detail/winograd_conv.hpp"

namespace kiln {
namespace {

using testing::close_to;

struct Result {
  at::Tensor out, grad_x, grad_weight, grad_bias;
};

// One forward and backward of kiln's fused layer, or of ATen's three ops, on copies of the same tensors.
Result run(bool ours, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, std::int64_t padding,
           const at::Tensor& grad) {
  at::Tensor xg = x.clone().set_requires_grad(true), wg = weight.clone().set_requires_grad(true);
  at::Tensor bg = bias.defined() ? bias.clone().set_requires_grad(true) : at::Tensor();
  const at::Tensor out = ours ? detail::conv3x3_relu_max_pool2x2(xg, wg, bg, padding)
                              : at::max_pool2d(at::relu(at::conv2d(xg, wg, bg, 1, padding)), 2);
  out.backward(grad);
  return {out.detach(), xg.grad(), wg.grad(), bg.defined() ? bg.grad() : at::Tensor()};
}

// (input size, output channels, padding, bias, layout, threads): mnist_cnn's conv2 (32 -> 64 on 26x26, padding 0),
// odd convolution outputs whose last row and column pooling drops, padding 1 with 80 outputs (a listing word of 64
// and one of 16), 8 and 48 input channels (blocks of 8 and 16 + 32 channels), no bias, and a contiguous input and
// weight.
class conv_relu_pool
    : public ::testing::TestWithParam<
          std::tuple<std::vector<std::int64_t>, std::int64_t, std::int64_t, bool, at::MemoryFormat, int>> {};

TEST_P(conv_relu_pool, matches_torch_values_and_gradients_through_relu_pool_and_dropout) {
  const auto& [size, outputs, padding, with_bias, format, threads] = GetParam();
  const testing::ThreadCount count(threads);
  at::manual_seed(5);
  const at::Tensor x = at::randn(size).contiguous(format);
  const at::Tensor weight = (at::randn({outputs, size[1], 3, 3}) * 0.2).contiguous(format);
  const at::Tensor bias = with_bias ? at::randn({outputs}) * 0.1 : at::Tensor();
  ASSERT_TRUE(detail::conv3x3_relu_max_pool2x2_applies(x, weight, bias, padding));
  const at::Tensor expected_out = at::max_pool2d(at::relu(at::conv2d(x, weight, bias, 1, padding)), 2);
  // As dropout's backward passes it: a quarter of the pooled gradient zero.
  const at::Tensor grad = at::randn(expected_out.sizes()) * (at::rand(expected_out.sizes()) > 0.25);

  const Result ours = run(true, x, weight, bias, padding, grad);
  const Result theirs = run(false, x, weight, bias, padding, grad);
  ASSERT_EQ(ours.out.sizes(), theirs.out.sizes());
  EXPECT_TRUE(close_to(ours.out, theirs.out));
  EXPECT_TRUE(close_to(ours.grad_x, theirs.grad_x));
  EXPECT_EQ(ours.grad_x.suggest_memory_format(), x.suggest_memory_format());
  EXPECT_TRUE(close_to(ours.grad_weight, theirs.grad_weight));
  EXPECT_EQ(ours.grad_weight.strides(), weight.strides());  // what the fused optimizer step needs
  if (with_bias) {
    EXPECT_TRUE(close_to(ours.grad_bias, theirs.grad_bias));
  }
  // The draw covers windows whose maximum is not positive (they pass no gradient back).
  EXPECT_GT((expected_out == 0).sum().item<std::int64_t>(), 0);

  c10::NoGradGuard no_grad;  // evaluation: the same values, nothing recorded
  EXPECT_TRUE(at::equal(detail::conv3x3_relu_max_pool2x2(x, weight, bias, padding), ours.out));
}

INSTANTIATE_TEST_SUITE_P(
    mnist_and_other_shapes, conv_relu_pool,
    ::testing::Values(
        std::make_tuple(std::vector<std::int64_t>{4, 32, 26, 26}, 64, 0, true, at::MemoryFormat::ChannelsLast, 2),
        std::make_tuple(std::vector<std::int64_t>{3, 8, 9, 11}, 12, 0, true, at::MemoryFormat::ChannelsLast, 1),
        std::make_tuple(std::vector<std::int64_t>{2, 48, 7, 8}, 80, 1, false, at::MemoryFormat::ChannelsLast, 2),
        std::make_tuple(std::vector<std::int64_t>{2, 16, 6, 5}, 9, 1, true, at::MemoryFormat::Contiguous, 1)));

// Output tiles are 4x4 from even pixels: the pooled transform sees each window whole, the edge tiles cut by the
// output's size (odd sizes: pooling drops the last row or column) included.
TEST(conv_relu_pool, pooling_in_the_output_transform_gives_the_unfused_values_and_winners_bit_for_bit) {
  at::manual_seed(8);
  for (const auto& [size, padding] : std::vector<std::pair<std::vector<std::int64_t>, std::int64_t>>{
           {{3, 32, 26, 26}, 0}, {{2, 8, 9, 11}, 0}, {{2, 12, 7, 8}, 1}, {{1, 16, 4, 5}, 0}}) {
    const at::Tensor x = at::randn(size).contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor weight = at::randn({20, size[1], 3, 3}) * 0.2;
    const at::Tensor bias = at::randn({20}) * 0.1;
    at::Tensor winner;
    const at::Tensor fused = detail::conv3x3_winograd_relu_max_pool(x, weight, bias, padding, &winner);
    const at::Tensor conv = detail::conv3x3_winograd(x, weight, bias, padding);
    EXPECT_TRUE(at::equal(fused, detail::relu_max_pool2x2(conv)));
    // The winners, as the values' positions: gathering the convolution's output at them gives the pooled values.
    const std::int64_t ph = conv.size(2) / 2, pw = conv.size(3) / 2;
    const at::Tensor windows = conv.narrow(2, 0, 2 * ph)
                                   .narrow(3, 0, 2 * pw)
                                   .reshape({size[0], 20, ph, 2, pw, 2})
                                   .permute({0, 2, 4, 1, 3, 5})
                                   .reshape({size[0], ph, pw, 20, 4});
    const at::Tensor kept = winner < 4;
    const at::Tensor picked = windows.gather(4, winner.clamp_max(3).to(at::kLong).unsqueeze(4)).squeeze(4);
    EXPECT_TRUE(at::equal(picked.masked_fill(kept.logical_not(), 0), fused.permute({0, 2, 3, 1})));
    EXPECT_TRUE(at::equal(kept, fused.permute({0, 2, 3, 1}) > 0));
  }
}

TEST(conv_relu_pool, gradients_do_not_depend_on_the_thread_count) {
  at::manual_seed(6);
  const at::Tensor x = at::randn({6, 32, 14, 14}).contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor weight = (at::randn({24, 32, 3, 3}) * 0.2).contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor bias = at::randn({24}) * 0.1;
  const at::Tensor grad = at::randn({6, 24, 6, 6});
  Result one, two;
  {
    const testing::ThreadCount count(1);
    one = run(true, x, weight, bias, 0, grad);
  }
  {
    const testing::ThreadCount count(2);
    two = run(true, x, weight, bias, 0, grad);
  }
  EXPECT_TRUE(at::equal(one.grad_x, two.grad_x));
  EXPECT_TRUE(at::equal(one.grad_weight, two.grad_weight));
  EXPECT_TRUE(at::equal(one.grad_bias, two.grad_bias));
}

TEST(conv_relu_pool, other_channel_counts_precisions_and_maps_take_the_unfused_layers) {
  const at::Tensor weight = at::randn({8, 16, 3, 3});
  EXPECT_TRUE(detail::conv3x3_relu_max_pool2x2_applies(at::randn({2, 16, 4, 4}), weight, {}, 0));
  EXPECT_FALSE(detail::conv3x3_relu_max_pool2x2_applies(at::randn({2, 16, 3, 3}), weight, {}, 0));  // 1x1 output
  EXPECT_FALSE(detail::conv3x3_relu_max_pool2x2_applies(at::randn({2, 16, 4, 4}).to(at::kBFloat16), weight, {}, 0));
  const at::Tensor odd_weight = at::randn({8, 12, 3, 3});
  const at::Tensor odd_x = at::randn({2, 12, 8, 8});
  EXPECT_FALSE(detail::conv3x3_relu_max_pool2x2_applies(odd_x, odd_weight, {}, 0));  // 12 channels
  // Still the same values and gradients, through the unfused layers.
  const at::Tensor grad = at::randn({2, 8, 3, 3});
  const Result ours = run(true, odd_x, odd_weight, {}, 0, grad);
  const Result theirs = run(false, odd_x, odd_weight, {}, 0, grad);
  EXPECT_TRUE(close_to(ours.out, theirs.out));
  EXPECT_TRUE(close_to(ours.grad_x, theirs.grad_x));
  EXPECT_TRUE(close_to(ours.grad_weight, theirs.grad_weight));
}

}  // namespace
}  // namespace kiln
