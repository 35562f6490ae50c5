#include "kiln/checkpoint.hpp"

#include <c10/core/GradMode.h>

#include "kiln/detail/tensor_file.hpp"
#include "kiln/error.hpp"

namespace kiln {

c10::IValue calibration_to_ivalue(const Int8Calibration& calibration) {
  c10::impl::GenericDict dict(c10::StringType::get(), c10::AnyType::get());
  dict.insert("activation_max", detail::plain_list(calibration.activation_max));
  dict.insert("images", calibration.images);
  return dict;
}

c10::impl::GenericDict read_checkpoint(const std::filesystem::path& path) {
  if (!std::filesystem::exists(path)) throw NotFoundError("checkpoint '" + path.string() + "' does not exist");
  const c10::IValue value = detail::load_ivalue(path);
  if (!value.isGenericDict()) throw_data_error("'" + path.string() + "' is not a kiln checkpoint (not a dict)");
  auto checkpoint = value.toGenericDict();
  const c10::IValue format_key(std::string("format"));
  if (!checkpoint.contains(format_key) || !checkpoint.at(format_key).isString() ||
      checkpoint.at(format_key).toStringRef() != kCheckpointFormat) {
    throw_data_error("'" + path.string() + "' is not a kiln checkpoint (no format: kiln-checkpoint)");
  }
  const auto version = checkpoint.at("format_version").toInt();
  if (version > kCheckpointFormatVersion) {
    throw_data_error("checkpoint '" + path.string() + "' has format version " + std::to_string(version) +
                     ", newer than this kiln reads; upgrade kiln");
  }
  return checkpoint;
}

CheckpointModel checkpoint_model(const c10::impl::GenericDict& checkpoint, const std::filesystem::path& path) {
  try {
    CheckpointModel result;
    const auto model = checkpoint.at("model").toGenericDict();
    result.spec.name = model.at("name").toStringRef();
    result.spec.in_channels = static_cast<int>(model.at("in_channels").toInt());
    result.spec.num_classes = static_cast<int>(model.at("num_classes").toInt());
    result.spec.height = static_cast<int>(model.at("height").toInt());
    result.spec.width = static_cast<int>(model.at("width").toInt());
    result.state_dict = model.at("state_dict");
    for (const auto& name : checkpoint.at("classes").toListRef()) result.classes.push_back(name.toStringRef());
    const auto normalization = checkpoint.at("normalization").toGenericDict();
    for (const auto& v : normalization.at("mean").toListRef()) result.mean.push_back(v.toDouble());
    for (const auto& v : normalization.at("std").toListRef()) result.std.push_back(v.toDouble());
    result.epoch = checkpoint.at("epoch").toInt();
    if (checkpoint.contains("int8_calibration")) {
      const auto calibration = checkpoint.at("int8_calibration").toGenericDict();
      for (const auto& v : calibration.at("activation_max").toListRef()) {
        result.calibration.activation_max.push_back(v.toDouble());
      }
      result.calibration.images = calibration.at("images").toInt();
    }
    if (static_cast<int>(result.classes.size()) != result.spec.num_classes ||
        static_cast<int>(result.mean.size()) != result.spec.in_channels || result.std.size() != result.mean.size()) {
      throw_data_error("checkpoint '" + path.string() +
                       "' is inconsistent (classes or normalisation do not fit the model)");
    }
    return result;
  } catch (const c10::Error& error) {
    throw_data_error("checkpoint '" + path.string() + "' is incomplete: " + error.what_without_backtrace());
  }
}

c10::IValue module_state_dict(const torch::nn::Module& module) {
  c10::impl::GenericDict state(c10::StringType::get(), c10::AnyType::get());
  for (const auto& item : module.named_parameters()) state.insert(item.key(), item.value().detach().cpu().contiguous());
  for (const auto& item : module.named_buffers()) state.insert(item.key(), item.value().detach().cpu().contiguous());
  return state;
}

void load_module_state_dict(torch::nn::Module& module, const c10::IValue& value, const std::string& source) {
  const auto state = value.toGenericDict();
  c10::NoGradGuard no_grad;
  auto copy_in = [&](const std::string& name, at::Tensor& target) {
    const c10::IValue key(name);
    if (!state.contains(key) || !state.at(key).isTensor()) {
      throw_data_error(source + " has no tensor '" + name + "' for this model");
    }
    const at::Tensor tensor = state.at(key).toTensor();
    if (tensor.sizes() != target.sizes()) {
      throw_data_error(source + ": '" + name + "' has shape " + c10::str(tensor.sizes()) + ", the model expects " +
                       c10::str(target.sizes()));
    }
    target.copy_(tensor);
  };
  for (auto& item : module.named_parameters()) copy_in(item.key(), item.value());
  for (auto& item : module.named_buffers()) copy_in(item.key(), item.value());
}

}  // namespace kiln
