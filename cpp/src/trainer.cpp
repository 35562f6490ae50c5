#include "kiln/trainer.hpp"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/GradMode.h>

#include <chrono>
#include <cmath>
#include <optional>

#include "kiln/checkpoint.hpp"
#include "kiln/detail/autocast.hpp"
#include "kiln/detail/random_stream.hpp"
#include "kiln/detail/tensor_file.hpp"
#include "kiln/error.hpp"
#include "kiln/normalize.hpp"
#include "kiln/optimizer.hpp"

namespace kiln {
namespace {

using detail::RandomStreamScope;
using detail::seeded_stream;

using Clock = std::chrono::steady_clock;

// Reports at most every 100 ms so the callback (the GIL, a tqdm bar) costs nothing measurable.
class ProgressThrottle {
 public:
  explicit ProgressThrottle(const ProgressFn& progress) : progress_(progress) {}
  void report(std::int64_t done, std::int64_t total, bool force = false) {
    if (!progress_) return;
    const auto now = Clock::now();
    if (!force && now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    if (!progress_(done, total)) throw Cancelled("training cancelled");
  }

 private:
  const ProgressFn& progress_;
  Clock::time_point last_{};
};

at::Tensor random_subset(std::int64_t size, std::int64_t limit, std::uint64_t seed) {
  if (limit <= 0 || limit >= size) return {};
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randperm(size, generator, at::TensorOptions().dtype(at::kLong)).slice(0, 0, limit);
}

// For an epoch's training steps in bf16 on the CPU: the weights (2+ dims) hold bfloat16 working
// copies that the optimizer rewrites from their float32 masters after each update (what autocast
// would cast them to, cast once per step instead of in every forward pass, and no cast of their
// gradients back). The float32 weights are back in the model when the scope ends, however it ends.
class Bf16WorkingWeights {
 public:
  Bf16WorkingWeights(const std::vector<at::Tensor>& params, Adadelta& optimizer)
      : params_(params), optimizer_(optimizer) {
    c10::NoGradGuard no_grad;
    for (std::size_t i = 0; i < params_.size(); ++i) {
      if (params_[i].dim() < 2 || params_[i].scalar_type() != at::kFloat) continue;
      at::Tensor master = params_[i].detach();  // keeps the float32 storage
      params_[i].set_data(master.to(at::kBFloat16));  // same strides (channels-last, transposed fc1)
      optimizer_.set_master(i, master);
      masters_.emplace_back(i, master);
    }
  }
  Bf16WorkingWeights(const Bf16WorkingWeights&) = delete;
  Bf16WorkingWeights& operator=(const Bf16WorkingWeights&) = delete;
  ~Bf16WorkingWeights() {
    c10::NoGradGuard no_grad;
    for (auto& [i, master] : masters_) {
      params_[i].mutable_grad().reset();
      params_[i].set_data(master);
      optimizer_.set_master(i, at::Tensor());
    }
  }

 private:
  std::vector<at::Tensor> params_;
  Adadelta& optimizer_;
  std::vector<std::pair<std::size_t, at::Tensor>> masters_;
};

c10::IValue metrics_to_ivalue(const EpochMetrics& m) {
  c10::impl::GenericDict dict(c10::StringType::get(), c10::AnyType::get());
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

}  // namespace

struct Trainer::State {
  TrainerOptions options;
  Manifest manifest;
  ModelSpec spec;
  torch::Device device{torch::kCPU};
  std::shared_ptr<Classifier> model;
  std::unique_ptr<Adadelta> optimizer;
  double base_lr = 0;
  at::Tensor train_images, train_labels, test_images, test_labels;
  Normalizer normalizer;
  at::Generator shuffle;
  at::Tensor torch_stream;   // this trainer's state of torch's CPU generator (init, dropout on the CPU)
  at::Tensor device_stream;  // and of the GPU's generator (dropout on the GPU); undefined on the CPU
  DropoutStream dropout;     // dropout masks on the CPU
  std::int64_t epoch = 0;
  std::vector<EpochMetrics> history;
  at::Tensor confusion;
  Int8Calibration calibration;  // of the weights as of the last evaluation

  at::Tensor normalise(const at::Tensor& pixels) const {
    at::Tensor x = normalizer(pixels);
    return options.channels_last ? x.contiguous(at::MemoryFormat::ChannelsLast) : x;
  }

  at::Tensor forward(const at::Tensor& x) {
    detail::AutocastScope autocast(device, options.precision == Precision::bf16);
    return model->forward(x);
  }
};

Trainer::Trainer(TrainerOptions options) : state_(std::make_unique<State>()) {
  State& s = *state_;
  s.options = std::move(options);
  const TrainerOptions& o = s.options;
  if (o.lr <= 0 || !std::isfinite(o.lr)) throw_data_error("lr must be a positive number, got " + std::to_string(o.lr));
  if (o.train_batch_size < 1 || o.test_batch_size < 1) {
    throw_data_error("train_bs and test_bs must be at least 1, got " + std::to_string(o.train_batch_size) + " and " +
                     std::to_string(o.test_batch_size));
  }
  try {
    s.device = torch::Device(o.device);
  } catch (const c10::Error&) {
    throw_data_error("unknown device '" + o.device + "' (expected cpu, cuda or cuda:N)");
  }
  if (s.device.is_cuda() && !at::hasCUDA()) {
    throw_data_error("device '" + o.device + "' requested but this torch build has no CUDA device available");
  }

  s.manifest = read_manifest(o.data_dir);
  SplitData train = load_split(o.data_dir, o.train_split);
  SplitData test = load_split(o.data_dir, o.test_split);
  if (train.images.size(0) == 0 || test.images.size(0) == 0) {
    throw_data_error("processed dataset '" + o.data_dir.string() + "' has an empty '" +
                     (train.images.size(0) == 0 ? o.train_split : o.test_split) + "' split");
  }
  if (at::Tensor subset = random_subset(train.images.size(0), o.train_limit, o.seed); subset.defined()) {
    train.images = train.images.index_select(0, subset);
    train.labels = train.labels.index_select(0, subset);
  }
  if (at::Tensor subset = random_subset(test.images.size(0), o.test_limit, o.seed + 1); subset.defined()) {
    test.images = test.images.index_select(0, subset);
    test.labels = test.labels.index_select(0, subset);
  }
  // Whole-dataset residency: uint8 pixels stay on the training device; batches are gathered there.
  s.train_images = train.images.to(s.device);
  s.train_labels = train.labels.to(s.device);
  s.test_images = test.images.to(s.device);
  s.test_labels = test.labels.to(s.device);

  const ImageSpec& image = s.manifest.image;
  s.normalizer = Normalizer(s.manifest.mean, s.manifest.std, s.device);

  // Seeded streams first, so weight initialisation, dropout and shuffling all follow `seed`.
  s.torch_stream = seeded_stream(o.seed, torch::kCPU);
  if (s.device.is_cuda()) s.device_stream = seeded_stream(o.seed, s.device);
  s.shuffle = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  s.spec = ModelSpec{o.model, image.channels, static_cast<int>(s.manifest.classes.size()), image.height, image.width};
  {
    RandomStreamScope stream(s.torch_stream, torch::kCPU);
    s.model = make_model(s.spec);
  }
  s.dropout.seed = o.seed ^ 0x6b696c6e64726f70ULL;  // a stream apart from the shuffle's
  s.model->set_dropout_stream(&s.dropout);
  s.model->to(s.device);
  if (o.channels_last) {
    c10::NoGradGuard no_grad;
    for (auto& param : s.model->parameters()) {
      if (param.dim() == 4) param.set_data(param.contiguous(at::MemoryFormat::ChannelsLast));
    }
  }
  s.base_lr = o.lr;
  s.optimizer = std::make_unique<Adadelta>(s.model->parameters(), AdadeltaOptions{o.lr});
  const auto classes = static_cast<std::int64_t>(s.manifest.classes.size());
  s.confusion = at::zeros({classes, classes}, at::kLong);
}

Trainer::~Trainer() = default;

EpochMetrics Trainer::run_epoch(const ProgressFn& progress) {
  State& s = *state_;
  const auto started = Clock::now();
  const std::int64_t train_size = s.train_images.size(0);
  const std::int64_t batch_size = s.options.train_batch_size;
  const std::int64_t batches = (train_size + batch_size - 1) / batch_size;
  const auto accumulate_options = at::TensorOptions().dtype(at::kDouble).device(s.device);
  EpochMetrics metrics;
  metrics.epoch = s.epoch + 1;
  metrics.learning_rate = s.optimizer->lr();

  ProgressThrottle throttle(progress);
  RandomStreamScope stream(s.torch_stream, torch::kCPU);
  std::optional<RandomStreamScope> device_stream;
  if (s.device.is_cuda()) device_stream.emplace(s.device_stream, s.device);
  s.model->train();
  const at::Tensor order = at::randperm(train_size, s.shuffle, at::TensorOptions().dtype(at::kLong)).to(s.device);
  at::Tensor loss_sum = at::zeros({}, accumulate_options);
  at::Tensor correct = at::zeros({}, at::TensorOptions().dtype(at::kLong).device(s.device));
  auto check_finite = [&](std::int64_t batch) {
    if (!std::isfinite(loss_sum.item<double>())) {
      throw TrainingError("training diverged in epoch " + std::to_string(metrics.epoch) +
                          " (loss became NaN or inf by batch " + std::to_string(batch) + " of " +
                          std::to_string(batches) + " at lr " + std::to_string(metrics.learning_rate) +
                          "); lower lr or check the data");
    }
  };
  const std::vector<at::Tensor> params = s.model->parameters();
  std::optional<Bf16WorkingWeights> working_weights;
  if (s.options.precision == Precision::bf16 && s.device.is_cpu()) working_weights.emplace(params, *s.optimizer);
  for (std::int64_t batch = 0; batch < batches; ++batch) {
    const at::Tensor indices = order.slice(0, batch * batch_size, std::min(train_size, (batch + 1) * batch_size));
    const at::Tensor x = s.normalise(s.train_images.index_select(0, indices));
    const at::Tensor y = s.train_labels.index_select(0, indices);
    s.optimizer->zero_grad();
    const at::Tensor logits = s.forward(x);
    const at::Tensor loss = at::cross_entropy_loss(logits.to(at::kFloat), y);
    loss.backward();
    s.optimizer->step();
    {
      c10::NoGradGuard no_grad;
      loss_sum.add_(loss.detach() * static_cast<double>(indices.size(0)));
      correct.add_(logits.argmax(1).eq(y).sum());
    }
    // On the CPU the loss is at hand, so divergence is caught at once; on a GPU at each report.
    if (s.device.is_cpu() && !std::isfinite(loss.item<float>())) check_finite(batch + 1);
    if (progress) {
      const bool last = batch + 1 == batches;
      throttle.report(batch + 1, batches, last);
    }
  }
  working_weights.reset();  // float32 weights back in the model for evaluation and checkpoints
  check_finite(batches);
  metrics.train_loss = loss_sum.item<double>() / static_cast<double>(train_size);
  metrics.train_accuracy = static_cast<double>(correct.item<std::int64_t>()) / static_cast<double>(train_size);

  {
    c10::NoGradGuard no_grad;
    // bf16 evaluation runs on an inference copy laid out as Predictor's (weights cast once, no layout
    // copies on the way): the same function, ~1.8x faster than autocast re-casting every batch.
    const bool bf16 = s.options.precision == Precision::bf16;
    const std::shared_ptr<Classifier> evaluated =
        bf16 ? inference_copy(*s.model, s.spec, /*bf16=*/true, /*channels_last=*/true) : s.model;
    evaluated->eval();
    // The evaluation also calibrates int8 inference: the activations' ranges over the test split.
    ActivationObserver observer;
    struct ObserverScope {
      Classifier& model;
      ~ObserverScope() { model.set_activation_observer(nullptr); }
    } observing{*evaluated};
    evaluated->set_activation_observer(&observer);
    const std::int64_t test_size = s.test_images.size(0);
    const auto classes = static_cast<std::int64_t>(s.manifest.classes.size());
    at::Tensor test_loss = at::zeros({}, accumulate_options);
    at::Tensor pairs = at::zeros({classes * classes}, at::TensorOptions().dtype(at::kLong).device(s.device));
    for (std::int64_t begin = 0; begin < test_size; begin += s.options.test_batch_size) {
      const std::int64_t end = std::min(test_size, begin + s.options.test_batch_size);
      const at::Tensor x = s.normalise(s.test_images.slice(0, begin, end));
      const at::Tensor y = s.test_labels.slice(0, begin, end);
      at::Tensor logits;
      if (bf16) {
        // In slices that keep the activations in cache, as Predictor does (test_bs 100: 1.8 s for 10k
        // images here, 64-image slices: 0.95 s).
        detail::AutocastScope autocast(s.device, true);
        const at::Tensor input = x.contiguous(at::MemoryFormat::ChannelsLast);
        const std::int64_t count = input.size(0);
        const std::int64_t pieces = s.device.is_cpu() ? (count + kInferenceSlice - 1) / kInferenceSlice : 1;
        const std::int64_t slice = (count + pieces - 1) / pieces;  // even slices: 100 -> 50 + 50
        std::vector<at::Tensor> parts;
        for (std::int64_t first = 0; first < count; first += slice) {
          parts.push_back(evaluated->forward(input.slice(0, first, std::min(count, first + slice))));
        }
        logits = at::cat(parts).to(at::kFloat);
      } else {
        logits = s.forward(x).to(at::kFloat);
      }
      test_loss.add_(at::cross_entropy_loss(logits, y, {}, at::Reduction::Sum));
      pairs.add_(at::bincount(y * classes + logits.argmax(1), {}, classes * classes));
    }
    s.model->train();
    s.calibration = {observer.maxima(), observer.images()};
    s.confusion = pairs.view({classes, classes}).cpu();
    metrics.test_loss = test_loss.item<double>() / static_cast<double>(test_size);
    metrics.test_accuracy =
        static_cast<double>(s.confusion.diagonal().sum().item<std::int64_t>()) / static_cast<double>(test_size);
    if (!std::isfinite(metrics.test_loss)) {
      throw TrainingError("evaluation after epoch " + std::to_string(metrics.epoch) +
                          " gave a NaN or inf loss; lower lr or check the data");
    }
  }

  s.epoch += 1;
  s.optimizer->set_lr(s.base_lr * std::pow(s.options.gamma, static_cast<double>(s.epoch)));
  metrics.seconds = std::chrono::duration<double>(Clock::now() - started).count();
  s.history.push_back(metrics);
  return metrics;
}

at::Tensor Trainer::confusion_matrix() const {
  return state_->confusion.clone();
}

void Trainer::save_checkpoint(const std::filesystem::path& path) const {
  const State& s = *state_;
  using Dict = c10::impl::GenericDict;
  auto dict = [] { return Dict(c10::StringType::get(), c10::AnyType::get()); };

  Dict model = dict();
  model.insert("name", s.spec.name);
  model.insert("in_channels", static_cast<std::int64_t>(s.spec.in_channels));
  model.insert("num_classes", static_cast<std::int64_t>(s.spec.num_classes));
  model.insert("height", static_cast<std::int64_t>(s.spec.height));
  model.insert("width", static_cast<std::int64_t>(s.spec.width));
  model.insert("state_dict", module_state_dict(*s.model));

  Dict normalization = dict();
  normalization.insert("mean", detail::plain_list(s.manifest.mean));
  normalization.insert("std", detail::plain_list(s.manifest.std));

  Dict scheduler = dict();
  scheduler.insert("step_size", std::int64_t{1});
  scheduler.insert("gamma", s.options.gamma);
  scheduler.insert("base_lrs", detail::plain_list(std::vector<double>{s.base_lr}));
  scheduler.insert("last_epoch", s.epoch);
  scheduler.insert("_last_lr", detail::plain_list(std::vector<double>{s.optimizer->lr()}));

  Dict rng = dict();
  rng.insert("torch_cpu", s.torch_stream.clone());
  rng.insert("dropout_seed", static_cast<std::int64_t>(s.dropout.seed));
  rng.insert("dropout_offset", static_cast<std::int64_t>(s.dropout.offset));
  if (s.device_stream.defined()) rng.insert("torch_device", s.device_stream.clone());
  {
    at::Generator shuffle = s.shuffle;
    std::lock_guard<std::mutex> lock(shuffle.mutex());
    rng.insert("shuffle", shuffle.get_state());
  }

  c10::impl::GenericList history(c10::AnyType::get());
  for (const auto& m : s.history) history.push_back(metrics_to_ivalue(m));

  Dict options = dict();
  options.insert("lr", s.options.lr);
  options.insert("train_batch_size", s.options.train_batch_size);
  options.insert("test_batch_size", s.options.test_batch_size);
  options.insert("seed", static_cast<std::int64_t>(s.options.seed));
  options.insert("precision", std::string(s.options.precision == Precision::bf16 ? "bf16" : "fp32"));
  options.insert("device", s.options.device);

  Dict checkpoint = dict();
  checkpoint.insert("format", std::string(kCheckpointFormat));
  checkpoint.insert("format_version", static_cast<std::int64_t>(kCheckpointFormatVersion));
  checkpoint.insert("kiln_version", std::string(KILN_VERSION));
  checkpoint.insert("model", model);
  checkpoint.insert("classes", detail::plain_list(s.manifest.classes));
  checkpoint.insert("normalization", normalization);
  checkpoint.insert("optimizer", s.optimizer->state_dict());
  checkpoint.insert("scheduler", scheduler);
  checkpoint.insert("epoch", s.epoch);
  checkpoint.insert("history", history);
  checkpoint.insert("rng", rng);
  checkpoint.insert("options", options);
  if (!s.calibration.activation_max.empty()) checkpoint.insert("int8_calibration", calibration_to_ivalue(s.calibration));
  detail::save_ivalue(path, checkpoint);
}

void Trainer::load_checkpoint(const std::filesystem::path& path) {
  State& s = *state_;
  const auto checkpoint = read_checkpoint(path);
  const CheckpointModel saved = checkpoint_model(checkpoint, path);
  if (saved.spec.name != s.spec.name || saved.spec.in_channels != s.spec.in_channels ||
      saved.spec.num_classes != s.spec.num_classes || saved.spec.height != s.spec.height ||
      saved.spec.width != s.spec.width) {
    throw_data_error("checkpoint '" + path.string() + "' holds a " + saved.spec.name + " for " +
                     std::to_string(saved.spec.num_classes) + " classes of " + std::to_string(saved.spec.height) + "x" +
                     std::to_string(saved.spec.width) + "x" + std::to_string(saved.spec.in_channels) +
                     ", not the model this run trains (" + s.spec.name + " for " + std::to_string(s.spec.num_classes) +
                     " classes of " + to_string(s.manifest.image) + ")");
  }
  if (saved.classes != s.manifest.classes) {
    throw_data_error("checkpoint '" + path.string() + "' was trained on other classes than '" +
                     s.options.data_dir.string() + "' holds");
  }
  try {
    load_module_state_dict(*s.model, saved.state_dict, "checkpoint '" + path.string() + "'");
    s.optimizer->load_state_dict(checkpoint.at("optimizer"));
    const auto scheduler = checkpoint.at("scheduler").toGenericDict();
    s.base_lr = scheduler.at("base_lrs").toListRef().at(0).toDouble();
    s.epoch = checkpoint.at("epoch").toInt();
    s.history.clear();
    for (const auto& item : checkpoint.at("history").toListRef()) s.history.push_back(metrics_from_ivalue(item));
    s.calibration = saved.calibration;
    const auto rng = checkpoint.at("rng").toGenericDict();
    s.torch_stream = rng.at("torch_cpu").toTensor().clone();
    s.dropout.seed = static_cast<std::uint64_t>(rng.at("dropout_seed").toInt());
    s.dropout.offset = static_cast<std::uint64_t>(rng.at("dropout_offset").toInt());
    if (s.device_stream.defined() && rng.contains("torch_device")) {
      s.device_stream = rng.at("torch_device").toTensor().clone();
    }
    std::lock_guard<std::mutex> lock(s.shuffle.mutex());
    s.shuffle.set_state(rng.at("shuffle").toTensor());
  } catch (const c10::Error& error) {
    throw_data_error("checkpoint '" + path.string() + "' is incomplete: " + error.what_without_backtrace());
  }
}

std::int64_t Trainer::epoch() const {
  return state_->epoch;
}
const std::vector<EpochMetrics>& Trainer::history() const {
  return state_->history;
}
const Manifest& Trainer::manifest() const {
  return state_->manifest;
}
const ModelSpec& Trainer::model_spec() const {
  return state_->spec;
}
std::string Trainer::device() const {
  return state_->device.str();
}
std::int64_t Trainer::train_size() const {
  return state_->train_images.size(0);
}
std::int64_t Trainer::test_size() const {
  return state_->test_images.size(0);
}

}  // namespace kiln
