#include "kiln/detail/sparse_linear.hpp"

#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <cstdint>
#include <tuple>

#include "kernel_testing.hpp"

namespace kiln {
namespace {

using testing::close_to;

// x with `density` of its values nonzero (ReLU'd and dropped out, as mnist_cnn's fc1 sees it).
at::Tensor sparse_input(std::int64_t n, std::int64_t size, double density) {
  return at::randn({n, size}).abs() * (at::rand({n, size}) < density);
}

// The weight as mnist_cnn stores fc1's: [O, K] with strides (1, O).
at::Tensor transposed_weight(std::int64_t outputs, std::int64_t size) {
  return (at::randn({outputs, size}) * 0.05).t().contiguous().t();
}

struct Result {
  at::Tensor out, grad_x, grad_weight, grad_bias;
};

Result run(bool ours, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& grad) {
  at::Tensor xg = x.clone().set_requires_grad(true);
  at::Tensor wg = weight.clone().set_requires_grad(true);  // clone keeps the strides
  at::Tensor bg = bias.clone().set_requires_grad(true);
  const at::Tensor out = ours ? detail::sparse_input_linear(xg, wg, bg) : at::linear(xg, wg, bg);
  out.backward(grad);
  return {out.detach(), xg.grad(), wg.grad(), bg.grad()};
}

// (samples, inputs, outputs, density, threads): mnist_cnn's fc1 (9216 -> 128) sparse as in training and dense as at
// its start (at::linear's products), more inputs than one pass of 2048 weight rows reads and a count that is not a
// multiple of 8, and 72 outputs (a block of 64 columns and one of 8).
class sparse_input_linear
    : public ::testing::TestWithParam<std::tuple<std::int64_t, std::int64_t, std::int64_t, double, int>> {};

TEST_P(sparse_input_linear, matches_torch_values_and_gradients) {
  const auto& [n, size, outputs, density, threads] = GetParam();
  const testing::ThreadCount count(threads);
  at::manual_seed(11);
  const at::Tensor x = sparse_input(n, size, density);
  const at::Tensor weight = transposed_weight(outputs, size);
  const at::Tensor bias = at::randn({outputs}) * 0.1;
  ASSERT_TRUE(detail::sparse_input_linear_applies(x, weight, bias));
  const at::Tensor grad = at::randn({n, outputs});
  const Result ours = run(true, x, weight, bias, grad);
  const Result theirs = run(false, x, weight, bias, grad);
  EXPECT_TRUE(close_to(ours.out, theirs.out));
  EXPECT_TRUE(close_to(ours.grad_x, theirs.grad_x));
  EXPECT_TRUE(close_to(ours.grad_weight, theirs.grad_weight));
  EXPECT_EQ(ours.grad_weight.strides(), weight.strides());  // what the fused optimizer step needs
  EXPECT_TRUE(close_to(ours.grad_bias, theirs.grad_bias));

  c10::NoGradGuard no_grad;  // evaluation: the same values, nothing recorded
  EXPECT_TRUE(at::equal(detail::sparse_input_linear(x, weight, bias), ours.out));
}

INSTANTIATE_TEST_SUITE_P(densities_and_shapes, sparse_input_linear,
                         ::testing::Values(std::make_tuple(32, 9216, 128, 0.12, 2),
                                           std::make_tuple(32, 9216, 128, 0.7, 2), std::make_tuple(5, 5003, 72, 0.2, 1),
                                           std::make_tuple(7, 100, 8, 0.05, 2), std::make_tuple(3, 64, 16, 0.0, 1)));

TEST(sparse_input_linear, values_do_not_depend_on_the_thread_count) {
  at::manual_seed(12);
  const at::Tensor x = sparse_input(16, 4099, 0.15);
  const at::Tensor weight = transposed_weight(136, 4099);
  const at::Tensor bias = at::randn({136});
  const at::Tensor grad = at::randn({16, 136});
  Result one, two;
  {
    const testing::ThreadCount count(1);
    one = run(true, x, weight, bias, grad);
  }
  {
    const testing::ThreadCount count(2);
    two = run(true, x, weight, bias, grad);
  }
  EXPECT_TRUE(at::equal(one.out, two.out));
}

TEST(sparse_input_linear, other_layouts_and_precisions_take_at_linear) {
  const at::Tensor x = sparse_input(4, 64, 0.1);
  EXPECT_TRUE(detail::sparse_input_linear_applies(x, transposed_weight(16, 64), {}));
  EXPECT_FALSE(detail::sparse_input_linear_applies(x, at::randn({16, 64}), {}));           // not stored transposed
  EXPECT_FALSE(detail::sparse_input_linear_applies(x, transposed_weight(12, 64), {}));     // 12 outputs
  EXPECT_FALSE(detail::sparse_input_linear_applies(x.t(), transposed_weight(16, 4), {}));  // x not contiguous
  EXPECT_FALSE(detail::sparse_input_linear_applies(x.to(at::kBFloat16), transposed_weight(16, 64), {}));
  // Still at::linear's values.
  const at::Tensor weight = at::randn({12, 64});
  EXPECT_TRUE(at::equal(detail::sparse_input_linear(x, weight, {}), at::linear(x, weight, {})));
}

}  // namespace
}  // namespace kiln
