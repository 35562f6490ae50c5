#include "kiln/optimizer.hpp"

#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <string>

#include "kiln/error.hpp"

namespace kiln {
namespace {

TEST(adadelta, fused_cpu_step_matches_the_tensor_op_update) {
  at::manual_seed(0);
  at::Tensor fused = at::randn({1000}).set_requires_grad(true);
  at::Tensor reference = fused.detach().clone().to(at::kDouble).set_requires_grad(true);  // takes the op path
  Adadelta fused_optimizer({fused}, {1.3, 0.9, 1e-6, 0.01});
  Adadelta reference_optimizer({reference}, {1.3, 0.9, 1e-6, 0.01});
  for (int step = 0; step < 20; ++step) {
    const at::Tensor grad = at::randn({1000});
    fused.mutable_grad() = grad.clone();
    reference.mutable_grad() = grad.to(at::kDouble);
    fused_optimizer.step();
    reference_optimizer.step();
  }
  EXPECT_TRUE(at::allclose(fused.detach().to(at::kDouble), reference.detach(), 1e-5, 1e-6));
  const auto state = fused_optimizer.state_dict().toGenericDict().at("state").toGenericDict();
  EXPECT_EQ(state.at(0).toGenericDict().at("step").toTensor().item<double>(), 20.0);
}

TEST(adadelta, running_averages_that_decay_below_float_range_become_zero_not_denormal) {
  // A weight whose gradient is tiny once and then zero (an input behind a dead ReLU): its running averages decay by
  // rho every step, into the denormal range after ~20 steps here, where every multiply is ~100x slower on x86. The
  // fused step flushes them to zero instead, and computes the same weights (a denormal average is below eps).
  at::Tensor fused = at::ones({1000}).set_requires_grad(true);
  at::Tensor reference = fused.detach().clone().to(at::kDouble).set_requires_grad(true);  // takes the op path
  Adadelta fused_optimizer({fused}, {1.3});
  Adadelta reference_optimizer({reference}, {1.3});
  for (int step = 0; step < 40; ++step) {
    const at::Tensor grad = at::full({1000}, step == 0 ? 1e-18 : 0.0);
    fused.mutable_grad() = grad.to(at::kFloat);
    reference.mutable_grad() = grad;
    fused_optimizer.step();
    reference_optimizer.step();
  }
  EXPECT_TRUE(at::allclose(fused.detach().to(at::kDouble), reference.detach()));
  const auto state = fused_optimizer.state_dict().toGenericDict().at("state").toGenericDict().at(0).toGenericDict();
  for (const char* name : {"square_avg", "acc_delta"}) {
    const at::Tensor average = state.at(name).toTensor();
    const at::Tensor denormal = (average != 0) & (average.abs() < std::numeric_limits<float>::min());
    EXPECT_EQ(denormal.sum().item<std::int64_t>(), 0) << name << " holds denormals, e.g. " << average[0].item<float>();
  }
  // The caller's floating-point mode is left as it was: float arithmetic here still makes denormals.
  volatile float smallest_normal = std::numeric_limits<float>::min();
  EXPECT_GT(smallest_normal / 2.0f, 0.0f);
}

TEST(adadelta, bf16_working_copy_is_the_float32_update_rounded) {
  // Mixed precision as the trainer sets it up: the parameter's data swapped for a bf16 copy, its
  // float32 storage kept as the master. The master takes exactly the float32 update of the (bf16)
  // gradient, in the fused kernel, and the bf16 tensor is what casting the master gives.
  at::manual_seed(1);
  const at::Tensor initial = at::randn({64, 300}).t();  // transposed strides, as fc1 stores its weight
  at::Tensor plain = initial.clone().set_requires_grad(true);
  at::Tensor working = initial.clone().set_requires_grad(true);
  Adadelta plain_optimizer({plain}, {1.3});
  Adadelta mixed_optimizer({working}, {1.3});
  const at::Tensor master = working.detach();
  working.set_data(master.to(at::kBFloat16));
  mixed_optimizer.set_master(0, master);
  ASSERT_EQ(working.strides(), master.strides());
  for (int step = 0; step < 10; ++step) {
    const at::Tensor grad = at::randn({64, 300}).t().to(at::kBFloat16);  // the layout backward gives
    plain.mutable_grad() = grad.to(at::kFloat);
    working.mutable_grad() = grad;
    plain_optimizer.step();
    mixed_optimizer.step();
  }
  EXPECT_TRUE(at::equal(master, plain.detach())) << (master - plain.detach()).abs().max().item<float>();
  EXPECT_TRUE(at::equal(working.detach(), plain.detach().to(at::kBFloat16)));
  mixed_optimizer.set_master(0, at::Tensor());
  working.set_data(master);  // as the trainer ends an epoch
  EXPECT_EQ(working.scalar_type(), at::kFloat);
}

class optimizer_algorithm : public ::testing::TestWithParam<std::string> {};

TEST_P(optimizer_algorithm, fused_cpu_step_matches_the_tensor_op_update) {
  at::manual_seed(2);
  at::Tensor fused = at::randn({1000}).set_requires_grad(true);
  at::Tensor reference = fused.detach().clone().to(at::kDouble).set_requires_grad(true);  // takes the op path
  const OptimizerOptions options = optimizer_options(GetParam(), 0.01, 0.05, 0.9, GetParam() == "sgd");
  Optimizer fused_optimizer({fused}, options);
  Optimizer reference_optimizer({reference}, options);
  for (int step = 0; step < 20; ++step) {
    const at::Tensor grad = at::randn({1000});
    fused.mutable_grad() = grad.clone();
    reference.mutable_grad() = grad.to(at::kDouble);
    fused_optimizer.step();
    reference_optimizer.step();
  }
  EXPECT_TRUE(at::allclose(fused.detach().to(at::kDouble), reference.detach(), 1e-5, 1e-6));
}

TEST_P(optimizer_algorithm, state_dict_round_trips_and_refuses_another_optimizers_state) {
  at::manual_seed(3);
  at::Tensor param = at::randn({10}).set_requires_grad(true);
  Optimizer optimizer({param}, optimizer_options(GetParam(), 0.01));
  param.mutable_grad() = at::randn({10});
  optimizer.step();
  Optimizer restored({param}, optimizer_options(GetParam(), 0.5));
  restored.load_state_dict(optimizer.state_dict());
  EXPECT_EQ(restored.lr(), 0.01);
  const std::string other = GetParam() == "adamw" ? "sgd" : "adamw";
  Optimizer mismatched({param}, optimizer_options(other, 0.01));
  try {
    mismatched.load_state_dict(optimizer.state_dict());
    FAIL() << "loaded " << GetParam() << "'s state into " << other;
  } catch (const DataError& error) {
    EXPECT_NE(std::string(error.what()).find("the optimizer state is " + GetParam() + "'s"), std::string::npos)
        << error.what();
  }
}

INSTANTIATE_TEST_SUITE_P(all, optimizer_algorithm, ::testing::Values("adadelta", "sgd", "adamw"),
                         [](const auto& info) { return info.param; });

TEST(optimizer, unknown_names_and_nesterov_without_momentum_are_data_errors) {
  EXPECT_THROW(optimizer_options("adam", 0.1), DataError);
  EXPECT_THROW(optimizer_options("sgd", 0.1, 0.0, 0.0, /*nesterov=*/true), DataError);
}

}  // namespace
}  // namespace kiln
