#include "kiln/loader.hpp"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "kiln/detail/isa_dispatch.hpp"
#include "kiln/error.hpp"

namespace kiln {

SampleSource SampleSource::resident(at::Tensor images, at::Tensor labels) {
  if (images.scalar_type() != at::kByte || images.dim() != 4 || !images.is_cpu() || labels.scalar_type() != at::kLong ||
      labels.dim() != 1 || labels.size(0) != images.size(0)) {
    throw_data_error("a resident sample source needs uint8 images [N, C, H, W] and int64 labels [N] on the CPU");
  }
  SampleSource source;
  source.images_ = images.contiguous();
  source.labels_ = labels.contiguous();
  source.image_ = {static_cast<int>(images.size(1)), static_cast<int>(images.size(2)),
                   static_cast<int>(images.size(3))};
  return source;
}

SampleSource SampleSource::streamed(std::shared_ptr<const SplitReader> reader) {
  SampleSource source;
  source.labels_ = reader->labels();
  source.image_ = reader->image();
  source.reader_ = std::move(reader);
  return source;
}

std::int64_t SampleSource::size() const {
  return labels_.size(0);
}
const ImageSpec& SampleSource::image() const {
  return image_;
}
const at::Tensor& SampleSource::labels() const {
  return labels_;
}

namespace {

using Clock = std::chrono::steady_clock;

// One batch buffer of the ring: filled by one worker, lent to the loop by next(), then free again.
struct Slot {
  enum class Stage { free, filling, ready, lent };
  Stage stage = Stage::free;
  std::int64_t batch = -1;
  std::int64_t rows = 0;
  at::Tensor images;
  at::Tensor labels;
  std::exception_ptr error;
};

}  // namespace

struct BatchLoader::State {
  SampleSource source;
  ImageTransform transform;
  LoaderOptions options;
  ImageSpec output;
  // Normalisation in the workers (LoaderOptions::mean/std): pixel * scale[c] + offset[c].
  std::vector<float> scale;
  std::vector<float> offset;

  std::mutex mutex;
  std::condition_variable work_ready;  // workers wait for a batch to fill
  std::condition_variable slot_done;   // next() and start_epoch() wait for workers
  std::vector<Slot> slots;
  std::vector<std::thread> workers;
  bool shutdown = false;
  int busy = 0;  // workers filling a slot

  // The epoch in progress.
  at::Tensor order;
  std::uint64_t epoch = 0;
  std::uint64_t first_position = 0;
  std::uint64_t position_stride = 1;
  std::int64_t batches = 0;
  std::int64_t next_to_fill = 0;
  std::int64_t next_to_return = 0;
  int lent = -1;  // the slot next() returned last
  double wait_seconds = 0;

  Slot& slot_of(std::int64_t batch) { return slots[static_cast<std::size_t>(batch % std::ssize(slots))]; }

  void fill(const Slot& slot, std::int64_t batch, const std::int64_t* order_data, std::int64_t order_size,
            std::uint64_t epoch_number, std::vector<std::uint8_t>& stored, std::vector<std::uint8_t>& decoded,
            std::vector<std::uint8_t>& transformed) const;
  // Writes one uint8 CHW image of the output's shape as normalised floats into batch row `row`.
  void normalise_into(const std::uint8_t* pixels, float* images, std::int64_t row) const;
  void work();
};

// Reads, decodes and transforms the samples of `batch` into `slot`. Runs without the lock: the slot is
// this worker's until it is marked ready.
void BatchLoader::State::fill(const Slot& slot, std::int64_t batch, const std::int64_t* order_data,
                              std::int64_t order_size, std::uint64_t epoch_number, std::vector<std::uint8_t>& stored,
                              std::vector<std::uint8_t>& decoded, std::vector<std::uint8_t>& transformed) const {
  const std::int64_t begin = batch * options.batch_size;
  const std::int64_t rows = std::min(order_size, begin + options.batch_size) - begin;
  const ImageSpec& image = source.image();
  const std::int64_t out_bytes = output.bytes();
  const bool normalising = !scale.empty();
  std::uint8_t* out = normalising ? nullptr : slot.images.data_ptr<std::uint8_t>();
  std::int64_t* labels = slot.labels.data_ptr<std::int64_t>();
  const std::int64_t* all_labels = source.labels().data_ptr<std::int64_t>();
  const SplitReader* reader = source.reader();
  const bool encoded = reader && reader->storage() == Storage::encoded;
  // Without normalisation, identity samples go straight into the batch; otherwise through a row buffer.
  const bool identity = transform.identity() && !normalising;
  if (normalising) transformed.resize(static_cast<std::size_t>(out_bytes));
  for (std::int64_t row = 0; row < rows; ++row) {
    const std::int64_t index = order_data[begin + row];
    if (index < 0 || index >= source.size()) {
      throw_data_error("sample index " + std::to_string(index) + " is outside the split's " +
                       std::to_string(source.size()) + " samples");
    }
    std::uint8_t* destination = normalising ? transformed.data() : out + row * out_bytes;
    // The sample's pixels at the dataset's image shape: in memory, read from its shard, or decoded.
    const std::uint8_t* pixels = nullptr;
    if (!reader) {
      pixels = source.images().data_ptr<std::uint8_t>() + index * image.bytes();
    } else if (!encoded) {
      std::uint8_t* target = identity ? destination : (stored.resize(image.bytes()), stored.data());
      reader->read(index, target);
      pixels = target;
    } else {
      stored.resize(static_cast<std::size_t>(reader->sample_bytes(index)));
      reader->read(index, stored.data());
      std::uint8_t* target = identity ? destination : (decoded.resize(image.bytes()), decoded.data());
      const DecodeResult result = decode_into(stored, image, target, options.max_image_pixels);
      if (!result.ok) throw_data_error(reader->describe(index) + " does not decode: " + result.error);
      pixels = target;
    }
    if (!transform.identity()) {
      // Seeded by the sample's position in the epoch: the same draws whichever worker transforms it.
      const auto position = first_position + static_cast<std::uint64_t>(begin + row) * position_stride;
      SampleRandom random(options.seed, epoch_number, position);
      transform.apply(pixels, image.height, image.width, destination, random);
      pixels = destination;
    } else if (!normalising && pixels != destination) {
      std::memcpy(destination, pixels, static_cast<std::size_t>(out_bytes));
    }
    if (normalising) normalise_into(pixels, slot.images.data_ptr<float>(), row);
    labels[row] = all_labels[index];
  }
}

namespace {

// One channel plane: out[i * stride] = in[i] * a + b.
[[gnu::always_inline]] inline void normalise_plane_body(const std::uint8_t* in, std::int64_t plane, float a, float b,
                                                        float* out, std::int64_t stride) {
  if (stride == 1) {
    for (std::int64_t i = 0; i < plane; ++i) out[i] = static_cast<float>(in[i]) * a + b;
  } else {
    for (std::int64_t i = 0; i < plane; ++i) out[i * stride] = static_cast<float>(in[i]) * a + b;
  }
}
KILN_ISA_VARIANTS(void, normalise_plane,
                  (const std::uint8_t* in, std::int64_t plane, float a, float b, float* out, std::int64_t stride),
                  normalise_plane_body(in, plane, a, b, out, stride))

}  // namespace

void BatchLoader::State::normalise_into(const std::uint8_t* pixels, float* images, std::int64_t row) const {
  const std::int64_t channels = output.channels;
  const std::int64_t plane = std::int64_t{output.height} * output.width;
  float* out = images + row * channels * plane;
  for (std::int64_t c = 0; c < channels; ++c) {
    const auto k = static_cast<std::size_t>(c);
    if (options.channels_last) {
      normalise_plane(pixels + c * plane, plane, scale[k], offset[k], out + c, channels);
    } else {
      normalise_plane(pixels + c * plane, plane, scale[k], offset[k], out + c * plane, 1);
    }
  }
}

void BatchLoader::State::work() {
  std::vector<std::uint8_t> stored;
  std::vector<std::uint8_t> decoded;
  std::vector<std::uint8_t> transformed;
  std::unique_lock lock(mutex);
  while (true) {
    work_ready.wait(
        lock, [&] { return shutdown || (next_to_fill < batches && slot_of(next_to_fill).stage == Slot::Stage::free); });
    if (shutdown) return;
    const std::int64_t batch = next_to_fill++;
    Slot& slot = slot_of(batch);
    slot.stage = Slot::Stage::filling;
    slot.batch = batch;
    slot.error = nullptr;
    const at::Tensor order_now = order;  // start_epoch waits for busy == 0 before replacing it
    const std::uint64_t epoch_now = epoch;
    ++busy;
    lock.unlock();
    std::exception_ptr error;
    try {
      fill(slot, batch, order_now.data_ptr<std::int64_t>(), order_now.size(0), epoch_now, stored, decoded, transformed);
    } catch (...) {
      error = std::current_exception();
    }
    lock.lock();
    --busy;
    slot.error = error;
    slot.rows = std::min(order_now.size(0), (batch + 1) * options.batch_size) - batch * options.batch_size;
    slot.stage = Slot::Stage::ready;
    slot_done.notify_all();
  }
}

BatchLoader::BatchLoader(SampleSource source, ImageTransform transform, LoaderOptions options)
    : state_(std::make_unique<State>()) {
  State& s = *state_;
  if (options.batch_size < 1)
    throw_data_error("batch size must be at least 1, got " + std::to_string(options.batch_size));
  if (options.num_workers < 0) {
    throw_data_error("num_workers must be 0 (one per core) or more, got " + std::to_string(options.num_workers));
  }
  if (options.prefetch_batches < 1) {
    throw_data_error("prefetch_batches must be at least 1, got " + std::to_string(options.prefetch_batches));
  }
  s.source = std::move(source);
  s.transform = std::move(transform);
  s.options = options;
  const ImageSpec& image = s.source.image();
  const auto [height, width] = s.transform.output_size(image.height, image.width);
  s.output = {image.channels, height, width};
  const int workers = options.num_workers > 0 ? options.num_workers
                                              : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  s.slots.resize(static_cast<std::size_t>(std::max(2, workers * options.prefetch_batches)));
  if (!options.mean.empty() || !options.std.empty()) {
    if (options.mean.size() != static_cast<std::size_t>(image.channels) || options.std.size() != options.mean.size()) {
      throw_data_error("normalisation needs one mean and std per channel (" + std::to_string(image.channels) +
                       "), got " + std::to_string(options.mean.size()) + " and " + std::to_string(options.std.size()));
    }
    for (std::size_t c = 0; c < options.mean.size(); ++c) {
      if (!(options.std[c] > 0))
        throw_data_error("normalisation's std must be positive, got " + std::to_string(options.std[c]));
      // The trainer's Normalizer's constants (kiln/normalize.hpp).
      s.scale.push_back(static_cast<float>(1.0 / (255.0 * options.std[c])));
      s.offset.push_back(static_cast<float>(-options.mean[c] / options.std[c]));
    }
  }
  const auto pixels = at::TensorOptions()
                          .dtype(s.scale.empty() ? at::kByte : at::kFloat)
                          .pinned_memory(options.pin_memory)
                          .memory_format(options.channels_last && !s.scale.empty() ? at::MemoryFormat::ChannelsLast
                                                                                   : at::MemoryFormat::Contiguous);
  for (auto& slot : s.slots) {
    slot.images = at::empty({options.batch_size, s.output.channels, s.output.height, s.output.width}, pixels);
    slot.labels =
        at::empty({options.batch_size}, at::TensorOptions().dtype(at::kLong).pinned_memory(options.pin_memory));
  }
  s.workers.reserve(static_cast<std::size_t>(workers));
  for (int i = 0; i < workers; ++i) s.workers.emplace_back([&s] { s.work(); });
}

BatchLoader::~BatchLoader() {
  State& s = *state_;
  {
    std::lock_guard lock(s.mutex);
    s.shutdown = true;
  }
  s.work_ready.notify_all();
  for (auto& worker : s.workers) worker.join();
}

void BatchLoader::start_epoch(at::Tensor order, std::uint64_t epoch, std::uint64_t first_position,
                              std::uint64_t position_stride) {
  State& s = *state_;
  if (order.scalar_type() != at::kLong || order.dim() != 1) {
    throw_data_error("a loader's order must be int64 sample indices [N]");
  }
  order = order.to(at::kCPU).contiguous();
  std::unique_lock lock(s.mutex);
  // Batches of an epoch left early are abandoned: stop handing them out and let running fills finish.
  s.batches = 0;
  s.slot_done.wait(lock, [&] { return s.busy == 0; });
  for (auto& slot : s.slots) {
    slot.stage = Slot::Stage::free;
    slot.error = nullptr;
  }
  s.order = std::move(order);
  s.epoch = epoch;
  s.first_position = first_position;
  s.position_stride = position_stride;
  s.batches = (s.order.size(0) + s.options.batch_size - 1) / s.options.batch_size;
  s.next_to_fill = 0;
  s.next_to_return = 0;
  s.lent = -1;
  s.wait_seconds = 0;
  lock.unlock();
  s.work_ready.notify_all();
}

std::optional<Batch> BatchLoader::next() {
  State& s = *state_;
  std::unique_lock lock(s.mutex);
  if (s.lent >= 0) {
    s.slots[static_cast<std::size_t>(s.lent)].stage = Slot::Stage::free;
    s.lent = -1;
    s.work_ready.notify_all();
  }
  if (s.next_to_return >= s.batches) return std::nullopt;
  const std::int64_t batch = s.next_to_return;
  Slot& slot = s.slot_of(batch);
  const auto ready = [&] { return slot.stage == Slot::Stage::ready && slot.batch == batch; };
  if (!ready()) {
    const auto started = Clock::now();
    s.slot_done.wait(lock, ready);
    s.wait_seconds += std::chrono::duration<double>(Clock::now() - started).count();
  }
  ++s.next_to_return;
  s.lent = static_cast<int>(batch % std::ssize(s.slots));
  slot.stage = Slot::Stage::lent;
  if (slot.error) {
    // The epoch cannot go on: no further batches, and the failure to the caller.
    s.batches = s.next_to_return;
    std::rethrow_exception(slot.error);
  }
  return Batch{slot.images.narrow(0, 0, slot.rows), slot.labels.narrow(0, 0, slot.rows), batch};
}

double BatchLoader::wait_seconds() const {
  std::lock_guard lock(state_->mutex);
  return state_->wait_seconds;
}

ImageSpec BatchLoader::output_image() const {
  return state_->output;
}

}  // namespace kiln
