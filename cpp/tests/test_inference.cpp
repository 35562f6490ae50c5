#include "kiln/detail/inference.hpp"

#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <utility>
#include <vector>

namespace kiln {
namespace {

class inference_slice : public ::testing::TestWithParam<std::pair<std::int64_t, std::int64_t>> {};

TEST_P(inference_slice, on_the_cpu_is_the_fewest_even_slices_of_at_most_64) {
  const auto& [count, slice] = GetParam();
  EXPECT_EQ(detail::inference_slice_size(count, c10::Device(c10::kCPU)), slice);
}

// (batch, slice): 100 -> 50 + 50, 1000 -> 15 x 63 + 55.
INSTANTIATE_TEST_SUITE_P(batch_sizes, inference_slice,
                         ::testing::Values(std::pair{0, 1}, std::pair{1, 1}, std::pair{64, 64}, std::pair{65, 33},
                                           std::pair{100, 50}, std::pair{256, 64}, std::pair{1000, 63}));

TEST(inference_slice, elsewhere_is_the_whole_batch) {
  EXPECT_EQ(detail::inference_slice_size(1000, c10::Device(c10::kCUDA, 0)), 1000);
}

TEST(forward_in_slices, gives_the_whole_batch_s_float_logits_in_order) {
  at::manual_seed(5);
  const at::Tensor input = at::randn({150, 7});
  const at::Tensor weight = at::randn({7, 3});
  std::vector<std::int64_t> slices;
  const at::Tensor logits =
      detail::forward_in_slices(input, 3, c10::Device(c10::kCPU), [&](const at::Tensor& slice) {
        slices.push_back(slice.size(0));
        return at::matmul(slice, weight).to(at::kBFloat16);
      });
  EXPECT_EQ(slices, (std::vector<std::int64_t>{50, 50, 50}));
  EXPECT_EQ(logits.scalar_type(), at::kFloat);
  EXPECT_TRUE(at::equal(logits, at::matmul(input, weight).to(at::kBFloat16).to(at::kFloat)));
  const at::Tensor none = detail::forward_in_slices(input.slice(0, 0, 0), 3, c10::Device(c10::kCPU),
                                                    [](const at::Tensor& slice) { return slice; });
  EXPECT_EQ(none.sizes(), (std::vector<std::int64_t>{0, 3}));
}

TEST(inference, channels_last_preparation_keeps_the_model_s_function) {
  at::manual_seed(3);
  const auto model = make_model({"mnist_cnn", 1, 10, 28, 28});
  model->eval();
  c10::NoGradGuard no_grad;
  const at::Tensor x = at::randn({4, 1, 28, 28});
  const at::Tensor before = model->forward(x);
  detail::prepare_for_inference(*model, /*bf16=*/false, /*channels_last=*/true);
  const at::Tensor after = model->forward(x.contiguous(at::MemoryFormat::ChannelsLast));
  EXPECT_TRUE(at::allclose(after, before, 1e-4, 1e-5)) << (after - before).abs().max().item<float>();
}

TEST(inference, copy_computes_what_the_model_does_and_leaves_it_and_torch_s_generator_alone) {
  at::manual_seed(6);
  const ModelSpec spec{"mnist_cnn", 1, 10, 28, 28};
  const auto model = make_model(spec);
  model->eval();
  c10::NoGradGuard no_grad;
  const at::Tensor x = at::randn({3, 1, 28, 28});
  const at::Tensor expected = model->forward(x);
  at::manual_seed(7);
  const at::Tensor expected_draw = at::randn({3});
  at::manual_seed(7);
  const auto copy = detail::inference_copy(*model, spec, /*bf16=*/false, /*channels_last=*/true);
  EXPECT_TRUE(at::equal(at::randn({3}), expected_draw));
  const at::Tensor actual = copy->forward(x.contiguous(at::MemoryFormat::ChannelsLast));
  EXPECT_TRUE(at::allclose(actual, expected, 1e-4, 1e-5)) << (actual - expected).abs().max().item<float>();
  EXPECT_TRUE(at::equal(model->forward(x), expected));  // the original is not re-laid out
}

}  // namespace
}  // namespace kiln
