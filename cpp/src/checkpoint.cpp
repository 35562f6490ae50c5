#include "kiln/checkpoint.hpp"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <libdeflate.h>

#include <algorithm>
#include <climits>
#include <functional>
#include <optional>
#include <unordered_set>

#include "kiln/detail/mnist_cnn.hpp"
#include "kiln/detail/tensor_file.hpp"
#include "kiln/detail/utf8.hpp"
#include "kiln/error.hpp"
#include "kiln/precision.hpp"
#include "kiln/scripted_model.hpp"
#include "kiln/trainer.hpp"

namespace kiln {
namespace {

using Dict = c10::impl::GenericDict;

Dict string_dict() {
  return Dict(c10::StringType::get(), c10::AnyType::get());
}

std::string where_of(const std::filesystem::path& path) {
  return "checkpoint '" + path.string() + "'";
}

// A stored value's type as Python names it, with its article: "an int", "a str".
std::string a_type(const c10::IValue& value);

std::string type_name(const c10::IValue& value) {
  if (value.isNone()) return "None";
  if (value.isBool()) return "bool";
  if (value.isInt()) return "int";
  if (value.isDouble()) return "float";
  if (value.isString()) return "str";
  if (value.isGenericDict()) return "dict";
  if (value.isList()) return "list";
  if (value.isTuple()) return "tuple";
  if (value.isTensor()) return "tensor";
  return value.tagKind();
}

std::string a_type(const c10::IValue& value) {
  const std::string name = type_name(value);
  if (name == "None") return name;
  return (name == "int" ? "an " : "a ") + name;
}

std::string key_text(const c10::IValue& key) {
  if (key.isString()) return key.toStringRef();
  if (key.isInt()) return std::to_string(key.toInt());
  return "<" + type_name(key) + ">";
}

// The typed entries of one dict in a checkpoint. A missing entry or one of the wrong type is a
// kiln::DataError naming the file and the entry's dotted path, e.g. "'model.height' is a str,
// expected an int".
class Entries {
 public:
  Entries(Dict dict, std::string prefix, const std::string& where)
      : dict_(std::move(dict)), prefix_(std::move(prefix)), where_(where) {}

  bool has(const std::string& key) const { return dict_.find(c10::IValue(key)) != dict_.end(); }
  std::vector<std::string> keys() const {
    std::vector<std::string> result;
    for (const auto& entry : dict_) result.push_back(key_text(entry.key()));
    return result;
  }

  c10::IValue value(const std::string& key) const {
    const auto found = dict_.find(c10::IValue(key));
    if (found == dict_.end()) throw_data_error(where_ + ": has no '" + name(key) + "' entry");
    return found->value();
  }
  Entries dict(const std::string& key) const {
    const c10::IValue v = value(key);
    if (!v.isGenericDict()) wrong(key, v, "a dict");
    return Entries(v.toGenericDict(), name(key), where_);
  }
  std::int64_t integer(const std::string& key) const {
    const c10::IValue v = value(key);
    if (!v.isInt()) wrong(key, v, "an int");
    return v.toInt();
  }
  // An int that sizes something: 1 or more.
  int size_entry(const std::string& key) const {
    const std::int64_t v = integer(key);
    if (v < 1 || v > INT_MAX) {
      throw_data_error(where_ + ": '" + name(key) + "' is " + std::to_string(v) + ", expected a positive int");
    }
    return static_cast<int>(v);
  }
  // An image side: 1 to kMaxCheckpointImageSide pixels.
  int side(const std::string& key) const { return side_of(value(key), name(key)); }
  // A list of `min_count` to `max_count` image sides, e.g. 'transform.center_crop': [64, 64].
  std::vector<int> sides(const std::string& key, std::size_t min_count, std::size_t max_count) const {
    const auto items = list(key);
    if (items.size() < min_count || items.size() > max_count) {
      throw_data_error(where_ + ": '" + name(key) + "' has " + std::to_string(items.size()) + " values, expected " +
                       (min_count == max_count ? std::to_string(min_count)
                                               : std::to_string(min_count) + " or " + std::to_string(max_count)));
    }
    std::vector<int> result;
    for (const auto& item : items)
      result.push_back(side_of(item, name(key) + "[" + std::to_string(result.size()) + "]"));
    return result;
  }
  bool boolean(const std::string& key) const {
    const c10::IValue v = value(key);
    if (!v.isBool()) wrong(key, v, "a bool");
    return v.toBool();
  }
  double number(const std::string& key) const { return number_of(value(key), name(key)); }
  std::string string(const std::string& key) const {
    const c10::IValue v = value(key);
    if (!v.isString()) wrong(key, v, "a str");
    return v.toStringRef();
  }
  at::Tensor tensor(const std::string& key) const {
    const c10::IValue v = value(key);
    if (!v.isTensor()) wrong(key, v, "a tensor");
    return v.toTensor();
  }
  c10::ArrayRef<c10::IValue> list(const std::string& key) const {
    const c10::IValue v = value(key);
    if (!v.isList()) wrong(key, v, "a list");
    return v.toListRef();
  }
  std::vector<double> numbers(const std::string& key) const {
    std::vector<double> result;
    for (const auto& item : list(key)) {
      result.push_back(number_of(item, name(key) + "[" + std::to_string(result.size()) + "]"));
    }
    return result;
  }
  std::vector<std::string> strings(const std::string& key) const {
    std::vector<std::string> result;
    for (const auto& item : list(key)) {
      if (!item.isString()) {
        throw_data_error(where_ + ": '" + name(key) + "[" + std::to_string(result.size()) + "]' is " + a_type(item) +
                         ", expected a str");
      }
      result.push_back(item.toStringRef());
    }
    return result;
  }
  Entries item_dict(const std::string& key, std::size_t index) const {
    const auto items = list(key);
    const std::string item_name = key + "[" + std::to_string(index) + "]";
    if (index >= items.size()) throw_data_error(where_ + ": has no '" + name(item_name) + "' entry");
    if (!items[index].isGenericDict()) {
      throw_data_error(where_ + ": '" + name(item_name) + "' is " + a_type(items[index]) + ", expected a dict");
    }
    return Entries(items[index].toGenericDict(), name(item_name), where_);
  }

 private:
  std::string name(const std::string& key) const { return prefix_.empty() ? key : prefix_ + "." + key; }
  [[noreturn]] void wrong(const std::string& key, const c10::IValue& v, const char* expected) const {
    throw_data_error(where_ + ": '" + name(key) + "' is " + a_type(v) + ", expected " + expected);
  }
  int side_of(const c10::IValue& v, const std::string& full_name) const {
    if (!v.isInt()) throw_data_error(where_ + ": '" + full_name + "' is " + a_type(v) + ", expected an int");
    const std::int64_t side = v.toInt();
    if (side < 1 || side > kMaxCheckpointImageSide) {
      throw_data_error(where_ + ": '" + full_name + "' is " + std::to_string(side) +
                       ", expected an image side of 1 to " + std::to_string(kMaxCheckpointImageSide) + " pixels");
    }
    return static_cast<int>(side);
  }
  double number_of(const c10::IValue& v, const std::string& full_name) const {
    if (v.isDouble()) return v.toDouble();
    if (v.isInt()) return static_cast<double>(v.toInt());
    throw_data_error(where_ + ": '" + full_name + "' is " + a_type(v) + ", expected a number");
  }

  Dict dict_;
  std::string prefix_;
  const std::string& where_;
};

// The integrity entry: {algorithm: "crc32", tensors: {dotted path: checksum}}, one checksum per
// tensor anywhere in the file, over its dtype, shape and bytes.
constexpr const char* kIntegrityKey = "integrity";
constexpr const char* kChecksumAlgorithm = "crc32";

// Calls `visit(path, tensor)` for every tensor in `value`, depth first in the file's order; the
// integrity entry itself is skipped.
void each_tensor(const c10::IValue& value, const std::string& path,
                 const std::function<void(const std::string&, const at::Tensor&)>& visit) {
  auto join = [&path](const std::string& part) { return path.empty() ? part : path + "." + part; };
  if (value.isTensor()) {
    visit(path, value.toTensor());
  } else if (value.isGenericDict()) {
    for (const auto& entry : value.toGenericDict()) {
      if (path.empty() && entry.key().isString() && entry.key().toStringRef() == kIntegrityKey) continue;
      each_tensor(entry.value(), join(key_text(entry.key())), visit);
    }
  } else if (value.isList() || value.isTuple()) {
    const auto items = value.isList() ? value.toListRef() : value.toTupleRef().elements();
    for (std::size_t i = 0; i < items.size(); ++i) each_tensor(items[i], join(std::to_string(i)), visit);
  }
}

std::int64_t tensor_checksum(const at::Tensor& tensor) {
  const at::Tensor dense = tensor.is_cpu() ? tensor.contiguous() : tensor.cpu().contiguous();
  std::string header = c10::toString(dense.scalar_type());
  for (const auto size : dense.sizes()) header += "," + std::to_string(size);
  std::uint32_t crc = libdeflate_crc32(0, header.data(), header.size());
  crc = libdeflate_crc32(crc, dense.data_ptr(), dense.nbytes());
  // Stored as a signed 32-bit value: Python's pickler writes ints of 2^31 and above as 5-byte longs,
  // which LibTorch's unpickler cannot read, so a checkpoint re-saved with torch.save would not load.
  return static_cast<std::int32_t>(crc);
}

Dict integrity_of(const Dict& checkpoint) {
  Dict tensors = string_dict();
  each_tensor(checkpoint, "", [&tensors](const std::string& path, const at::Tensor& tensor) {
    tensors.insert_or_assign(path, tensor_checksum(tensor));
  });
  Dict integrity = string_dict();
  integrity.insert("algorithm", std::string(kChecksumAlgorithm));
  integrity.insert("tensors", tensors);
  return integrity;
}

// Checkpoints written before kiln recorded checksums have no integrity entry: they load unverified.
void verify_integrity(const Dict& checkpoint, const std::string& where) {
  const Entries top(checkpoint, "", where);
  if (!top.has(kIntegrityKey)) return;
  const Entries integrity = top.dict(kIntegrityKey);
  const std::string algorithm = integrity.string("algorithm");
  if (algorithm != kChecksumAlgorithm) {
    throw_data_error(where + ": its checksums are " + algorithm + ", which this kiln does not know; upgrade kiln");
  }
  const Entries sums = integrity.dict("tensors");
  std::unordered_set<std::string> verified;
  each_tensor(checkpoint, "", [&](const std::string& path, const at::Tensor& tensor) {
    if (!sums.has(path)) {
      throw_data_error(where + ": tensor '" + detail::printable_utf8(path) +
                       "' has no checksum: the file was damaged or edited after kiln wrote it (an edited "
                       "checkpoint loads unverified once its '" +
                       kIntegrityKey + "' entry is deleted)");
    }
    if (sums.integer(path) != tensor_checksum(tensor)) {
      throw_data_error(where + ": tensor '" + path + "' does not match its checksum; the file is damaged");
    }
    verified.insert(path);
  });
  for (const auto& entry : sums.keys()) {
    if (!verified.count(entry)) {
      throw_data_error(where + ": tensor '" + detail::printable_utf8(entry) +
                       "' is missing, though its checksums list it: the file was damaged or edited after kiln "
                       "wrote it");
    }
  }
}

// The name of a parameter or buffer of `state_dict` holding NaN or infinite values, with how many.
std::optional<std::string> non_finite_tensor(const c10::IValue& state_dict) {
  if (!state_dict.isGenericDict()) return std::nullopt;
  for (const auto& entry : state_dict.toGenericDict()) {
    if (!entry.value().isTensor()) continue;
    const at::Tensor tensor = entry.value().toTensor();
    if (!at::isFloatingType(tensor.scalar_type()) && !at::isComplexType(tensor.scalar_type())) continue;
    const std::int64_t bad = tensor.numel() - at::isfinite(tensor).sum().item<std::int64_t>();
    if (bad > 0) {
      return "'" + key_text(entry.key()) + "' holds " + std::to_string(bad) + " NaN or infinite value(s) of " +
             std::to_string(tensor.numel());
    }
  }
  return std::nullopt;
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

EpochMetrics metrics_from_entries(const Entries& entries) {
  EpochMetrics m;
  m.epoch = entries.integer("epoch");
  m.train_loss = entries.number("train_loss");
  m.train_accuracy = entries.number("train_accuracy");
  m.test_loss = entries.number("test_loss");
  m.test_accuracy = entries.number("test_accuracy");
  m.learning_rate = entries.number("learning_rate");
  m.seconds = entries.number("seconds");
  return m;
}

c10::IValue calibration_to_ivalue(const Int8Calibration& calibration) {
  Dict dict = string_dict();
  dict.insert("activation_max", detail::plain_list(calibration.activation_max));
  dict.insert("images", calibration.images);
  return dict;
}

// The transform entry: {image_shape: [C, H, W], resize: [h, w] | [shorter edge] | None, center_crop:
// [h, w] | None}. A one-value resize is torchvision's Resize([size]): the shorter edge to it.
constexpr const char* kTransformKey = "transform";

c10::IValue size_to_ivalue(const std::optional<std::pair<int, int>>& size) {
  if (!size) return c10::IValue();
  std::vector<std::int64_t> values{size->first};
  if (size->second != 0) values.push_back(size->second);
  return detail::plain_list(values);
}

c10::IValue transform_to_ivalue(const ImageSpec& stored, const EvalTransformOptions& eval) {
  Dict transform = string_dict();
  transform.insert("image_shape",
                   detail::plain_list(std::vector<std::int64_t>{stored.channels, stored.height, stored.width}));
  transform.insert("resize", size_to_ivalue(eval.resize));
  transform.insert("center_crop", size_to_ivalue(eval.center_crop));
  return transform;
}

std::string size_text(int height, int width) {
  return std::to_string(height) + "x" + std::to_string(width);
}

std::string transform_text(const EvalTransformOptions& eval) {
  std::string text;
  if (eval.resize) {
    text = "resize " + (eval.resize->second == 0 ? std::to_string(eval.resize->first) + " (shorter edge)"
                                                 : size_text(eval.resize->first, eval.resize->second));
  }
  if (eval.center_crop) {
    text += (text.empty() ? "" : ", ") + std::string("center_crop ") +
            size_text(eval.center_crop->first, eval.center_crop->second);
  }
  return text.empty() ? "no transform" : text;
}

// Throws kiln::DataError (`where`: ...) unless `spec`'s sizes are plausible and `eval` brings `stored`
// images to the model's input: checked before any model, decode buffer or resized image of these sizes
// is allocated.
void check_image_sizes(const ModelSpec& spec, const ImageSpec& stored, const EvalTransformOptions& eval,
                       const std::string& where) {
  if (spec.in_channels != 1 && spec.in_channels != 3) {
    throw_data_error(where + ": 'model.in_channels' is " + std::to_string(spec.in_channels) +
                     ", expected 1 (grayscale) or 3 (RGB)");
  }
  const auto check_area = [&where](const std::string& what, std::int64_t height, std::int64_t width) {
    if (height > kMaxCheckpointImageSide || width > kMaxCheckpointImageSide ||
        height * width > kDefaultMaxImagePixels) {
      throw_data_error(where + ": " + what + " are " + std::to_string(height) + "x" + std::to_string(width) +
                       ", over kiln's limits (" + std::to_string(kMaxCheckpointImageSide) + " pixels a side, " +
                       std::to_string(kDefaultMaxImagePixels) + " pixels an image)");
    }
  };
  check_area("the model's input images ('model.height' x 'model.width')", spec.height, spec.width);
  if (stored.channels != spec.in_channels) {
    throw_data_error(where + ": 'transform.image_shape' has " + std::to_string(stored.channels) +
                     " channel(s), the model takes " + std::to_string(spec.in_channels));
  }
  check_area("the stored images ('transform.image_shape')", stored.height, stored.width);
  std::pair<int, int> output;
  try {
    if (eval.resize) {
      const auto resized = ImageTransform::evaluation({eval.resize, std::nullopt}, stored.channels)
                               .output_size(stored.height, stored.width);
      check_area("the resized images ('transform.resize')", resized.first, resized.second);
    }
    output = ImageTransform::evaluation(eval, stored.channels).output_size(stored.height, stored.width);
  } catch (const DataError& error) {
    throw_data_error(where + ": 'transform': " + error.what());
  }
  if (output != std::pair{spec.height, spec.width}) {
    throw_data_error(where + ": its evaluation transform (" + transform_text(eval) + ") makes " +
                     size_text(output.first, output.second) + " images of the " +
                     size_text(stored.height, stored.width) + " stored ones ('transform.image_shape'), but the " +
                     "model takes " + size_text(spec.height, spec.width) + " ('model.height' x 'model.width')");
  }
}

// mnist_cnn is the one model whose weights' shapes depend on the input size (fc1 reads the whole pooled
// conv2 output): an input size its fc1 weight does not fit is refused before the model is built, which
// for a checkpoint claiming a huge input would allocate an fc1 of that size (tens of GB) first.
void check_mnist_cnn_weights(const ModelSpec& spec, const Entries& model, const std::string& where) {
  const auto pooled = detail::mnist_cnn::pooled_size(spec.height, spec.width);
  if (pooled.height < 1 || pooled.width < 1) return;  // make_model names the minimum size
  const std::int64_t inputs = std::int64_t{detail::mnist_cnn::kConv2Channels} * pooled.height * pooled.width;
  const Entries weights = model.dict("state_dict");
  const at::Tensor fc1 = weights.has("fc1.weight") ? weights.tensor("fc1.weight") : at::Tensor();
  if (!fc1.defined() || fc1.dim() != 2 || fc1.size(1) != inputs) {
    throw_data_error(where + ": mnist_cnn's fc1 for " + size_text(spec.height, spec.width) +
                     " images ('model.height' x 'model.width') reads " + std::to_string(inputs) +
                     " values, but 'model.state_dict.fc1.weight' " +
                     (fc1.defined() ? "has shape " + c10::str(fc1.sizes()) : std::string("is missing")));
  }
}

// Which torch.optim layout a param group is, by the hyperparameter only that optimizer has (as
// Optimizer::load_state_dict tells them apart), and the entries that layout holds: checked here, so a
// missing one is named with the file instead of failing inside the optimizer.
void check_optimizer_entries(const Entries& optimizer, const Entries& group, const std::string& group_name,
                             const std::string& where) {
  std::vector<std::string> slots{"step"};
  if (group.has("rho")) {
    group.number("rho");
    group.number("eps");
    slots.insert(slots.end(), {"acc_delta", "square_avg"});
  } else if (group.has("momentum")) {
    if (group.number("momentum") != 0.0) slots.push_back("momentum_buffer");
    group.boolean("nesterov");
  } else if (group.has("betas")) {
    const c10::IValue betas = group.value("betas");
    const std::vector<c10::IValue> values = betas.isTuple()  ? betas.toTupleRef().elements().vec()
                                            : betas.isList() ? betas.toListRef().vec()
                                                             : std::vector<c10::IValue>{};
    if (values.size() != 2 ||
        !std::all_of(values.begin(), values.end(), [](const c10::IValue& v) { return v.isDouble() || v.isInt(); })) {
      throw_data_error(where + ": '" + group_name + ".betas' is " + a_type(betas) + ", expected two numbers");
    }
    group.number("eps");
    slots.insert(slots.end(), {"exp_avg", "exp_avg_sq"});
  } else {
    return;  // the optimizer names it: "the optimizer state is an unknown optimizer's"
  }
  for (const auto& entry : optimizer.value("state").toGenericDict()) {
    const std::string name = "optimizer.state." + detail::printable_utf8(key_text(entry.key()));
    if (!entry.value().isGenericDict()) {
      throw_data_error(where + ": '" + name + "' is " + a_type(entry.value()) + ", expected a dict");
    }
    const Entries parameter(entry.value().toGenericDict(), name, where);
    for (const auto& slot : slots) parameter.tensor(slot);
  }
}

}  // namespace

void write_checkpoint(const std::filesystem::path& path, TrainingState state) {
  CheckpointModel& saved = state.model;
  if (const auto bad = non_finite_tensor(saved.state_dict)) {
    throw TrainingError("not writing " + where_of(path) + ": the model's " + *bad +
                        " (training diverged); the file keeps what it held");
  }
  const ImageSpec stored = saved.stored_image.height == 0
                               ? ImageSpec{saved.spec.in_channels, saved.spec.height, saved.spec.width}
                               : saved.stored_image;
  check_image_sizes(saved.spec, stored, saved.eval_transform, "not writing " + where_of(path));
  // Version 1 unless the transform changes the pixels: older kilns then refuse the file rather than
  // ignore the transform.
  const bool transformed = !ImageTransform::evaluation(saved.eval_transform, stored.channels).identity();
  Dict model = string_dict();
  model.insert("name", saved.spec.name);
  model.insert("in_channels", static_cast<std::int64_t>(saved.spec.in_channels));
  model.insert("num_classes", static_cast<std::int64_t>(saved.spec.num_classes));
  model.insert("height", static_cast<std::int64_t>(saved.spec.height));
  model.insert("width", static_cast<std::int64_t>(saved.spec.width));
  model.insert("state_dict", std::move(saved.state_dict));
  if (is_scripted_model_name(saved.spec.name)) {
    // A model from Python: its TorchScript archive, so inference rebuilds it from the checkpoint alone.
    const auto archive = scripted_model_archive(saved.spec.name);
    if (!archive) {
      throw TrainingError("not writing " + where_of(path) + ": model '" + saved.spec.name +
                          "' has no TorchScript archive");
    }
    at::Tensor bytes = at::empty({static_cast<std::int64_t>(archive->size())}, at::kByte);
    std::copy(archive->begin(), archive->end(), reinterpret_cast<char*>(bytes.data_ptr<std::uint8_t>()));
    model.insert("script", bytes);
  }

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
  checkpoint.insert("format_version", std::int64_t{transformed ? kCheckpointFormatVersion : 1});
  checkpoint.insert("kiln_version", std::string(KILN_VERSION));
  checkpoint.insert("model", model);
  checkpoint.insert("classes", detail::plain_list(saved.classes));
  checkpoint.insert("normalization", normalization);
  checkpoint.insert(kTransformKey, transform_to_ivalue(stored, saved.eval_transform));
  checkpoint.insert("optimizer", std::move(state.optimizer));
  checkpoint.insert("scheduler", scheduler);
  checkpoint.insert("epoch", saved.epoch);
  checkpoint.insert("history", history);
  checkpoint.insert("rng", rng);
  checkpoint.insert("options", options);
  if (!saved.calibration.activation_max.empty()) {
    checkpoint.insert("int8_calibration", calibration_to_ivalue(saved.calibration));
  }
  checkpoint.insert(kIntegrityKey, integrity_of(checkpoint));
  detail::save_ivalue(path, checkpoint);
}

c10::impl::GenericDict read_checkpoint(const std::filesystem::path& path) {
  if (!std::filesystem::exists(path)) throw NotFoundError(where_of(path) + " does not exist");
  const std::string where = where_of(path);
  const c10::IValue value = detail::load_ivalue(path, "checkpoint");
  if (!value.isGenericDict()) {
    throw_data_error(where + ": not a kiln checkpoint (it holds a " + type_name(value) + ", not a dict)");
  }
  auto checkpoint = value.toGenericDict();
  const Entries top(checkpoint, "", where);
  const c10::IValue format_key(std::string("format"));
  if (!top.has("format") || !checkpoint.at(format_key).isString() ||
      checkpoint.at(format_key).toStringRef() != kCheckpointFormat) {
    throw_data_error(where + ": not a kiln checkpoint (no 'format': '" + kCheckpointFormat + "' entry)");
  }
  const auto version = top.integer("format_version");
  if (version > kCheckpointFormatVersion) {
    throw_data_error(where + " has format version " + std::to_string(version) +
                     ", newer than this kiln reads; upgrade kiln");
  }
  try {
    verify_integrity(checkpoint, where);
  } catch (const c10::Error& error) {
    throw_data_error(where + ": cannot verify its tensors: " + error.msg().substr(0, error.msg().find('\n')));
  }
  return checkpoint;
}

CheckpointModel checkpoint_model(const c10::impl::GenericDict& checkpoint, const std::filesystem::path& path) {
  const std::string where = where_of(path);
  const Entries top(checkpoint, "", where);
  CheckpointModel result;
  const Entries model = top.dict("model");
  result.spec.name = model.string("name");
  if (is_scripted_model_name(result.spec.name)) {
    // A model from Python: the checkpoint's TorchScript archive is the model (its module is not imported).
    const at::Tensor bytes = model.tensor("script");
    if (bytes.scalar_type() != at::kByte || bytes.dim() != 1) {
      throw_data_error(where + ": 'model.script' is not a 1-D uint8 tensor (a TorchScript archive)");
    }
    const at::Tensor dense = bytes.contiguous();
    register_scripted_model(result.spec.name, std::string(reinterpret_cast<const char*>(dense.data_ptr<std::uint8_t>()),
                                                          static_cast<std::size_t>(dense.numel())));
  } else if (const auto known = model_names(); std::find(known.begin(), known.end(), result.spec.name) == known.end()) {
    std::string list;
    for (const auto& name : known) list += (list.empty() ? "" : ", ") + name;
    throw_data_error(where + ": 'model.name' is '" + detail::printable_utf8(result.spec.name) +
                     "', a model this kiln does not know (known: " + list + ")");
  }
  result.spec.in_channels = model.size_entry("in_channels");
  result.spec.num_classes = model.size_entry("num_classes");
  result.spec.height = model.side("height");
  result.spec.width = model.side("width");
  model.dict("state_dict");
  result.state_dict = model.value("state_dict");
  if (top.has(kTransformKey)) {
    const Entries transform = top.dict(kTransformKey);
    const std::vector<int> shape = transform.sides("image_shape", 3, 3);
    result.stored_image = {shape[0], shape[1], shape[2]};
    if (!transform.value("resize").isNone()) {
      const std::vector<int> resize = transform.sides("resize", 1, 2);
      result.eval_transform.resize = {resize[0], resize.size() == 2 ? resize[1] : 0};
    }
    if (!transform.value("center_crop").isNone()) {
      // [size] is a square, as torchvision's CenterCrop([size]).
      const std::vector<int> crop = transform.sides("center_crop", 1, 2);
      result.eval_transform.center_crop = {crop[0], crop.back()};
    }
  } else {
    // Written before kiln recorded a transform: the model was trained on the stored images as they are.
    result.stored_image = {result.spec.in_channels, result.spec.height, result.spec.width};
  }
  check_image_sizes(result.spec, result.stored_image, result.eval_transform, where);
  if (result.spec.name == "mnist_cnn") check_mnist_cnn_weights(result.spec, model, where);
  result.classes = top.strings("classes");
  const Entries normalization = top.dict("normalization");
  result.mean = normalization.numbers("mean");
  result.std = normalization.numbers("std");
  result.epoch = top.integer("epoch");
  if (top.has("int8_calibration")) {
    const Entries calibration = top.dict("int8_calibration");
    result.calibration.activation_max = calibration.numbers("activation_max");
    result.calibration.images = calibration.integer("images");
  }
  if (static_cast<int>(result.classes.size()) != result.spec.num_classes ||
      static_cast<int>(result.mean.size()) != result.spec.in_channels || result.std.size() != result.mean.size()) {
    throw_data_error(where + " is inconsistent (classes or normalisation do not fit the model)");
  }
  return result;
}

TrainingState read_training_state(const c10::impl::GenericDict& checkpoint, const std::filesystem::path& path) {
  const std::string where = where_of(path);
  const Entries top(checkpoint, "", where);
  TrainingState state;
  state.model = checkpoint_model(checkpoint, path);
  // The layout every torch.optim state_dict shares; the optimizer checks its own entries.
  const Entries optimizer = top.dict("optimizer");
  optimizer.dict("state");
  const std::size_t groups = optimizer.list("param_groups").size();
  if (groups == 0) throw_data_error(where + ": 'optimizer.param_groups' is empty");
  for (std::size_t i = 0; i < groups; ++i) {
    const Entries group = optimizer.item_dict("param_groups", i);
    group.number("lr");
    group.number("weight_decay");
    check_optimizer_entries(optimizer, group, "optimizer.param_groups[" + std::to_string(i) + "]", where);
  }
  state.optimizer = top.value("optimizer");
  const Entries scheduler = top.dict("scheduler");
  const auto first = [&scheduler, &where](const char* key) {
    const std::vector<double> values = scheduler.numbers(key);
    if (values.empty()) throw_data_error(where + ": 'scheduler." + key + "' is empty");
    return values.front();
  };
  state.base_lr = first("base_lrs");
  state.gamma = scheduler.number("gamma");
  state.lr = first("_last_lr");
  const std::size_t epochs = top.list("history").size();
  for (std::size_t i = 0; i < epochs; ++i) state.history.push_back(metrics_from_entries(top.item_dict("history", i)));
  const Entries rng = top.dict("rng");
  const auto generator_state = [&rng, &where](const char* key) {
    const at::Tensor tensor = rng.tensor(key);
    if (tensor.scalar_type() != at::kByte || tensor.dim() != 1) {
      throw_data_error(where + ": 'rng." + key + "' is a " + c10::toString(tensor.scalar_type()) + " tensor of shape " +
                       c10::str(tensor.sizes()) + ", expected a generator state (a 1-d uint8 tensor)");
    }
    return tensor;
  };
  state.torch_cpu_rng = generator_state("torch_cpu");
  if (rng.has("torch_device")) state.torch_device_rng = generator_state("torch_device");
  state.shuffle_rng = generator_state("shuffle");
  state.dropout_seed = static_cast<std::uint64_t>(rng.integer("dropout_seed"));
  state.dropout_offset = static_cast<std::uint64_t>(rng.integer("dropout_offset"));
  return state;
}

c10::IValue module_state_dict(const torch::nn::Module& module) {
  c10::impl::GenericDict state(c10::StringType::get(), c10::AnyType::get());
  for (const auto& item : module.named_parameters()) state.insert(item.key(), item.value().detach().cpu().contiguous());
  for (const auto& item : module.named_buffers()) state.insert(item.key(), item.value().detach().cpu().contiguous());
  return state;
}

void load_module_state_dict(torch::nn::Module& module, const c10::IValue& value, const std::string& source) {
  if (!value.isGenericDict()) throw_data_error(source + ": the state dict is " + a_type(value) + ", not a dict");
  // Checked before anything is copied: a refused state dict leaves the module as it was.
  if (const auto bad = non_finite_tensor(value)) {
    throw_data_error(source + ": " + *bad + "; use a checkpoint from before training diverged");
  }
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
    // Floating weights of another precision convert as torch's load_state_dict does; nothing else does.
    if (tensor.scalar_type() != target.scalar_type() &&
        !(at::isFloatingType(tensor.scalar_type()) && at::isFloatingType(target.scalar_type()))) {
      throw_data_error(source + ": '" + name + "' is a " + c10::toString(tensor.scalar_type()) +
                       " tensor, the model expects " + c10::toString(target.scalar_type()));
    }
    target.copy_(tensor);
  };
  for (auto& item : module.named_parameters()) copy_in(item.key(), item.value());
  for (auto& item : module.named_buffers()) copy_in(item.key(), item.value());
}

}  // namespace kiln
