#include "kiln/optimizer.hpp"

#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/GradMode.h>
#include <c10/util/irange.h>

#include <cmath>

#include "kiln/detail/tensor_file.hpp"
#include "kiln/error.hpp"

namespace kiln {
namespace {

// All of Adadelta's update in one pass over memory, instead of the ~10 passes of the tensor-op form:
// torch.optim.Adadelta's single-tensor arithmetic order, and with a bf16 working copy, the updated
// weight written there too.
template <typename Grad, bool Copy>
[[gnu::always_inline]] inline void step_range(float* param, const Grad* grad, float* square_avg,
                                              float* acc_delta, at::BFloat16* copy, std::int64_t begin,
                                              std::int64_t end, const AdadeltaOptions& options) {
  const float rho = static_cast<float>(options.rho);
  const float one_minus_rho = static_cast<float>(1.0 - options.rho);
  const float eps = static_cast<float>(options.eps);
  const float lr = static_cast<float>(options.lr);
  const float weight_decay = static_cast<float>(options.weight_decay);
  for (std::int64_t i = begin; i < end; ++i) {
    float g = static_cast<float>(grad[i]);
    if (weight_decay != 0.0f) g += weight_decay * param[i];
    const float avg = square_avg[i] * rho + one_minus_rho * g * g;
    square_avg[i] = avg;
    const float std = std::sqrt(avg + eps);
    const float delta = std::sqrt(acc_delta[i] + eps) / std * g;
    acc_delta[i] = acc_delta[i] * rho + one_minus_rho * delta * delta;
    const float updated = param[i] - lr * delta;
    param[i] = updated;
    if constexpr (Copy) copy[i] = at::BFloat16(updated);
  }
}

// One instance per supported combination, each compiled for AVX-512, AVX2 and a baseline and picked
// at load time for this CPU; -fno-math-errno (CMakeLists.txt) lets sqrt vectorise. They are called
// per chunk from inside the parallel loop, so the loop itself is in the cloned code.
#define KILN_STEP_VARIANT(name, Grad, Copy)                                                                  \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void name(                \
      float* param, const Grad* grad, float* square_avg, float* acc_delta, at::BFloat16* copy,               \
      std::int64_t begin, std::int64_t end, const AdadeltaOptions& options) {                                \
    step_range<Grad, Copy>(param, grad, square_avg, acc_delta, copy, begin, end, options);                  \
  }
KILN_STEP_VARIANT(step_f32, float, false)
KILN_STEP_VARIANT(step_bf16_copy, at::BFloat16, true)
#undef KILN_STEP_VARIANT

// The fused kernel for this gradient, or false (then the tensor-op form runs).
bool fused_step_cpu(at::Tensor& master, const at::Tensor& grad, at::Tensor& square_avg, at::Tensor& acc_delta,
                    const at::Tensor& copy, const AdadeltaOptions& options) {
  // Dense tensors with identical strides hold element k of each at the same memory offset, whatever
  // the layout (channels-last, transposed): the update can run over raw memory.
  const auto same_layout = [&](const at::Tensor& t) {
    return t.device().is_cpu() && t.is_non_overlapping_and_dense() && t.strides() == master.strides();
  };
  if (master.scalar_type() != at::kFloat || !same_layout(master) || !same_layout(square_avg) ||
      !same_layout(acc_delta) || !same_layout(grad)) {
    return false;
  }
  float* param = master.data_ptr<float>();
  float* avg = square_avg.data_ptr<float>();
  float* delta = acc_delta.data_ptr<float>();
  // bf16 gradients come with a bf16 working copy, float32 ones without: what training produces.
  if (!copy.defined() && grad.scalar_type() == at::kFloat) {
    const float* g = grad.const_data_ptr<float>();
    at::parallel_for(0, master.numel(), 32768, [&](std::int64_t begin, std::int64_t end) {
      step_f32(param, g, avg, delta, nullptr, begin, end, options);
    });
    return true;
  }
  if (copy.defined() && grad.scalar_type() == at::kBFloat16 && copy.scalar_type() == at::kBFloat16 &&
      same_layout(copy)) {
    const at::BFloat16* g = grad.const_data_ptr<at::BFloat16>();
    at::BFloat16* out = copy.data_ptr<at::BFloat16>();
    at::parallel_for(0, master.numel(), 32768, [&](std::int64_t begin, std::int64_t end) {
      step_bf16_copy(param, g, avg, delta, out, begin, end, options);
    });
    return true;
  }
  return false;
}

void tensor_step(at::Tensor& param, at::Tensor grad, at::Tensor& square_avg, at::Tensor& acc_delta,
                 const AdadeltaOptions& options) {
  if (options.weight_decay != 0.0) grad = grad.add(param, options.weight_decay);
  square_avg.mul_(options.rho).addcmul_(grad, grad, 1.0 - options.rho);
  const at::Tensor std = square_avg.add(options.eps).sqrt_();
  at::Tensor delta = acc_delta.add(options.eps).sqrt_();
  delta.div_(std).mul_(grad);
  acc_delta.mul_(options.rho).addcmul_(delta, delta, 1.0 - options.rho);
  param.add_(delta, -options.lr);
}

}  // namespace

Adadelta::Adadelta(std::vector<at::Tensor> params, AdadeltaOptions options)
    : params_(std::move(params)), masters_(params_.size()), steps_(params_.size(), 0.0), options_(options) {
  for (const auto& param : params_) {
    // Same memory format as the parameter (channels-last conv weights stay channels-last).
    square_avg_.push_back(at::zeros_like(param));
    acc_delta_.push_back(at::zeros_like(param));
  }
}

void Adadelta::zero_grad() {
  for (auto& param : params_) param.mutable_grad().reset();
}

void Adadelta::step() {
  c10::NoGradGuard no_grad;
  for (const auto i : c10::irange(params_.size())) {
    const at::Tensor& grad = params_[i].grad();
    if (!grad.defined()) continue;
    steps_[i] += 1.0;
    const bool has_master = masters_[i].defined();
    at::Tensor& master = has_master ? masters_[i] : params_[i];
    const at::Tensor copy = has_master ? params_[i] : at::Tensor();
    if (fused_step_cpu(master, grad, square_avg_[i], acc_delta_[i], copy, options_)) continue;
    tensor_step(master, grad.to(master.scalar_type()), square_avg_[i], acc_delta_[i], options_);
    if (has_master) params_[i].copy_(master);
  }
}

void Adadelta::set_master(std::size_t i, at::Tensor master) {
  masters_.at(i) = std::move(master);
}

c10::IValue Adadelta::state_dict() const {
  c10::impl::GenericDict state(c10::IntType::get(), c10::AnyType::get());
  std::vector<std::int64_t> indices;
  for (const auto i : c10::irange(params_.size())) {
    indices.push_back(static_cast<std::int64_t>(i));
    if (steps_[i] == 0.0) continue;  // torch.optim has no state for parameters never stepped
    c10::impl::GenericDict entry(c10::StringType::get(), c10::AnyType::get());
    entry.insert("step", at::scalar_tensor(steps_[i], at::kFloat));
    entry.insert("square_avg", square_avg_[i].cpu().contiguous());
    entry.insert("acc_delta", acc_delta_[i].cpu().contiguous());
    state.insert(static_cast<std::int64_t>(i), entry);
  }
  c10::impl::GenericDict group(c10::StringType::get(), c10::AnyType::get());
  group.insert("lr", options_.lr);
  group.insert("rho", options_.rho);
  group.insert("eps", options_.eps);
  group.insert("weight_decay", options_.weight_decay);
  group.insert("foreach", c10::IValue());
  group.insert("capturable", false);
  group.insert("maximize", false);
  group.insert("differentiable", false);
  group.insert("params", detail::plain_list(indices));
  c10::impl::GenericList groups(c10::AnyType::get());
  groups.push_back(group);
  c10::impl::GenericDict result(c10::StringType::get(), c10::AnyType::get());
  result.insert("state", state);
  result.insert("param_groups", groups);
  return result;
}

void Adadelta::load_state_dict(const c10::IValue& value) {
  try {
    const auto dict = value.toGenericDict();
    const auto groups = dict.at("param_groups").toList();
    if (groups.size() != 1)
      throw_data_error("expected one optimizer param group, got " + std::to_string(groups.size()));
    const auto group = groups.get(0).toGenericDict();
    options_.lr = group.at("lr").toDouble();
    options_.rho = group.at("rho").toDouble();
    options_.eps = group.at("eps").toDouble();
    options_.weight_decay = group.at("weight_decay").toDouble();
    const auto state = dict.at("state").toGenericDict();
    for (const auto i : c10::irange(params_.size())) {
      const c10::IValue key(static_cast<std::int64_t>(i));
      if (!state.contains(key)) {
        steps_[i] = 0.0;
        square_avg_[i].zero_();
        acc_delta_[i].zero_();
        continue;
      }
      const auto entry = state.at(key).toGenericDict();
      const at::Tensor square_avg = entry.at("square_avg").toTensor();
      const at::Tensor acc_delta = entry.at("acc_delta").toTensor();
      if (square_avg.sizes() != params_[i].sizes() || acc_delta.sizes() != params_[i].sizes()) {
        throw_data_error("optimizer state of parameter " + std::to_string(i) + " has the wrong shape");
      }
      steps_[i] = entry.at("step").toTensor().item<double>();
      square_avg_[i].copy_(square_avg);
      acc_delta_[i].copy_(acc_delta);
    }
  } catch (const c10::Error& error) {
    throw_data_error(std::string("optimizer state is not an Adadelta state_dict: ") + error.what_without_backtrace());
  }
}

}  // namespace kiln
