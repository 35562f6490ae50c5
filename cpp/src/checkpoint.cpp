#include "kiln/checkpoint.hpp"

#include <c10/core/GradMode.h>

#include "kiln/detail/tensor_file.hpp"
#include "kiln/error.hpp"
#include "kiln/precision.hpp"

namespace kiln {
namespace {

using Dict = c10::impl::GenericDict;

Dict string_dict() {
  return Dict(c10::StringType::get(), c10::AnyType::get());
}

c10::IValue metrics_to_ivalue(const EpochMetrics& m) {
  Dict dict = string_dict();
  dict.insert("epoch", m.epoch);
  dict.insert("train_loss", m.train_loss);
  dict.insert("train_accuracy", m.train_accuracy);
  dict.insert("test_loss", m.test_loss);
  dict.insert("test_accuracy", m.test_accuracy);
  dict.insert("learning_rate", m.learning_rate);
  dict.insert("seconds", m.seconds);
  return dict;
}

EpochMetrics metrics_from_ivalue(const c10::IValue& value) {
  const auto dict = value.toGenericDict();
  EpochMetrics m;
  m.epoch = dict.at("epoch").toInt();
  m.train_loss = dict.at("train_loss").toDouble();
  m.train_accuracy = dict.at("train_accuracy").toDouble();
  m.test_loss = dict.at("test_loss").toDouble();
  m.test_accuracy = dict.at("test_accuracy").toDouble();
  m.learning_rate = dict.at("learning_rate").toDouble();
  m.seconds = dict.at("seconds").toDouble();
  return m;
}

c10::IValue calibration_to_ivalue(const Int8Calibration& calibration) {
  Dict dict = string_dict();
  dict.insert("activation_max", detail::plain_list(calibration.activation_max));
  dict.insert("images", calibration.images);
  return dict;
}

}  // namespace

void write_checkpoint(const std::filesystem::path& path, TrainingState state) {
  CheckpointModel& saved = state.model;
  Dict model = string_dict();
  model.insert("name", saved.spec.name);
  model.insert("in_channels", static_cast<std::int64_t>(saved.spec.in_channels));
  model.insert("num_classes", static_cast<std::int64_t>(saved.spec.num_classes));
  model.insert("height", static_cast<std::int64_t>(saved.spec.height));
  model.insert("width", static_cast<std::int64_t>(saved.spec.width));
  model.insert("state_dict", std::move(saved.state_dict));

  Dict normalization = string_dict();
  normalization.insert("mean", detail::plain_list(saved.mean));
  normalization.insert("std", detail::plain_list(saved.std));

  // torch.optim.lr_scheduler.StepLR(step_size=1)'s state_dict.
  Dict scheduler = string_dict();
  scheduler.insert("step_size", std::int64_t{1});
  scheduler.insert("gamma", state.gamma);
  scheduler.insert("base_lrs", detail::plain_list(std::vector<double>{state.base_lr}));
  scheduler.insert("last_epoch", saved.epoch);
  scheduler.insert("_last_lr", detail::plain_list(std::vector<double>{state.lr}));

  Dict rng = string_dict();
  rng.insert("torch_cpu", std::move(state.torch_cpu_rng));
  rng.insert("dropout_seed", static_cast<std::int64_t>(state.dropout_seed));
  rng.insert("dropout_offset", static_cast<std::int64_t>(state.dropout_offset));
  if (state.torch_device_rng.defined()) rng.insert("torch_device", std::move(state.torch_device_rng));
  rng.insert("shuffle", std::move(state.shuffle_rng));

  c10::impl::GenericList history(c10::AnyType::get());
  for (const auto& m : state.history) history.push_back(metrics_to_ivalue(m));

  const TrainerOptions& o = state.options;
  Dict options = string_dict();
  options.insert("lr", o.lr);
  options.insert("train_batch_size", o.train_batch_size);
  options.insert("test_batch_size", o.test_batch_size);
  options.insert("seed", static_cast<std::int64_t>(o.seed));
  options.insert("precision", to_string(o.precision));
  options.insert("device", o.device);

  Dict checkpoint = string_dict();
  checkpoint.insert("format", std::string(kCheckpointFormat));
  checkpoint.insert("format_version", static_cast<std::int64_t>(kCheckpointFormatVersion));
  checkpoint.insert("kiln_version", std::string(KILN_VERSION));
  checkpoint.insert("model", model);
  checkpoint.insert("classes", detail::plain_list(saved.classes));
  checkpoint.insert("normalization", normalization);
  checkpoint.insert("optimizer", std::move(state.optimizer));
  checkpoint.insert("scheduler", scheduler);
  checkpoint.insert("epoch", saved.epoch);
  checkpoint.insert("history", history);
  checkpoint.insert("rng", rng);
  checkpoint.insert("options", options);
  if (!saved.calibration.activation_max.empty()) {
    checkpoint.insert("int8_calibration", calibration_to_ivalue(saved.calibration));
  }
  detail::save_ivalue(path, checkpoint);
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

TrainingState read_training_state(const c10::impl::GenericDict& checkpoint, const std::filesystem::path& path) {
  TrainingState state;
  state.model = checkpoint_model(checkpoint, path);
  try {
    state.optimizer = checkpoint.at("optimizer");
    const auto scheduler = checkpoint.at("scheduler").toGenericDict();
    state.base_lr = scheduler.at("base_lrs").toListRef().at(0).toDouble();
    state.gamma = scheduler.at("gamma").toDouble();
    state.lr = scheduler.at("_last_lr").toListRef().at(0).toDouble();
    for (const auto& item : checkpoint.at("history").toListRef()) state.history.push_back(metrics_from_ivalue(item));
    const auto rng = checkpoint.at("rng").toGenericDict();
    state.torch_cpu_rng = rng.at("torch_cpu").toTensor();
    if (rng.contains("torch_device")) state.torch_device_rng = rng.at("torch_device").toTensor();
    state.shuffle_rng = rng.at("shuffle").toTensor();
    state.dropout_seed = static_cast<std::uint64_t>(rng.at("dropout_seed").toInt());
    state.dropout_offset = static_cast<std::uint64_t>(rng.at("dropout_offset").toInt());
  } catch (const c10::Error& error) {
    throw_data_error("checkpoint '" + path.string() + "' is incomplete: " + error.what_without_backtrace());
  }
  return state;
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
