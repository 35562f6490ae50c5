// Adadelta (Zeiler 2012), the template's optimizer; LibTorch's C++ API has none. The update and the
// state_dict layout are torch.optim.Adadelta's, so a checkpoint's optimizer state also loads there.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

#include <vector>

namespace kiln {

struct AdadeltaOptions {
  double lr = 1.0;
  double rho = 0.9;
  double eps = 1e-6;
  double weight_decay = 0.0;
};

class Adadelta {
 public:
  Adadelta(std::vector<at::Tensor> params, AdadeltaOptions options);

  // Gradients are set to None (undefined), as torch.optim's zero_grad does by default.
  void zero_grad();
  // One update of every parameter that has a gradient. CPU float32 parameters (or masters) take a
  // fused single-pass kernel; others (CUDA, other dtypes) the same update in tensor ops.
  void step();

  // Mixed precision: while parameter i's tensor holds a bfloat16 working copy of its weights, the
  // update runs on `master` (float32, its former storage) and rewrites the copy from it, rounded as
  // a cast rounds: the model computes with what autocast would cast the weights to, cast once per
  // step instead of on every forward pass. Gradients may then be bfloat16. An undefined `master` ends it.
  void set_master(std::size_t i, at::Tensor master);

  double lr() const { return options_.lr; }
  void set_lr(double lr) { options_.lr = lr; }
  const AdadeltaOptions& options() const { return options_; }

  // {"state": {index: {"step", "square_avg", "acc_delta"}}, "param_groups": [{"lr", "rho", "eps",
  // "weight_decay", "params": [indices], ...}]}
  c10::IValue state_dict() const;
  // Throws kiln::DataError if the state does not fit these parameters.
  void load_state_dict(const c10::IValue& state);

 private:
  std::vector<at::Tensor> params_;
  std::vector<at::Tensor> masters_;  // per parameter: its float32 master while it holds a bf16 copy
  std::vector<at::Tensor> square_avg_;
  std::vector<at::Tensor> acc_delta_;
  std::vector<double> steps_;
  AdadeltaOptions options_;
};

}  // namespace kiln
