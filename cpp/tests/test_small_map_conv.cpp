#include "kiln/detail/small_map_conv.hpp"

#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/GradMode.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "kernel_testing.hpp"

namespace kiln {
namespace {

// The pixel pairs' products add in another order than a direct sum: close_to, within 1e-5 of the largest value
// (measured: 1.8e-6 for the outputs of 512 channels on 2x2 maps).
using testing::close_to;

// (input size, kernel, padding, input and weight layout, threads): resnet18's layer4 at 64 px in small (2x2 under 3x3),
// a 1x1 map (the centre tap alone: layer4 at 32 px), a 1x3 map, a 3x3 map under a 5x5 kernel with padding 2,
// and a 2x3 map under a 2x4 kernel (3x2 outputs). With padding 0 no map smaller than the kernel has an output.
class small_map_conv
    : public ::testing::TestWithParam<
          std::tuple<std::vector<std::int64_t>, std::vector<std::int64_t>, std::int64_t, at::MemoryFormat, int>> {};

TEST_P(small_map_conv, matches_torch_values_and_both_gradients) {
  const auto& [size, kernel, padding, format, threads] = GetParam();
  const testing::ThreadCount count(threads);
  at::manual_seed(3);
  const at::Tensor x = at::randn(size).contiguous(format);
  // The weight in the input's layout: a channels-last one's taps are read (and its gradient written) in place.
  const at::Tensor weight = (at::randn({12, size[1], kernel[0], kernel[1]}) * 0.1).contiguous(format);
  ASSERT_TRUE(detail::small_map_conv_applies(x, weight, padding));

  at::Tensor x_ours = x.clone().set_requires_grad(true), w_ours = weight.clone().set_requires_grad(true);
  at::Tensor x_theirs = x.clone().set_requires_grad(true), w_theirs = weight.clone().set_requires_grad(true);
  const at::Tensor out = detail::small_map_conv(x_ours, w_ours, padding);
  const at::Tensor expected = at::conv2d(x_theirs, w_theirs, {}, 1, padding);
  ASSERT_EQ(out.sizes(), expected.sizes());
  EXPECT_EQ(out.suggest_memory_format(), x.suggest_memory_format());
  EXPECT_TRUE(close_to(out, expected));
  const at::Tensor grad = at::randn(expected.sizes());
  out.backward(grad);
  expected.backward(grad);
  EXPECT_TRUE(close_to(x_ours.grad(), x_theirs.grad()));
  EXPECT_EQ(x_ours.grad().suggest_memory_format(), x.suggest_memory_format());
  EXPECT_TRUE(close_to(w_ours.grad(), w_theirs.grad()));
  EXPECT_EQ(w_ours.grad().strides(), w_ours.strides());  // what the fused optimizer step needs

  c10::NoGradGuard no_grad;  // evaluation: the same values, nothing recorded
  EXPECT_TRUE(at::equal(detail::small_map_conv(x, weight, padding), out.detach()));
}

INSTANTIATE_TEST_SUITE_P(
    maps_kernels_and_layouts, small_map_conv,
    ::testing::Values(std::make_tuple(std::vector<std::int64_t>{4, 16, 2, 2}, std::vector<std::int64_t>{3, 3}, 1,
                                      at::MemoryFormat::Contiguous, 1),
                      std::make_tuple(std::vector<std::int64_t>{4, 16, 2, 2}, std::vector<std::int64_t>{3, 3}, 1,
                                      at::MemoryFormat::ChannelsLast, 2),
                      std::make_tuple(std::vector<std::int64_t>{3, 8, 1, 1}, std::vector<std::int64_t>{3, 3}, 1,
                                      at::MemoryFormat::Contiguous, 2),
                      std::make_tuple(std::vector<std::int64_t>{2, 5, 1, 3}, std::vector<std::int64_t>{3, 3}, 1,
                                      at::MemoryFormat::ChannelsLast, 1),
                      std::make_tuple(std::vector<std::int64_t>{3, 6, 3, 3}, std::vector<std::int64_t>{5, 5}, 2,
                                      at::MemoryFormat::Contiguous, 2),
                      std::make_tuple(std::vector<std::int64_t>{2, 7, 2, 3}, std::vector<std::int64_t>{2, 4}, 1,
                                      at::MemoryFormat::ChannelsLast, 1)));

TEST(small_map_conv, a_map_as_large_as_the_kernel_or_another_precision_takes_oneDNN) {
  const at::Tensor weight = at::randn({8, 4, 3, 3});
  EXPECT_TRUE(detail::small_map_conv_applies(at::randn({2, 4, 2, 4}), weight, 1));   // 8 pixels
  EXPECT_FALSE(detail::small_map_conv_applies(at::randn({2, 4, 3, 3}), weight, 1));  // 9
  EXPECT_FALSE(detail::small_map_conv_applies(at::randn({2, 4, 2, 2}).to(at::kBFloat16), weight, 1));
  EXPECT_FALSE(detail::small_map_conv_applies(at::randn({0, 4, 2, 2}), weight, 1));
  EXPECT_FALSE(detail::small_map_conv_applies(at::randn({2, 4, 1, 1}), weight, 0));  // no output pixel
  at::autocast::set_autocast_enabled(at::kCPU, true);
  const bool under_autocast = detail::small_map_conv_applies(at::randn({2, 4, 2, 2}), weight, 1);
  at::autocast::set_autocast_enabled(at::kCPU, false);
  EXPECT_FALSE(under_autocast);
  // Where it does not apply, the same call is at::conv2d's.
  const at::Tensor x = at::randn({2, 4, 5, 5});
  EXPECT_TRUE(at::equal(detail::small_map_conv(x, weight, 1), at::conv2d(x, weight, {}, 1, 1)));
}

}  // namespace
}  // namespace kiln
