// kiln's optimizers: Adadelta (Zeiler 2012, the template's; LibTorch's C++ API has none), SGD with
// momentum and Nesterov, and AdamW. Each update and its state_dict layout are torch.optim's
// (Adadelta, SGD, AdamW with their defaults otherwise), so a checkpoint's optimizer state also loads
// there. CPU float32 parameters take one fused pass over memory per parameter.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

#include <string>
#include <vector>

namespace kiln {

enum class Algorithm { adadelta, sgd, adamw };

// The field order keeps Adadelta's brace form: {lr, rho, eps, weight_decay}.
struct OptimizerOptions {
  double lr = 1.0;
  double rho = 0.9;    // Adadelta's running-average decay
  double eps = 1e-6;   // Adadelta's 1e-6; AdamW's default is 1e-8 (optimizer_options sets it)
  double weight_decay = 0.0;  // Adadelta, SGD: L2 added to the gradient; AdamW: decoupled decay
  Algorithm algorithm = Algorithm::adadelta;
  double momentum = 0.0;  // SGD (dampening 0)
  bool nesterov = false;  // SGD; needs momentum > 0
  double beta1 = 0.9;     // AdamW
  double beta2 = 0.999;
};

// Options for optimizer `name` ("adadelta", "sgd" or "adamw") with torch.optim's defaults for the
// rest; kiln::DataError for an unknown name or nesterov without momentum.
OptimizerOptions optimizer_options(const std::string& name, double lr, double weight_decay = 0.0,
                                   double momentum = 0.0, bool nesterov = false);
std::string algorithm_name(Algorithm algorithm);

class Optimizer {
 public:
  Optimizer(std::vector<at::Tensor> params, OptimizerOptions options);

  // Gradients are set to None (undefined), as torch.optim's zero_grad does by default.
  void zero_grad();
  // One update of every parameter that has a gradient (frozen parameters have none). CPU float32
  // parameters (or masters) take a fused single-pass kernel; others (CUDA, other dtypes) the same
  // update in tensor ops.
  void step();

  // Mixed precision: while parameter i's tensor holds a bfloat16 working copy of its weights, the
  // update runs on `master` (float32, its former storage) and rewrites the copy from it, rounded as
  // a cast rounds: the model computes with what autocast would cast the weights to, cast once per
  // step instead of on every forward pass. Gradients may then be bfloat16. An undefined `master` ends it.
  void set_master(std::size_t i, at::Tensor master);

  double lr() const { return options_.lr; }
  void set_lr(double lr) { options_.lr = lr; }
  const OptimizerOptions& options() const { return options_; }

  // torch.optim's layout: {"state": {index: {"step", and "square_avg", "acc_delta" (Adadelta) |
  // "momentum_buffer" (SGD with momentum) | "exp_avg", "exp_avg_sq" (AdamW)}}, "param_groups": [{the
  // hyperparameters, "params": [indices]}]}
  c10::IValue state_dict() const;
  // Throws kiln::DataError if the state is another optimizer's or does not fit these parameters.
  void load_state_dict(const c10::IValue& state);

 private:
  std::vector<at::Tensor> params_;
  std::vector<at::Tensor> masters_;  // per parameter: its float32 master while it holds a bf16 copy
  // Per parameter: Adadelta's square_avg and acc_delta, SGD's momentum buffer (first), AdamW's
  // exp_avg and exp_avg_sq.
  std::vector<at::Tensor> first_;
  std::vector<at::Tensor> second_;
  std::vector<double> steps_;
  OptimizerOptions options_;
};

// The template's optimizer under its own name (the trainer's default; kiln._core.Adadelta).
using Adadelta = Optimizer;
using AdadeltaOptions = OptimizerOptions;

}  // namespace kiln
