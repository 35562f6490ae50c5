#include "kiln/trainer.hpp"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/GradMode.h>

#include <chrono>
#include <cmath>
#include <optional>
#include <tuple>
#include <utility>

#include "kiln/checkpoint.hpp"
#include "kiln/detail/activation_observer.hpp"
#include "kiln/detail/autocast.hpp"
#include "kiln/detail/dropout.hpp"
#include "kiln/detail/inference.hpp"
#include "kiln/detail/random_stream.hpp"
#include "kiln/detail/torchvision_models.hpp"
#include "kiln/distributed.hpp"
#include "kiln/error.hpp"
#include "kiln/loader.hpp"
#include "kiln/normalize.hpp"
#include "kiln/optimizer.hpp"
#include "kiln/pretrained.hpp"

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

// The error that stops a diverged run, naming where it happened and what to change.
TrainingError divergence(const EpochMetrics& metrics, std::int64_t batch, std::int64_t batches) {
  return TrainingError("training diverged in epoch " + std::to_string(metrics.epoch) +
                       " (loss became NaN or inf by batch " + std::to_string(batch) + " of " +
                       std::to_string(batches) + " at lr " + std::to_string(metrics.learning_rate) +
                       "); lower lr or check the data");
}

// The training batches since the last step report (StepMetrics): their loss summed on the device, so
// a report costs one sync every `every_n_steps` batches and none in between.
class StepWindow {
 public:
  StepWindow(std::int64_t steps_before, double learning_rate, const torch::Device& device)
      : step_(steps_before),
        learning_rate_(learning_rate),
        loss_sum_(at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(device))),
        started_(Clock::now()) {}

  // One batch of `images` trained with mean `loss`; reports when its step is a multiple of `every`.
  void add(const at::Tensor& loss, std::int64_t images, std::int64_t every, const StepMetricsFn& report) {
    {
      c10::NoGradGuard no_grad;
      loss_sum_.add_(loss.detach() * static_cast<double>(images));
    }
    images_ += images;
    if (++step_ % every != 0) return;
    const auto now = Clock::now();
    const double seconds = std::chrono::duration<double>(now - started_).count();
    StepMetrics metrics;
    metrics.step = step_;
    metrics.loss = loss_sum_.item<double>() / static_cast<double>(images_);
    metrics.learning_rate = learning_rate_;
    metrics.images_per_second = seconds > 0 ? static_cast<double>(images_) / seconds : 0.0;
    report(metrics);
    loss_sum_.zero_();
    images_ = 0;
    started_ = Clock::now();  // the report's own time is not the next window's
  }

 private:
  std::int64_t step_;
  double learning_rate_;
  at::Tensor loss_sum_;
  std::int64_t images_ = 0;
  Clock::time_point started_;
};

}  // namespace

struct Trainer::State {
  TrainerOptions options;
  Manifest manifest;
  ModelSpec spec;
  torch::Device device{torch::kCPU};
  std::shared_ptr<Classifier> model;
  std::unique_ptr<Optimizer> optimizer;
  double base_lr = 0;
  // Resident splits (on the training device) when they fit data_memory_budget and need no per-epoch
  // transform; otherwise a loader per split reads them (from memory or from the shards) on its threads.
  at::Tensor train_images, train_labels, test_images, test_labels;
  std::unique_ptr<BatchLoader> train_loader, test_loader;
  // Streamed splits with train_limit/test_limit: the subset's sample indices (undefined: all samples).
  at::Tensor train_subset, test_subset;
  std::int64_t train_count = 0, test_count = 0;
  bool streamed = false;  // the splits are read from their shards each epoch (over data_memory_budget)
  ImageTransform train_transform, eval_transform;
  Normalizer normalizer;
  at::Generator shuffle;
  at::Tensor torch_stream;   // this trainer's state of torch's CPU generator (init, dropout on the CPU)
  at::Tensor device_stream;  // and of the GPU's generator (dropout on the GPU); undefined on the CPU
  detail::DropoutStream dropout;  // dropout masks on the CPU
  std::int64_t epoch = 0;
  std::vector<EpochMetrics> history;
  at::Tensor confusion;
  Int8Calibration calibration;  // of the weights as of the last evaluation
  // Data-parallel training's group (none in one process), and the epoch's seconds spent communicating.
  std::unique_ptr<detail::ProcessGroup> group;
  double communication_seconds = 0;

  int rank() const { return group ? group->rank() : 0; }
  int world_size() const { return group ? group->world_size() : 1; }

  // Rank 0's weights and buffers on every rank (DDP's start; batch-norm statistics before evaluating).
  void broadcast_from_rank0(bool parameters) {
    if (!group) return;
    const auto started = Clock::now();
    std::vector<at::Tensor> tensors = model->buffers();
    if (parameters) {
      for (const auto& param : model->parameters()) tensors.push_back(param.detach());
    }
    if (!tensors.empty()) group->broadcast(tensors, 0);
    communication_seconds += std::chrono::duration<double>(Clock::now() - started).count();
  }

  // Sums (or maximums) over the ranks, in place; a no-op in one process.
  void all_reduce(at::Tensor& tensor, bool max = false) {
    if (!group) return;
    const auto started = Clock::now();
    if (max) {
      group->all_reduce_max(tensor);
    } else {
      group->all_reduce_sum(tensor);
    }
    communication_seconds += std::chrono::duration<double>(Clock::now() - started).count();
  }

  at::Tensor normalise(const at::Tensor& pixels) const {
    at::Tensor x = normalizer(pixels);
    return options.channels_last ? x.contiguous(at::MemoryFormat::ChannelsLast) : x;
  }

  // Loads the splits resident, or opens them for streaming, and sets up the transforms and loaders.
  void load_data();
  // The next training or test batch: uint8 pixels and labels on the training device.
  std::pair<at::Tensor, at::Tensor> loaded_batch(BatchLoader& loader) const {
    std::optional<Batch> batch = loader.next();
    TORCH_CHECK(batch, "the loader ended its epoch early");
    const bool pinned = device.is_cuda();
    return {batch->images.to(device, /*non_blocking=*/pinned), batch->labels.to(device, /*non_blocking=*/pinned)};
  }

  bool bf16() const { return options.precision == Precision::bf16; }

  at::Tensor forward(const at::Tensor& x) {
    detail::AutocastScope autocast(device, bf16());
    return model->forward(x);
  }

  // float32 logits of `evaluated` (the model, or its bf16 inference copy) for a test batch.
  at::Tensor evaluation_logits(Classifier& evaluated, const at::Tensor& x) {
    if (!bf16()) return forward(x).to(at::kFloat);
    // In slices that keep the activations in cache, as Predictor does (test_bs 100: 1.8 s for 10k
    // images here, 64-image slices: 0.95 s).
    detail::AutocastScope autocast(device, true);
    const auto classes = static_cast<std::int64_t>(manifest.classes.size());
    return detail::forward_in_slices(x.contiguous(at::MemoryFormat::ChannelsLast), classes, device,
                                     [&](const at::Tensor& slice) { return evaluated.forward(slice); });
  }
};

void Trainer::State::load_data() {
  const TrainerOptions& o = options;
  const ImageSpec& image = manifest.image;
  train_transform = ImageTransform(o.train_transform, o.eval_transform, image.channels);
  eval_transform = ImageTransform::evaluation(o.eval_transform, image.channels);
  const auto train_size = train_transform.output_size(image.height, image.width);
  const auto eval_size = eval_transform.output_size(image.height, image.width);
  if (train_size != eval_size) {
    throw_data_error("training's transforms give " + std::to_string(train_size.first) + "x" +
                     std::to_string(train_size.second) + " images but evaluation's give " +
                     std::to_string(eval_size.first) + "x" + std::to_string(eval_size.second) +
                     " (from the dataset's " + to_string(image) +
                     "); the model takes one input size: make transforms.train.random_resized_crop.size equal "
                     "transforms.eval's output");
  }
  const SplitInfo& train_info = manifest.split(o.train_split);
  const SplitInfo& test_info = manifest.split(o.test_split);
  if (train_info.count == 0 || test_info.count == 0) {
    throw_data_error("processed dataset '" + o.data_dir.string() + "' has an empty '" +
                     (train_info.count == 0 ? o.train_split : o.test_split) + "' split");
  }
  const auto limited = [](std::int64_t count, std::int64_t limit) { return limit > 0 ? std::min(count, limit) : count; };
  train_count = limited(train_info.count, o.train_limit);
  test_count = limited(test_info.count, o.test_limit);
  const std::int64_t decoded_bytes = (train_count + test_count) * image.bytes();
  const bool resident = o.data_memory_budget <= 0 || decoded_bytes <= o.data_memory_budget;
  if (o.data_memory_budget < 0) {
    throw_data_error("data_memory_budget must be 0 (no limit) or a number of bytes, got " +
                     std::to_string(o.data_memory_budget));
  }
  LoaderOptions loader_options;
  loader_options.seed = o.seed;
  loader_options.num_workers = o.num_workers;
  loader_options.pin_memory = device.is_cuda();
  const auto make_loader = [&](SampleSource source, const ImageTransform& transform, std::int64_t batch_size) {
    loader_options.batch_size = batch_size;
    return std::make_unique<BatchLoader>(std::move(source), transform, loader_options);
  };
  if (resident) {
    SplitData train = load_split(o.data_dir, o.train_split);
    SplitData test = load_split(o.data_dir, o.test_split);
    if (at::Tensor subset = random_subset(train.images.size(0), o.train_limit, o.seed); subset.defined()) {
      train.images = train.images.index_select(0, subset);
      train.labels = train.labels.index_select(0, subset);
    }
    if (at::Tensor subset = random_subset(test.images.size(0), o.test_limit, o.seed + 1); subset.defined()) {
      test.images = test.images.index_select(0, subset);
      test.labels = test.labels.index_select(0, subset);
    }
    // Whole-dataset residency: uint8 pixels stay on the training device and batches are gathered
    // there, unless every epoch transforms them (then the loader's threads do, from CPU memory).
    if (train_transform.identity()) {
      train_images = train.images.to(device);
      train_labels = train.labels.to(device);
    } else {
      train_loader = make_loader(SampleSource::resident(train.images, train.labels), train_transform,
                                 o.train_batch_size);
    }
    if (eval_transform.identity()) {
      test_images = test.images.to(device);
      test_labels = test.labels.to(device);
    } else {
      test_loader = make_loader(SampleSource::resident(test.images, test.labels), eval_transform, o.test_batch_size);
    }
    return;
  }
  // Streamed: the same samples in the same order as resident training would use, read from the shards.
  streamed = true;
  train_subset = random_subset(train_info.count, o.train_limit, o.seed);
  test_subset = random_subset(test_info.count, o.test_limit, o.seed + 1);
  train_loader = make_loader(
      SampleSource::streamed(std::make_shared<const SplitReader>(o.data_dir, manifest, o.train_split)),
      train_transform, o.train_batch_size);
  test_loader = make_loader(
      SampleSource::streamed(std::make_shared<const SplitReader>(o.data_dir, manifest, o.test_split)),
      eval_transform, o.test_batch_size);
}

Trainer::Trainer(TrainerOptions options) : state_(std::make_unique<State>()) {
  State& s = *state_;
  s.options = std::move(options);
  const TrainerOptions& o = s.options;
  if (o.lr <= 0 || !std::isfinite(o.lr)) throw_data_error("lr must be a positive number, got " + std::to_string(o.lr));
  if (o.precision == Precision::int8) {
    throw_data_error("training runs in fp32 or bf16, got precision '" + to_string(o.precision) +
                     "' (int8 is for inference)");
  }
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
  s.load_data();
  const ImageSpec& image = s.manifest.image;
  if (!o.mean.empty() || !o.std.empty()) {
    if (o.mean.size() != static_cast<std::size_t>(image.channels) || o.std.size() != o.mean.size()) {
      throw_data_error("mean and std need one value per image channel (" + std::to_string(image.channels) +
                       "), got " + std::to_string(o.mean.size()) + " and " + std::to_string(o.std.size()));
    }
    // The normalisation this model trains with, checkpointed in place of the manifest's.
    s.manifest.mean = o.mean;
    s.manifest.std = o.std;
  }
  s.normalizer = Normalizer(s.manifest.mean, s.manifest.std, s.device);

  // Seeded streams first, so weight initialisation, dropout and shuffling all follow `seed`.
  s.torch_stream = seeded_stream(o.seed, torch::kCPU);
  if (s.device.is_cuda()) s.device_stream = seeded_stream(o.seed, s.device);
  s.shuffle = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  // The model's input: the images as the transforms leave them (load_data checked that both agree).
  const auto [input_height, input_width] = s.eval_transform.output_size(image.height, image.width);
  s.spec = ModelSpec{o.model, image.channels, static_cast<int>(s.manifest.classes.size()), input_height, input_width};
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
      // clone: contiguous() keeps a depthwise weight's NCHW strides (see prepare_for_inference).
      if (param.dim() == 4) param.set_data(param.clone(at::MemoryFormat::ChannelsLast));
    }
    // float32 on the CPU: late layers with small maps and large weights train faster contiguous
    // (detail::LayoutSplit). Not bf16, whose contiguous convolutions are slower (resnet18 at 64 px, one
    // thread: 778 ms a step so split, 628 ms all channels-last).
    if (s.device.is_cpu() && !s.bf16()) {
      if (auto* split = dynamic_cast<detail::LayoutSplit*>(s.model.get()))
        split->contiguous_late_layers(o.train_batch_size);
    }
  }
  s.base_lr = o.lr;
  if (o.freeze == "backbone") {
    // Data-parallel too: the gradient reducer buckets only the parameters that train (the head).
    freeze_backbone(*s.model);
  } else if (o.freeze != "none") {
    throw_data_error("unknown freeze '" + o.freeze + "' (expected none or backbone)");
  }
  s.optimizer = std::make_unique<Optimizer>(
      s.model->parameters(), optimizer_options(o.optimizer, o.lr, o.weight_decay, o.momentum, o.nesterov));
  const auto classes = static_cast<std::int64_t>(s.manifest.classes.size());
  s.confusion = at::zeros({classes, classes}, at::kLong);
  if (!o.process_group.empty()) {
    if (o.bucket_bytes < 1 || o.first_bucket_bytes < 1) {
      throw_data_error("gradient bucket sizes must be positive, got " + std::to_string(o.bucket_bytes) + " and " +
                       std::to_string(o.first_bucket_bytes) + " bytes");
    }
    s.group = std::make_unique<detail::ProcessGroup>(o.process_group);
    // Identical initial weights on every rank, as DDP's constructor makes them.
    s.broadcast_from_rank0(/*parameters=*/true);
  }
}

Trainer::~Trainer() = default;

EpochMetrics Trainer::run_epoch(const ProgressFn& progress, const StepMetricsFn& on_steps, std::int64_t every_n_steps) {
  State& s = *state_;
  const auto started = Clock::now();
  if (on_steps && every_n_steps < 1) {
    throw_data_error("every_n_steps must be at least 1, got " + std::to_string(every_n_steps));
  }
  EpochMetrics metrics;
  metrics.epoch = s.epoch + 1;
  metrics.learning_rate = s.optimizer->lr();
  s.communication_seconds = 0;
  train_epoch(metrics, progress, on_steps, every_n_steps);
  evaluate(metrics);
  metrics.communication_seconds = s.communication_seconds;
  s.epoch += 1;
  s.optimizer->set_lr(s.base_lr * std::pow(s.options.gamma, static_cast<double>(s.epoch)));
  metrics.seconds = std::chrono::duration<double>(Clock::now() - started).count();
  s.history.push_back(metrics);
  return metrics;
}

void Trainer::train_epoch(EpochMetrics& metrics, const ProgressFn& progress, const StepMetricsFn& on_steps,
                          std::int64_t every_n_steps) {
  State& s = *state_;
  const std::int64_t batch_size = s.options.train_batch_size;
  ProgressThrottle throttle(progress);
  RandomStreamScope stream(s.torch_stream, torch::kCPU);
  std::optional<RandomStreamScope> device_stream;
  if (s.device.is_cuda()) device_stream.emplace(s.device_stream, s.device);
  s.model->train();
  // Every rank draws the same permutation; with W ranks, DistributedSampler's rule: padded to a
  // multiple of W by repeating it from the start, rank r takes positions r, r + W, r + 2W, ...
  at::Tensor order = at::randperm(s.train_count, s.shuffle, at::TensorOptions().dtype(at::kLong));
  const std::int64_t world = s.world_size();
  if (world > 1) {
    const std::int64_t padded = (order.size(0) + world - 1) / world * world;
    if (padded > order.size(0)) {
      const std::int64_t repeats = (padded + order.size(0) - 1) / order.size(0);
      order = order.repeat({repeats}).slice(0, 0, padded);
    }
    order = order.slice(0, s.rank(), padded, world);
  }
  const std::int64_t train_size = order.size(0);  // this rank's share of the epoch
  if (s.train_loader) {
    // The loader reads the samples of this order (the subset's indices when train_limit picked one);
    // the epoch seeds each sample's augmentation, drawn as for its position in the global epoch.
    s.train_loader->start_epoch(s.train_subset.defined() ? s.train_subset.index_select(0, order) : order,
                                static_cast<std::uint64_t>(s.epoch), static_cast<std::uint64_t>(s.rank()),
                                static_cast<std::uint64_t>(world));
  } else {
    order = order.to(s.device);
  }
  const std::int64_t batches = (train_size + batch_size - 1) / batch_size;
  at::Tensor loss_sum = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(s.device));
  at::Tensor correct = at::zeros({}, at::TensorOptions().dtype(at::kLong).device(s.device));
  std::optional<Bf16WorkingWeights> working_weights;
  if (s.bf16() && s.device.is_cpu()) working_weights.emplace(s.model->parameters(), *s.optimizer);
  // Gradient averaging hooks on the parameters as this epoch trains them (bf16 working copies included).
  std::optional<detail::GradientReducer> reducer;
  if (s.group) reducer.emplace(*s.group, s.model->parameters(), s.options.bucket_bytes, s.options.first_bucket_bytes);
  // Dropout masks as one process would draw them for the global batch (DropoutStream).
  s.dropout.row_start = static_cast<std::uint64_t>(s.rank());
  s.dropout.row_stride = static_cast<std::uint64_t>(world);
  std::optional<StepWindow> window;
  if (on_steps) window.emplace(s.epoch * batches, s.optimizer->lr(), s.device);
  for (std::int64_t batch = 0; batch < batches; ++batch) {
    at::Tensor pixels, y;
    if (s.train_loader) {
      std::tie(pixels, y) = s.loaded_batch(*s.train_loader);
    } else {
      const at::Tensor indices = order.slice(0, batch * batch_size, std::min(train_size, (batch + 1) * batch_size));
      pixels = s.train_images.index_select(0, indices);
      y = s.train_labels.index_select(0, indices);
    }
    const at::Tensor x = s.normalise(pixels);
    s.optimizer->zero_grad();
    const at::Tensor logits = s.forward(x);
    const at::Tensor loss = at::cross_entropy_loss(logits.to(at::kFloat), y);
    loss.backward();
    if (reducer) reducer->finish();
    s.optimizer->step();
    {
      c10::NoGradGuard no_grad;
      loss_sum.add_(loss.detach() * static_cast<double>(y.size(0)));
      correct.add_(logits.argmax(1).eq(y).sum());
    }
    // On the CPU the loss is at hand, so divergence is caught at once; on a GPU at the epoch's end.
    if (s.device.is_cpu() && !std::isfinite(loss.item<float>())) throw divergence(metrics, batch + 1, batches);
    if (window) window->add(loss, y.size(0), every_n_steps, on_steps);
    if (progress) throttle.report(batch + 1, batches, /*force=*/batch + 1 == batches);
  }
  if (s.train_loader) metrics.data_wait_seconds = s.train_loader->wait_seconds();
  if (reducer) s.communication_seconds += reducer->wait_seconds();
  reducer.reset();
  s.dropout.row_start = 0;
  s.dropout.row_stride = 1;
  working_weights.reset();  // float32 weights back in the model for evaluation and checkpoints
  // Over every rank's images (padding repeats included, as DistributedSampler's epoch has them).
  at::Tensor totals =
      at::stack({loss_sum, correct.to(at::kDouble), at::full({}, static_cast<double>(train_size), loss_sum.options())});
  s.all_reduce(totals);
  totals = totals.cpu();
  const double total_loss = totals[0].item<double>();
  const double images = totals[2].item<double>();
  if (!std::isfinite(total_loss)) throw divergence(metrics, batches, batches);
  metrics.train_loss = total_loss / images;
  metrics.train_accuracy = totals[1].item<double>() / images;
}

void Trainer::evaluate(EpochMetrics& metrics) {
  State& s = *state_;
  c10::NoGradGuard no_grad;
  // Rank 0's batch-norm statistics everywhere, as DDP's per-forward buffer broadcast leaves them.
  s.broadcast_from_rank0(/*parameters=*/false);
  // bf16 evaluation runs on an inference copy laid out as Predictor's (weights cast once, no layout
  // copies on the way): the same function, ~1.8x faster than autocast re-casting every batch.
  const std::shared_ptr<Classifier> evaluated =
      s.bf16() ? detail::inference_copy(*s.model, s.spec, /*bf16=*/true, /*channels_last=*/true) : s.model;
  // The evaluation also calibrates int8 inference: the activations' ranges over the test split.
  detail::ActivationObserver observer;
  // Eval mode and the observer until the evaluation ends, however it ends.
  struct EvaluationScope {
    EvaluationScope(Classifier& model, detail::ActivationObserver& observer) : model(model) {
      model.eval();
      model.set_activation_observer(&observer);
    }
    ~EvaluationScope() {
      model.set_activation_observer(nullptr);
      model.train();
    }
    Classifier& model;
  } evaluation(*evaluated, observer);
  const std::int64_t test_size = s.test_count;
  const auto classes = static_cast<std::int64_t>(s.manifest.classes.size());
  at::Tensor test_loss = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(s.device));
  at::Tensor pairs = at::zeros({classes * classes}, at::TensorOptions().dtype(at::kLong).device(s.device));
  // Each rank evaluates its contiguous share of the test split; the sums are reduced below.
  const std::int64_t shard_begin = test_size * s.rank() / s.world_size();
  const std::int64_t shard_end = test_size * (s.rank() + 1) / s.world_size();
  if (s.test_loader) {
    at::Tensor shard = at::arange(shard_begin, shard_end, at::TensorOptions().dtype(at::kLong));
    s.test_loader->start_epoch(s.test_subset.defined() ? s.test_subset.index_select(0, shard) : shard, 0);
  }
  for (std::int64_t begin = shard_begin; begin < shard_end; begin += s.options.test_batch_size) {
    const std::int64_t end = std::min(shard_end, begin + s.options.test_batch_size);
    at::Tensor pixels, y;
    if (s.test_loader) {
      std::tie(pixels, y) = s.loaded_batch(*s.test_loader);
    } else {
      pixels = s.test_images.slice(0, begin, end);
      y = s.test_labels.slice(0, begin, end);
    }
    const at::Tensor x = s.normalise(pixels);
    const at::Tensor logits = s.evaluation_logits(*evaluated, x);
    test_loss.add_(at::cross_entropy_loss(logits, y, {}, at::Reduction::Sum));
    pairs.add_(at::bincount(y * classes + logits.argmax(1), {}, classes * classes));
  }
  s.calibration = {observer.maxima(), observer.images()};
  if (s.group) {
    // Counts below 2^53 are exact in double: one all-reduce for the loss and the confusion matrix.
    at::Tensor sums = at::cat({test_loss.view({1}), pairs.to(at::kDouble)});
    s.all_reduce(sums);
    test_loss = sums[0];
    pairs = sums.slice(0, 1).round().to(at::kLong);
    // int8 calibration over the whole split: the largest activation any rank saw.
    const auto on_device = at::TensorOptions().dtype(at::kDouble).device(s.device);  // NCCL reduces GPU tensors
    at::Tensor maxima = at::tensor(s.calibration.activation_max, at::kDouble).to(s.device);
    at::Tensor images = at::full({1}, static_cast<double>(s.calibration.images), on_device);
    if (maxima.numel() > 0) s.all_reduce(maxima, /*max=*/true);
    s.all_reduce(images);
    maxima = maxima.cpu();
    s.calibration.activation_max.assign(maxima.data_ptr<double>(), maxima.data_ptr<double>() + maxima.numel());
    s.calibration.images = static_cast<std::int64_t>(images.item<double>());
  }
  s.confusion = pairs.view({classes, classes}).cpu();
  metrics.test_loss = test_loss.item<double>() / static_cast<double>(test_size);
  metrics.test_accuracy =
      static_cast<double>(s.confusion.diagonal().sum().item<std::int64_t>()) / static_cast<double>(test_size);
  if (!std::isfinite(metrics.test_loss)) {
    throw TrainingError("evaluation after epoch " + std::to_string(metrics.epoch) +
                        " gave a NaN or inf loss; lower lr or check the data");
  }
}

std::vector<std::string> Trainer::load_pretrained(const c10::IValue& state, const std::string& source) {
  State& s = *state_;
  if (s.epoch > 0) {
    throw_data_error("pretrained weights load before the first epoch, not after epoch " + std::to_string(s.epoch));
  }
  return kiln::load_pretrained(*s.model, s.spec, state, source).adaptations;
}

at::Tensor Trainer::confusion_matrix() const {
  return state_->confusion.clone();
}

void Trainer::save_checkpoint(const std::filesystem::path& path) const {
  const State& s = *state_;
  TrainingState state;
  state.model.spec = s.spec;
  state.model.classes = s.manifest.classes;
  state.model.mean = s.manifest.mean;
  state.model.std = s.manifest.std;
  state.model.stored_image = s.manifest.image;
  state.model.eval_transform = s.options.eval_transform;
  state.model.epoch = s.epoch;
  state.model.state_dict = module_state_dict(*s.model);
  state.model.calibration = s.calibration;
  state.optimizer = s.optimizer->state_dict();
  state.base_lr = s.base_lr;
  state.gamma = s.options.gamma;
  state.lr = s.optimizer->lr();
  state.history = s.history;
  // Copies: the file must hold the only reference (write_checkpoint).
  state.torch_cpu_rng = s.torch_stream.clone();
  if (s.device_stream.defined()) state.torch_device_rng = s.device_stream.clone();
  {
    at::Generator shuffle = s.shuffle;
    std::lock_guard<std::mutex> lock(shuffle.mutex());
    state.shuffle_rng = shuffle.get_state();
  }
  state.dropout_seed = s.dropout.seed;
  state.dropout_offset = s.dropout.offset;
  state.options = s.options;
  write_checkpoint(path, std::move(state));
}

void Trainer::load_checkpoint(const std::filesystem::path& path) {
  State& s = *state_;
  TrainingState saved = read_training_state(read_checkpoint(path), path);
  const ModelSpec& spec = saved.model.spec;
  if (spec.name != s.spec.name || spec.in_channels != s.spec.in_channels || spec.num_classes != s.spec.num_classes ||
      spec.height != s.spec.height || spec.width != s.spec.width) {
    throw_data_error("checkpoint '" + path.string() + "' holds a " + spec.name + " for " +
                     std::to_string(spec.num_classes) + " classes of " + std::to_string(spec.height) + "x" +
                     std::to_string(spec.width) + "x" + std::to_string(spec.in_channels) +
                     ", not the model this run trains (" + s.spec.name + " for " + std::to_string(s.spec.num_classes) +
                     " classes of " + to_string(s.manifest.image) + ")");
  }
  if (saved.model.classes != s.manifest.classes) {
    throw_data_error("checkpoint '" + path.string() + "' was trained on other classes than '" +
                     s.options.data_dir.string() + "' holds");
  }
  // Resuming under another evaluation transform would change what the checkpoint says inference applies.
  if (saved.model.stored_image != s.manifest.image || saved.model.eval_transform != s.options.eval_transform) {
    throw_data_error("checkpoint '" + path.string() + "' was trained on " + to_string(saved.model.stored_image) +
                     " images with another evaluation transform (transforms.eval) than this run's on " +
                     to_string(s.manifest.image) + "; resume with the same processed images and transforms.eval");
  }
  try {
    load_module_state_dict(*s.model, saved.model.state_dict, "checkpoint '" + path.string() + "'");
    s.optimizer->load_state_dict(saved.optimizer);
    std::lock_guard<std::mutex> lock(s.shuffle.mutex());
    s.shuffle.set_state(saved.shuffle_rng);
  } catch (const c10::Error& error) {
    throw_data_error("checkpoint '" + path.string() + "' is incomplete: " + error.what_without_backtrace());
  }
  s.base_lr = saved.base_lr;
  s.epoch = saved.model.epoch;
  s.history = std::move(saved.history);
  s.calibration = saved.model.calibration;
  s.torch_stream = saved.torch_cpu_rng.clone();
  s.dropout.seed = saved.dropout_seed;
  s.dropout.offset = saved.dropout_offset;
  if (s.device_stream.defined() && saved.torch_device_rng.defined()) s.device_stream = saved.torch_device_rng.clone();
  // Every rank loaded the same file; rank 0's weights make sure of it.
  s.broadcast_from_rank0(/*parameters=*/true);
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
  return state_->train_count;
}
std::int64_t Trainer::test_size() const {
  return state_->test_count;
}
double Trainer::data_wait_seconds() const {
  return state_->train_loader ? state_->train_loader->wait_seconds() : 0.0;
}
bool Trainer::streams_data() const {
  return state_->streamed;
}
int Trainer::rank() const {
  return state_->rank();
}
int Trainer::world_size() const {
  return state_->world_size();
}

}  // namespace kiln
