#include "kiln/pretrained.hpp"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <map>
#include <set>

#include "kiln/error.hpp"

namespace kiln {
namespace {

using TensorMap = std::map<std::string, at::Tensor>;

TensorMap tensors_of(const c10::IValue& state, const std::string& source) {
  if (!state.isGenericDict()) throw_data_error(source + ": expected a state dict (a dict of name -> tensor)");
  TensorMap tensors;
  for (const auto& item : state.toGenericDict()) {
    if (!item.key().isString()) throw_data_error(source + ": a state dict's keys are names (str)");
    const std::string& name = item.key().toStringRef();
    if (!item.value().isTensor()) throw_data_error(source + ": '" + name + "' is not a tensor");
    tensors.emplace(name, item.value().toTensor());
  }
  return tensors;
}

// The model's parameters and buffers by name, in registration order.
std::vector<std::pair<std::string, at::Tensor>> model_tensors(torch::nn::Module& model) {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (auto& item : model.named_parameters()) tensors.emplace_back(item.key(), item.value());
  for (auto& item : model.named_buffers()) tensors.emplace_back(item.key(), item.value());
  return tensors;
}

std::string listed(const std::vector<std::string>& names) {
  std::string text;
  const std::size_t shown = std::min<std::size_t>(names.size(), 5);
  for (std::size_t i = 0; i < shown; ++i) text += (i ? ", '" : "'") + names[i] + "'";
  if (names.size() > shown) text += " and " + std::to_string(names.size() - shown) + " more";
  return text;
}

void check_convertible(const std::string& source, const std::string& name, const at::Tensor& from,
                       const at::Tensor& to) {
  if (from.scalar_type() != to.scalar_type() && !(from.is_floating_point() && to.is_floating_point())) {
    throw_data_error(source + ": '" + name + "' is a " + c10::toString(from.scalar_type()) +
                     " tensor, the model expects " + c10::toString(to.scalar_type()));
  }
}

// Missing / unexpected names, for the error message.
void require_same_names(const std::vector<std::string>& missing, const std::vector<std::string>& unexpected,
                        const std::string& source, const std::string& model_name) {
  if (missing.empty() && unexpected.empty()) return;
  std::string message = source + " does not fit " + model_name + ":";
  if (!missing.empty()) message += " missing " + listed(missing) + ";";
  if (!unexpected.empty()) message += " unexpected " + listed(unexpected) + ";";
  message += " is it a state dict of the same architecture (torchvision's names)?";
  throw_data_error(message);
}

// timm's adapt_input_conv: RGB stem weights for `channels` input channels.
at::Tensor adapt_stem(const at::Tensor& weight, std::int64_t channels) {
  if (channels == 1) return weight.sum(1, /*keepdim=*/true);
  const std::int64_t repeats = (channels + weight.size(1) - 1) / weight.size(1);
  return weight.repeat({1, repeats, 1, 1}).slice(1, 0, channels) * (static_cast<double>(weight.size(1)) / channels);
}

}  // namespace

void load_state_dict_strict(torch::nn::Module& model, const c10::IValue& state, const std::string& source) {
  const TensorMap given = tensors_of(state, source);
  auto targets = model_tensors(model);
  std::vector<std::string> missing, unexpected;
  std::set<std::string> known;
  for (const auto& [name, tensor] : targets) {
    known.insert(name);
    const auto found = given.find(name);
    if (found == given.end()) {
      missing.push_back(name);
      continue;
    }
    if (found->second.sizes() != tensor.sizes()) {
      throw_data_error(source + ": '" + name + "' has shape " + c10::str(found->second.sizes()) +
                       ", the model expects " + c10::str(tensor.sizes()));
    }
    check_convertible(source, name, found->second, tensor);
  }
  for (const auto& [name, tensor] : given) {
    if (!known.count(name)) unexpected.push_back(name);
  }
  require_same_names(missing, unexpected, source, "the model");
  c10::NoGradGuard no_grad;
  for (auto& [name, tensor] : targets) tensor.copy_(given.at(name));
}

PretrainedLoad load_pretrained(Classifier& model, const ModelSpec& spec, const c10::IValue& state,
                               const std::string& source) {
  const TensorMap given = tensors_of(state, source);
  auto targets = model_tensors(model);
  const auto parameters = model.named_parameters();
  // The head: the model's last Linear, registered last (weight, bias).
  const std::string head_weight = parameters.size() >= 2 ? parameters.keys()[parameters.size() - 2] : "";
  const std::string head_bias = parameters.size() >= 2 ? parameters.keys()[parameters.size() - 1] : "";
  // The stem: the first parameter, a conv weight [out, in, k, k].
  const std::string stem = parameters.is_empty() ? "" : parameters.keys().front();

  PretrainedLoad load;
  std::vector<std::string> missing, unexpected;
  std::set<std::string> known;
  std::map<std::string, at::Tensor> values;
  for (const auto& [name, target] : targets) {
    known.insert(name);
    const auto found = given.find(name);
    if (found == given.end()) {
      const bool batch_count = name.size() > 20 && name.compare(name.size() - 20, 20, ".num_batches_tracked") == 0;
      if (!batch_count) missing.push_back(name);
      continue;
    }
    at::Tensor value = found->second;
    check_convertible(source, name, value, target);
    if (value.sizes() != target.sizes()) {
      const bool head = (name == head_weight || name == head_bias) && value.dim() == target.dim() &&
                        value.sizes().slice(1) == target.sizes().slice(1);
      const bool stem_channels = name == stem && value.dim() == 4 && value.size(0) == target.size(0) &&
                                 value.sizes().slice(2) == target.sizes().slice(2);
      if (head) {
        if (name == head_weight) {
          load.adaptations.push_back("the classifier head ('" + head_weight + "', '" + head_bias +
                                     "') is new: the weights have " + std::to_string(value.size(0)) +
                                     " classes, the data " + std::to_string(target.size(0)));
        }
        continue;
      }
      if (stem_channels) {
        value = adapt_stem(value.to(at::kFloat), target.size(1));
        load.adaptations.push_back("the stem '" + name + "' takes " + std::to_string(target.size(1)) +
                                   " input channel(s): its " + std::to_string(found->second.size(1)) +
                                   "-channel weights were " + (target.size(1) == 1 ? "summed" : "repeated and scaled") +
                                   " over the channels");
      } else {
        throw_data_error(source + ": '" + name + "' has shape " + c10::str(value.sizes()) + ", " + spec.name +
                         " expects " + c10::str(target.sizes()));
      }
    }
    values.emplace(name, value);
  }
  for (const auto& [name, tensor] : given) {
    if (!known.count(name)) unexpected.push_back(name);
  }
  require_same_names(missing, unexpected, source, spec.name);
  c10::NoGradGuard no_grad;
  for (auto& [name, target] : targets) {
    const auto value = values.find(name);
    if (value != values.end()) target.copy_(value->second);
    else if (target.scalar_type() == at::kLong) target.zero_();  // num_batches_tracked
  }
  return load;
}

}  // namespace kiln
