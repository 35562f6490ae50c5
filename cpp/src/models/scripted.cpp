#include "kiln/scripted_model.hpp"

#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/script.h>

#include <map>
#include <mutex>
#include <sstream>

#include "kiln/error.hpp"
#include "kiln/model.hpp"

namespace kiln {
namespace {

std::mutex registry_mutex;
std::map<std::string, std::string>& registry() {
  static std::map<std::string, std::string> archives;
  return archives;
}

// Mirrors a TorchScript module's parameters and buffers as torch::nn::Module ones (the same tensors,
// so the optimizer's updates, .to() and set_data reach the scripted code).
void mirror(torch::nn::Module& into, const torch::jit::Module& from) {
  for (const auto& item : from.named_parameters(/*recurse=*/false)) {
    into.register_parameter(item.name, item.value, item.value.requires_grad());
  }
  for (const auto& item : from.named_buffers(/*recurse=*/false)) into.register_buffer(item.name, item.value);
  for (const auto& child : from.named_children()) {
    auto sub = std::make_shared<torch::nn::Module>();
    mirror(*sub, child.value);
    into.register_module(child.name, sub);
  }
}

class ScriptedClassifier : public Classifier {
 public:
  explicit ScriptedClassifier(torch::jit::Module module)
      : module_(std::move(module)), forward_(module_.get_method("forward")) {
    mirror(*this, module_);
  }

  torch::Tensor forward(const torch::Tensor& input) override {
    // The module's graph runs as written, op by op, with eager autograd and eager autocast: as the
    // nn.Module runs in PyTorch. TorchScript's optimising executor profiles the first calls, then
    // swaps eager autograd for its own gradient formulas (ReLU's backward as gt + mul, dropout's as
    // a mask multiply, more copies) and guards on the profiled dtypes and shapes, which bf16 working
    // weights and an epoch's shorter last batch change. Measured (bench/custom_model.py's models, 28 px,
    // one thread, images/s vs the nn.Module in eager PyTorch): optimised 0.79-0.85x, as written 1.05-1.14x;
    // inference equal within noise. The flag is thread-local and restored on return.
    torch::jit::GraphOptimizerEnabledGuard as_written(false);
    return forward_({input}).toTensor();
  }

  void train(bool on = true) override {
    module_.train(on);
    torch::nn::Module::train(on);
  }

 private:
  torch::jit::Module module_;
  torch::jit::Method forward_;  // looked up once, not by name on every batch
};

}  // namespace

bool is_scripted_model_name(const std::string& name) {
  return name.rfind("python:", 0) == 0;
}

void register_scripted_model(const std::string& name, std::string archive) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry()[name] = std::move(archive);
}

std::optional<std::string> scripted_model_archive(const std::string& name) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  const auto found = registry().find(name);
  if (found == registry().end()) return std::nullopt;
  return found->second;
}

std::shared_ptr<Classifier> make_scripted_model(const std::string& name) {
  const auto archive = scripted_model_archive(name);
  if (!archive) {
    throw_data_error("model '" + name +
                     "' comes from Python and its TorchScript was not given (train it through "
                     "kiln.training or python src/train_model.py, which script it)");
  }
  std::istringstream stream(*archive);
  torch::jit::Module module;
  try {
    module = torch::jit::load(stream, torch::kCPU);
  } catch (const c10::Error& error) {
    throw_data_error("model '" + name +
                     "': its TorchScript archive does not load: " + error.msg().substr(0, error.msg().find('\n')));
  }
  return std::make_shared<ScriptedClassifier>(std::move(module));
}

}  // namespace kiln
