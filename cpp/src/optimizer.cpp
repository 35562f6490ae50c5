#include "kiln/optimizer.hpp"

#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/GradMode.h>
#include <c10/util/irange.h>

#include <cmath>
#include <utility>

#if defined(__x86_64__) || defined(__SSE2__)
#include <xmmintrin.h>
#endif

#include "kiln/detail/isa_dispatch.hpp"
#include "kiln/detail/tensor_file.hpp"
#include "kiln/error.hpp"

namespace kiln {
namespace {

// What one step of one parameter computes with, besides the per-element state.
struct StepScalars {
  float lr = 0, rho = 0, eps = 0, weight_decay = 0;
  float momentum = 0;
  bool nesterov = false;
  bool first_step = false;  // SGD: the momentum buffer starts as the gradient
  float beta1 = 0, beta2 = 0;
  float step_size = 0;              // AdamW: lr / (1 - beta1^t)
  float bias_correction2_sqrt = 1;  // AdamW: sqrt(1 - beta2^t)
};

StepScalars scalars_of(const OptimizerOptions& o, double step) {
  StepScalars s;
  s.lr = static_cast<float>(o.lr);
  s.rho = static_cast<float>(o.rho);
  s.eps = static_cast<float>(o.eps);
  s.weight_decay = static_cast<float>(o.weight_decay);
  s.momentum = static_cast<float>(o.momentum);
  s.nesterov = o.nesterov;
  s.first_step = step == 1.0;
  s.beta1 = static_cast<float>(o.beta1);
  s.beta2 = static_cast<float>(o.beta2);
  s.step_size = static_cast<float>(o.lr / (1.0 - std::pow(o.beta1, step)));
  s.bias_correction2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(o.beta2, step)));
  return s;
}

// One element's update in torch.optim's single-tensor arithmetic order; returns the new weight.
template <Algorithm A>
[[gnu::always_inline]] inline float update(float param, float g, float& first, float& second, const StepScalars& s) {
  if constexpr (A == Algorithm::adadelta) {
    if (s.weight_decay != 0.0f) g += s.weight_decay * param;
    const float avg = second * s.rho + (1.0f - s.rho) * g * g;
    second = avg;
    const float std = std::sqrt(avg + s.eps);
    const float delta = std::sqrt(first + s.eps) / std * g;
    first = first * s.rho + (1.0f - s.rho) * delta * delta;
    return param - s.lr * delta;
  } else if constexpr (A == Algorithm::sgd) {
    if (s.weight_decay != 0.0f) g += s.weight_decay * param;
    if (s.momentum != 0.0f) {
      const float buffer = s.first_step ? g : first * s.momentum + g;
      first = buffer;
      g = s.nesterov ? g + s.momentum * buffer : buffer;
    }
    return param - s.lr * g;
  } else {
    param *= 1.0f - s.lr * s.weight_decay;
    first = first + (1.0f - s.beta1) * (g - first);
    second = second * s.beta2 + (1.0f - s.beta2) * g * g;
    const float denom = std::sqrt(second) / s.bias_correction2_sqrt + s.eps;
    return param - s.step_size * (first / denom);
  }
}

// All of an update in one pass over memory, instead of the ~10 passes of the tensor-op form; with a
// bf16 working copy, the updated weight written there too.
// The scalars are copied first: read through the reference, they could alias the arrays written, so the compiler
// reloaded them per element and left the loop scalar (measured: Adadelta's step over mnist_cnn's 1.2M weights
// was 11% of an AVX2 training epoch).
template <Algorithm A, typename Grad, bool Copy>
[[gnu::always_inline]] inline void step_range(float* __restrict param, const Grad* __restrict grad,
                                              float* __restrict first, float* __restrict second,
                                              at::BFloat16* __restrict copy, std::int64_t begin, std::int64_t end,
                                              const StepScalars& scalars) {
  const StepScalars s = scalars;
  for (std::int64_t i = begin; i < end; ++i) {
    const float updated = update<A>(param[i], static_cast<float>(grad[i]), first[i], second[i], s);
    param[i] = updated;
    if constexpr (Copy) copy[i] = at::BFloat16(updated);
  }
}

// One instance per supported combination, on x86-64 each compiled for AVX-512, AVX2 and a baseline and
// picked at load time for this CPU (KILN_ISA_VARIANTS); -fno-math-errno (CMakeLists.txt) lets sqrt vectorise. They are
// called per chunk from inside the parallel loop, so the loop itself is in the cloned code.
#define KILN_STEP_VARIANT(name, A, Grad, Copy)                                                        \
  KILN_ISA_VARIANTS(void, name,                                                                       \
                    (float* param, const Grad* grad, float* first, float* second, at::BFloat16* copy, \
                     std::int64_t begin, std::int64_t end, const StepScalars& s),                     \
                    (step_range<A, Grad, Copy>(param, grad, first, second, copy, begin, end, s)))
KILN_STEP_VARIANT(adadelta_f32, Algorithm::adadelta, float, false)
KILN_STEP_VARIANT(adadelta_bf16_copy, Algorithm::adadelta, at::BFloat16, true)
KILN_STEP_VARIANT(sgd_f32, Algorithm::sgd, float, false)
KILN_STEP_VARIANT(sgd_bf16_copy, Algorithm::sgd, at::BFloat16, true)
KILN_STEP_VARIANT(adamw_f32, Algorithm::adamw, float, false)
KILN_STEP_VARIANT(adamw_bf16_copy, Algorithm::adamw, at::BFloat16, true)
#undef KILN_STEP_VARIANT

// Flush-to-zero and denormals-are-zero on this thread while in scope (x86's MXCSR bits), its mode restored after.
// Adadelta's running averages of a weight whose gradient stays zero (fc1's inputs behind dead ReLUs) decay by rho
// every step through the denormal range, where each multiply takes a microcode assist of ~100 cycles: by the
// third epoch of mnist_cnn a quarter of fc1's 1.2M averages were denormal and the epoch took twice as long. The
// updates come out the same: a denormal average is below eps (1e-6 for Adadelta, 1e-8 for AdamW's root), to which
// it is added. Other CPUs handle denormals at full speed or are left as they are.
class FlushDenormals {
 public:
#if defined(__x86_64__) || defined(__SSE2__)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFlushToZero | kDenormalsAreZero); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFlushToZero = 0x8000, kDenormalsAreZero = 0x0040;
  unsigned saved_;
#else
  FlushDenormals() {}  // user-provided: a const instance needs one
#endif
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;
};

using F32Kernel = void (*)(float*, const float*, float*, float*, at::BFloat16*, std::int64_t, std::int64_t,
                           const StepScalars&);
using Bf16Kernel = void (*)(float*, const at::BFloat16*, float*, float*, at::BFloat16*, std::int64_t, std::int64_t,
                            const StepScalars&);

// The fused kernel for this gradient, or false (then the tensor-op form runs).
bool fused_step_cpu(Algorithm algorithm, at::Tensor& master, const at::Tensor& grad, at::Tensor& first,
                    at::Tensor& second, const at::Tensor& copy, const StepScalars& s) {
  // Dense tensors with identical strides hold element k of each at the same memory offset, whatever
  // the layout (channels-last, transposed): the update can run over raw memory.
  const auto same_layout = [&](const at::Tensor& t) {
    return t.device().is_cpu() && t.is_non_overlapping_and_dense() && t.strides() == master.strides();
  };
  if (master.scalar_type() != at::kFloat || !same_layout(master) || !same_layout(first) || !same_layout(second) ||
      !same_layout(grad)) {
    return false;
  }
  float* param = master.data_ptr<float>();
  float* a = first.data_ptr<float>();
  float* b = second.data_ptr<float>();
  const F32Kernel f32 = algorithm == Algorithm::adadelta ? adadelta_f32
                        : algorithm == Algorithm::sgd    ? sgd_f32
                                                         : adamw_f32;
  const Bf16Kernel bf16 = algorithm == Algorithm::adadelta ? adadelta_bf16_copy
                          : algorithm == Algorithm::sgd    ? sgd_bf16_copy
                                                           : adamw_bf16_copy;
  // bf16 gradients come with a bf16 working copy, float32 ones without: what training produces.
  if (!copy.defined() && grad.scalar_type() == at::kFloat) {
    const float* g = grad.const_data_ptr<float>();
    at::parallel_for(0, master.numel(), 32768, [&](std::int64_t begin, std::int64_t end) {
      const FlushDenormals flush;
      f32(param, g, a, b, nullptr, begin, end, s);
    });
    return true;
  }
  if (copy.defined() && grad.scalar_type() == at::kBFloat16 && copy.scalar_type() == at::kBFloat16 &&
      same_layout(copy)) {
    const at::BFloat16* g = grad.const_data_ptr<at::BFloat16>();
    at::BFloat16* out = copy.data_ptr<at::BFloat16>();
    at::parallel_for(0, master.numel(), 32768, [&](std::int64_t begin, std::int64_t end) {
      const FlushDenormals flush;
      bf16(param, g, a, b, out, begin, end, s);
    });
    return true;
  }
  return false;
}

// torch.optim's single-tensor forms, for what the fused kernels do not take.
void tensor_step(const OptimizerOptions& o, double step, at::Tensor& param, at::Tensor grad, at::Tensor& first,
                 at::Tensor& second) {
  switch (o.algorithm) {
    case Algorithm::adadelta: {
      if (o.weight_decay != 0.0) grad = grad.add(param, o.weight_decay);
      second.mul_(o.rho).addcmul_(grad, grad, 1.0 - o.rho);
      const at::Tensor std = second.add(o.eps).sqrt_();
      at::Tensor delta = first.add(o.eps).sqrt_();
      delta.div_(std).mul_(grad);
      first.mul_(o.rho).addcmul_(delta, delta, 1.0 - o.rho);
      param.add_(delta, -o.lr);
      return;
    }
    case Algorithm::sgd: {
      if (o.weight_decay != 0.0) grad = grad.add(param, o.weight_decay);
      if (o.momentum != 0.0) {
        if (step == 1.0) {
          first.copy_(grad);
        } else {
          first.mul_(o.momentum).add_(grad);
        }
        grad = o.nesterov ? grad.add(first, o.momentum) : first;
      }
      param.add_(grad, -o.lr);
      return;
    }
    case Algorithm::adamw: {
      param.mul_(1.0 - o.lr * o.weight_decay);
      first.lerp_(grad, 1.0 - o.beta1);
      second.mul_(o.beta2).addcmul_(grad, grad, 1.0 - o.beta2);
      const double step_size = o.lr / (1.0 - std::pow(o.beta1, step));
      const double bias_correction2_sqrt = std::sqrt(1.0 - std::pow(o.beta2, step));
      const at::Tensor denom = second.sqrt().div_(bias_correction2_sqrt).add_(o.eps);
      param.addcdiv_(first, denom, -step_size);
      return;
    }
  }
}

}  // namespace

OptimizerOptions optimizer_options(const std::string& name, double lr, double weight_decay, double momentum,
                                   bool nesterov) {
  OptimizerOptions options;
  options.lr = lr;
  options.weight_decay = weight_decay;
  if (name == "adadelta") {
    options.algorithm = Algorithm::adadelta;
  } else if (name == "sgd") {
    options.algorithm = Algorithm::sgd;
    options.momentum = momentum;
    options.nesterov = nesterov;
    if (nesterov && momentum <= 0.0) throw_data_error("sgd with nesterov=true needs momentum > 0");
  } else if (name == "adamw") {
    options.algorithm = Algorithm::adamw;
    options.eps = 1e-8;
  } else {
    throw_data_error("unknown optimizer '" + name + "' (known: adadelta, sgd, adamw)");
  }
  if (lr < 0.0 || weight_decay < 0.0 || momentum < 0.0) {
    throw_data_error("the optimizer's lr, weight_decay and momentum must be >= 0");
  }
  return options;
}

std::string algorithm_name(Algorithm algorithm) {
  switch (algorithm) {
    case Algorithm::adadelta:
      return "adadelta";
    case Algorithm::sgd:
      return "sgd";
    case Algorithm::adamw:
      return "adamw";
  }
  return "?";
}

Optimizer::Optimizer(std::vector<at::Tensor> params, OptimizerOptions options)
    : params_(std::move(params)), masters_(params_.size()), steps_(params_.size(), 0.0), options_(options) {
  for (const auto& param : params_) {
    // Same memory format as the parameter (channels-last conv weights stay channels-last).
    first_.push_back(at::zeros_like(param));
    second_.push_back(at::zeros_like(param));
  }
}

void Optimizer::zero_grad() {
  for (auto& param : params_) param.mutable_grad().reset();
}

void Optimizer::step() {
  c10::NoGradGuard no_grad;
  for (const auto i : c10::irange(params_.size())) {
    const at::Tensor& grad = params_[i].grad();
    if (!grad.defined()) continue;
    steps_[i] += 1.0;
    const bool has_master = masters_[i].defined();
    at::Tensor& master = has_master ? masters_[i] : params_[i];
    const at::Tensor copy = has_master ? params_[i] : at::Tensor();
    const StepScalars scalars = scalars_of(options_, steps_[i]);
    if (fused_step_cpu(options_.algorithm, master, grad, first_[i], second_[i], copy, scalars)) continue;
    tensor_step(options_, steps_[i], master, grad.to(master.scalar_type()), first_[i], second_[i]);
    if (has_master) params_[i].copy_(master);
  }
}

void Optimizer::set_master(std::size_t i, at::Tensor master) {
  masters_.at(i) = std::move(master);
}

// The names of the two state tensors in torch.optim's layout (empty: none kept).
std::pair<const char*, const char*> state_names(const OptimizerOptions& o) {
  switch (o.algorithm) {
    case Algorithm::adadelta:
      return {"acc_delta", "square_avg"};
    case Algorithm::sgd:
      return {o.momentum != 0.0 ? "momentum_buffer" : "", ""};
    case Algorithm::adamw:
      return {"exp_avg", "exp_avg_sq"};
  }
  return {"", ""};
}

c10::IValue Optimizer::state_dict() const {
  const auto [first_name, second_name] = state_names(options_);
  c10::impl::GenericDict state(c10::IntType::get(), c10::AnyType::get());
  std::vector<std::int64_t> indices;
  for (const auto i : c10::irange(params_.size())) {
    indices.push_back(static_cast<std::int64_t>(i));
    if (steps_[i] == 0.0) continue;  // torch.optim has no state for parameters never stepped
    c10::impl::GenericDict entry(c10::StringType::get(), c10::AnyType::get());
    // SGD keeps no step count; kiln records it (torch.optim ignores extra state entries).
    entry.insert("step", at::scalar_tensor(steps_[i], at::kFloat));
    if (*first_name) entry.insert(first_name, first_[i].cpu().contiguous());
    if (*second_name) entry.insert(second_name, second_[i].cpu().contiguous());
    state.insert(static_cast<std::int64_t>(i), entry);
  }
  c10::impl::GenericDict group(c10::StringType::get(), c10::AnyType::get());
  group.insert("lr", options_.lr);
  switch (options_.algorithm) {
    case Algorithm::adadelta:
      group.insert("rho", options_.rho);
      group.insert("eps", options_.eps);
      break;
    case Algorithm::sgd:
      group.insert("momentum", options_.momentum);
      group.insert("dampening", 0.0);
      group.insert("nesterov", options_.nesterov);
      break;
    case Algorithm::adamw:
      group.insert("betas", c10::ivalue::Tuple::create({options_.beta1, options_.beta2}));
      group.insert("eps", options_.eps);
      group.insert("amsgrad", false);
      break;
  }
  group.insert("weight_decay", options_.weight_decay);
  group.insert("foreach", c10::IValue());
  group.insert("maximize", false);
  group.insert("differentiable", false);
  if (options_.algorithm != Algorithm::sgd) group.insert("capturable", false);
  group.insert("params", detail::plain_list(indices));
  c10::impl::GenericList groups(c10::AnyType::get());
  groups.push_back(group);
  c10::impl::GenericDict result(c10::StringType::get(), c10::AnyType::get());
  result.insert("state", state);
  result.insert("param_groups", groups);
  return result;
}

void Optimizer::load_state_dict(const c10::IValue& value) {
  const std::string name = algorithm_name(options_.algorithm);
  try {
    const auto dict = value.toGenericDict();
    const auto groups = dict.at("param_groups").toList();
    if (groups.size() != 1)
      throw_data_error("expected one optimizer param group, got " + std::to_string(groups.size()));
    const auto group = groups.get(0).toGenericDict();
    // Which optimizer wrote it: the hyperparameter only that one has.
    const char* marker = options_.algorithm == Algorithm::adadelta ? "rho"
                         : options_.algorithm == Algorithm::sgd    ? "momentum"
                                                                   : "betas";
    if (!group.contains(marker)) {
      const std::string saved = group.contains("rho")        ? "adadelta"
                                : group.contains("momentum") ? "sgd"
                                : group.contains("betas")    ? "adamw"
                                                             : "an unknown optimizer";
      throw_data_error("the optimizer state is " + saved + "'s, this run trains with " + name +
                       " (resume with optimizer=" + saved + ")");
    }
    options_.lr = group.at("lr").toDouble();
    options_.weight_decay = group.at("weight_decay").toDouble();
    if (options_.algorithm == Algorithm::adadelta) {
      options_.rho = group.at("rho").toDouble();
      options_.eps = group.at("eps").toDouble();
    } else if (options_.algorithm == Algorithm::sgd) {
      options_.momentum = group.at("momentum").toDouble();
      options_.nesterov = group.at("nesterov").toBool();
    } else {
      const auto betas = group.at("betas").toTupleRef().elements();
      options_.beta1 = betas.at(0).toDouble();
      options_.beta2 = betas.at(1).toDouble();
      options_.eps = group.at("eps").toDouble();
    }
    const auto [first_name, second_name] = state_names(options_);
    const auto state = dict.at("state").toGenericDict();
    for (const auto i : c10::irange(params_.size())) {
      const c10::IValue key(static_cast<std::int64_t>(i));
      if (!state.contains(key)) {
        steps_[i] = 0.0;
        first_[i].zero_();
        second_[i].zero_();
        continue;
      }
      const auto entry = state.at(key).toGenericDict();
      for (const auto& [slot, slot_name] : {std::pair{&first_[i], first_name}, std::pair{&second_[i], second_name}}) {
        if (!*slot_name) continue;
        const at::Tensor saved = entry.at(slot_name).toTensor();
        if (saved.sizes() != params_[i].sizes()) {
          throw_data_error("optimizer state of parameter " + std::to_string(i) + " has the wrong shape");
        }
        slot->copy_(saved);
      }
      steps_[i] = entry.at("step").toTensor().item<double>();
    }
  } catch (const c10::Error& error) {
    throw_data_error("optimizer state is not a " + name + " state_dict: " + error.what_without_backtrace());
  }
}

}  // namespace kiln
