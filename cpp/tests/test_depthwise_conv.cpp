#include "kiln/detail/depthwise_conv.hpp"

#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <c10/core/GradMode.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "kernel_testing.hpp"

namespace kiln {
namespace {

// kiln's weight gradient sums in another order than oneDNN's: close_to, within 1e-5 of the largest value.
using testing::close_to;
using testing::ThreadCount;

struct Conv {
  std::vector<std::int64_t> size;  // x: N, C, H, W
  std::int64_t kernel, stride, dilation;
};

// (convolution, x's memory format): 3x3 and 5x5 kernels with strides 1 and 2 (padding (k - 1) / 2 * dilation, as
// torchvision's blocks pad) on maps smaller than the kernel (2x2 and 4x4 under 5x5: most taps read the padding),
// larger ones (16x16, odd 9x11 whose last stride-2 column reads past the edge), a dilated 3x3, a 7x7 (a width
// kiln's loop does not unroll) and 40x40 maps, which kiln sums one image at a time (an image and its gradient take
// over half its 1 MiB chunk); 40 channels are two full blocks of 16 and a half one, 5 a narrower block alone.
class depthwise_conv : public ::testing::TestWithParam<std::tuple<Conv, at::MemoryFormat>> {};

TEST_P(depthwise_conv, output_and_input_gradient_are_conv2d_s_and_weight_gradient_within_rounding) {
  const auto& [conv, format] = GetParam();
  const ThreadCount one_thread(1);
  at::manual_seed(3);
  const std::int64_t channels = conv.size[1], padding = (conv.kernel - 1) / 2 * conv.dilation;
  const std::vector<std::int64_t> stride{conv.stride, conv.stride}, pad{padding, padding},
      dilation{conv.dilation, conv.dilation};
  const at::Tensor x = at::randn(conv.size).contiguous(format);
  const at::Tensor weight = at::randn({channels, 1, conv.kernel, conv.kernel}).contiguous(format);
  at::Tensor x_ours = x.clone().set_requires_grad(true), w_ours = weight.clone().set_requires_grad(true);
  at::Tensor x_theirs = x.clone().set_requires_grad(true), w_theirs = weight.clone().set_requires_grad(true);
  const at::Tensor out = detail::depthwise_conv(x_ours, w_ours, stride, pad, dilation);
  const at::Tensor expected = at::conv2d(x_theirs, w_theirs, {}, stride, pad, dilation, channels);
  ASSERT_TRUE(at::equal(out, expected));
  EXPECT_EQ(out.strides(), expected.strides());
  const at::Tensor grad = at::randn(expected.sizes()).contiguous(format);
  out.backward(grad);
  expected.backward(grad);
  EXPECT_TRUE(at::equal(x_ours.grad(), x_theirs.grad()));
  EXPECT_TRUE(close_to(w_ours.grad(), w_theirs.grad()))
      << "largest difference " << (w_ours.grad() - w_theirs.grad()).abs().max().item<double>() << " of "
      << w_theirs.grad().abs().max().item<double>();
  EXPECT_EQ(w_ours.grad().strides(), w_ours.strides());
  c10::NoGradGuard no_grad;  // evaluation: the same values, nothing recorded
  EXPECT_TRUE(at::equal(detail::depthwise_conv(x, weight, stride, pad, dilation), out.detach()));
}

INSTANTIATE_TEST_SUITE_P(
    shapes_and_layouts, depthwise_conv,
    ::testing::Combine(::testing::Values(Conv{{4, 40, 2, 2}, 5, 1, 1}, Conv{{3, 40, 4, 4}, 5, 1, 1},
                                         Conv{{3, 40, 4, 4}, 5, 2, 1}, Conv{{2, 5, 16, 16}, 3, 1, 1},
                                         Conv{{2, 40, 16, 16}, 3, 2, 1}, Conv{{2, 5, 9, 11}, 5, 2, 1},
                                         Conv{{2, 40, 8, 8}, 3, 1, 2}, Conv{{2, 40, 6, 9}, 7, 2, 1},
                                         Conv{{3, 48, 40, 40}, 3, 1, 1}),
                       ::testing::Values(at::MemoryFormat::Contiguous, at::MemoryFormat::ChannelsLast)));

// The threads share out (channel block, tap row) pairs and never add up parts of one weight's sum: the same
// weight gradient, to the bit, with one and two threads, for 5x5 taps on small maps and 3x3 taps on maps large
// enough to be summed an image at a time.
TEST(depthwise_conv_threads, give_the_same_weight_gradient_bits_with_one_and_two_threads) {
  at::manual_seed(4);
  for (const auto& [size, kernel, stride] : {std::tuple{std::vector<std::int64_t>{8, 72, 6, 6}, 5, 2},
                                             std::tuple{std::vector<std::int64_t>{3, 48, 40, 40}, 3, 1}}) {
    const std::int64_t padding = kernel / 2;
    const at::Tensor x = at::randn(size).contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor weight = at::randn({size[1], 1, kernel, kernel});
    const at::Tensor out = at::conv2d(x, weight, {}, stride, padding, 1, size[1]);
    const at::Tensor grad = at::randn(out.sizes()).contiguous(at::MemoryFormat::ChannelsLast);
    std::vector<at::Tensor> weight_grads;
    for (const int threads : {1, 2}) {
      const ThreadCount count(threads);
      const at::Tensor w = weight.clone().set_requires_grad(true);
      detail::depthwise_conv(x, w, {stride, stride}, {padding, padding}, {1, 1}).backward(grad);
      weight_grads.push_back(w.grad());
    }
    EXPECT_TRUE(at::equal(weight_grads[0], weight_grads[1])) << "kernel " << kernel;
  }
}

TEST(depthwise_conv_fallback, other_dtypes_autocast_and_grouped_convolutions_take_torch_s_convolution) {
  at::manual_seed(6);
  const at::Tensor x = at::randn({2, 8, 6, 6}), weight = at::randn({8, 1, 3, 3});
  const at::Tensor expected = at::conv2d(x, weight, {}, 1, 1, 1, 8);
  EXPECT_TRUE(detail::depthwise_conv_applies(x, weight, 8));
  EXPECT_FALSE(detail::depthwise_conv_applies(x, at::randn({4, 2, 3, 3}), 4));  // two channels a filter
  const at::Tensor bf16 = detail::depthwise_conv(x.to(at::kBFloat16), weight.to(at::kBFloat16), {1, 1}, {1, 1}, {1, 1});
  EXPECT_EQ(bf16.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::allclose(bf16.to(at::kFloat), expected, 0.1, 0.5));
  at::autocast::set_autocast_enabled(at::kCPU, true);
  EXPECT_FALSE(detail::depthwise_conv_applies(x, weight, 8));
  const at::Tensor autocast = detail::depthwise_conv(x, weight, {1, 1}, {1, 1}, {1, 1});
  at::autocast::set_autocast_enabled(at::kCPU, false);
  at::autocast::clear_cache();
  EXPECT_EQ(autocast.scalar_type(), at::kBFloat16);  // autocast's own conv2d ran
}

}  // namespace
}  // namespace kiln
