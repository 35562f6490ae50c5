#include "kiln/predictor.hpp"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <atomic>

#include "kiln/checkpoint.hpp"
#include "kiln/detail/autocast.hpp"
#include "kiln/detail/inference.hpp"
#include "kiln/detail/torchvision_models.hpp"
#include "kiln/error.hpp"
#include "kiln/int8.hpp"
#include "kiln/normalize.hpp"

namespace kiln {

std::int64_t DecodedBatch::decoded() const {
  return static_cast<std::int64_t>(std::count(errors.begin(), errors.end(), std::string()));
}

DecodedBatch decode_batch(const std::vector<EncodedImage>& encoded, const ImageSpec& spec,
                          std::int64_t max_image_pixels) {
  const auto count = static_cast<std::int64_t>(encoded.size());
  DecodedBatch batch;
  batch.images = at::zeros({count, spec.channels, spec.height, spec.width}, at::kByte);
  batch.errors.resize(encoded.size());
  batch.conversions.resize(encoded.size());
  std::uint8_t* pixels = batch.images.data_ptr<std::uint8_t>();
  // A small image decodes in microseconds: only batches of several images are worth a thread each.
  constexpr std::int64_t kImagesPerTask = 8;
  at::parallel_for(0, count, kImagesPerTask, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t i = begin; i < end; ++i) {
      std::uint8_t* out = pixels + i * spec.bytes();
      DecodeResult result = decode_into(encoded[i], spec, out, max_image_pixels);
      if (result.ok) {
        batch.conversions[i] = std::move(result.conversion);
      } else {
        std::fill(out, out + spec.bytes(), std::uint8_t{0});
        batch.errors[i] = result.error.empty() ? "not a decodable image" : std::move(result.error);
      }
    }
  });
  return batch;
}

namespace {

// `images` (uint8 [N, C, H, W], contiguous) through `transform` on torch's intra-op threads; the same
// pixels whichever thread transforms an image, since evaluation transforms draw no random numbers.
at::Tensor transform_batch(const at::Tensor& images, const ImageTransform& transform, const ImageSpec& input) {
  const std::int64_t count = images.size(0);
  const auto height = static_cast<int>(images.size(2));
  const auto width = static_cast<int>(images.size(3));
  at::Tensor out = at::empty({count, input.channels, input.height, input.width}, at::kByte);
  const std::uint8_t* in = images.data_ptr<std::uint8_t>();
  std::uint8_t* pixels = out.data_ptr<std::uint8_t>();
  const std::int64_t in_bytes = images.stride(0);
  // A resize is worth a thread from a few images on; a crop alone is a copy, but cheap either way.
  constexpr std::int64_t kImagesPerTask = 4;
  at::parallel_for(0, count, kImagesPerTask, [&](std::int64_t begin, std::int64_t end) {
    SampleRandom unused(0);
    for (std::int64_t i = begin; i < end; ++i) {
      transform.apply(in + i * in_bytes, height, width, pixels + i * input.bytes(), unused);
    }
  });
  return out;
}

}  // namespace

struct Predictor::State {
  CheckpointModel saved;
  ImageTransform transform;  // the checkpoint's evaluation transform: stored images -> the model's input
  torch::Device device{torch::kCPU};
  Precision precision = Precision::fp32;
  std::string int8_unavailable;
  std::unique_ptr<Int8Classifier> int8;  // with int8 precision, instead of `model`
  std::shared_ptr<Classifier> model;
  Normalizer normalizer;
  bool bf16 = false;
  std::atomic<std::int64_t> max_image_pixels{kDefaultMaxImagePixels};
};

Predictor::Predictor(const std::filesystem::path& checkpoint, const std::string& device, Precision precision,
                     std::optional<Precision> int8_fallback)
    : state_(std::make_unique<State>()) {
  State& s = *state_;
  try {
    s.device = torch::Device(device);
  } catch (const c10::Error&) {
    throw_data_error("unknown device '" + device + "' (expected cpu, cuda or cuda:N)");
  }
  s.saved = checkpoint_model(read_checkpoint(checkpoint), checkpoint);
  s.transform = ImageTransform::evaluation(s.saved.eval_transform, s.saved.stored_image.channels);
  s.model = make_model(s.saved.spec);
  // Also what checks every weight is there with its shape, for int8 too.
  load_module_state_dict(*s.model, s.saved.state_dict, "checkpoint '" + checkpoint.string() + "'");
  if (precision == Precision::int8) {
    s.int8_unavailable = s.device.is_cpu() ? int8_unavailable_reason(s.saved) : "int8 inference runs on the CPU";
    if (s.int8_unavailable.empty()) {
      s.int8 = std::make_unique<Int8Classifier>(s.saved);
      s.precision = precision;
      s.saved.state_dict = c10::IValue();
      s.model.reset();
      return;
    }
    if (!int8_fallback || *int8_fallback == Precision::int8) {
      throw_data_error("cannot predict in int8 with '" + checkpoint.string() + "': " + s.int8_unavailable);
    }
    precision = *int8_fallback;
  }
  s.saved.state_dict = c10::IValue();  // the weights now live in the model
  s.precision = precision;
  s.bf16 = precision == Precision::bf16;
  const bool bf16 = s.bf16;
  s.model->to(s.device);
  // Every model in every precision computes on channels-last tensors, as it trains: in fp32 on the CPU
  // (one thread, AVX-512 and AVX2) 1.0-5x NCHW's images/s; mnist_cnn 1.4-2.3x, MobileNetV3 and
  // EfficientNet up to 5x at 32 px and 1.1-1.9x at 224 px. ResNets' late stages, whose maps hold fewer
  // values than their weights, run contiguous in fp32, as they train (detail::LayoutSplit), sized for
  // the slices predict() runs: all channels-last, ResNet-34/50 on 32-64 px in batches of 64 reached only
  // 0.6-0.9x NCHW on AVX-512 (oneDNN's channels-last convolutions of 1x1 and 2x2 maps); so split, 1.04-1.23x.
  detail::prepare_for_inference(*s.model, bf16, /*channels_last=*/true);
  if (!bf16 && s.device.is_cpu()) {
    if (auto* split = dynamic_cast<detail::LayoutSplit*>(s.model.get())) {
      split->contiguous_late_layers(detail::kInferenceSlice);
    }
  }
  s.normalizer = Normalizer(s.saved.mean, s.saved.std, s.device);
}

Predictor::~Predictor() = default;

at::Tensor Predictor::predict(const at::Tensor& images) const {
  const State& s = *state_;
  const ImageSpec spec = image_spec();
  at::Tensor batch = images.dim() == 3 ? images.unsqueeze(0) : images;
  if (batch.scalar_type() != at::kByte || batch.dim() != 4 || batch.size(1) != spec.channels ||
      batch.size(2) != spec.height || batch.size(3) != spec.width) {
    const ImageSpec input = input_spec();
    const std::string stored = input == spec ? ""
                                             : " (the processed images the model was trained on; its evaluation "
                                               "transform brings them to the model's " +
                                                   to_string(input) + ")";
    throw_data_error("expected uint8 images of shape [N, " + std::to_string(spec.channels) + ", " +
                     std::to_string(spec.height) + ", " + std::to_string(spec.width) + "]" + stored + ", got " +
                     std::string(c10::toString(images.scalar_type())) + " " + c10::str(images.sizes()));
  }
  // The transform reads host memory: pixels on a GPU come to the CPU for it (the model's input goes back).
  if (!s.transform.identity()) batch = transform_batch(batch.cpu().contiguous(), s.transform, input_spec());
  c10::NoGradGuard no_grad;
  detail::AutocastScope autocast(s.device, s.bf16);
  const auto classes = static_cast<std::int64_t>(s.saved.classes.size());
  const at::Tensor logits = detail::forward_in_slices(batch, classes, s.device, [&](const at::Tensor& pixels) {
    if (s.int8) return s.int8->forward(pixels);  // takes the pixels as they are: normalisation is in its conv1
    return s.model->forward(s.normalizer(pixels.to(s.device)).contiguous(at::MemoryFormat::ChannelsLast));
  });
  return at::softmax(logits, 1).cpu();
}

DecodedBatch Predictor::preprocess(const std::vector<EncodedImage>& encoded) const {
  DecodedBatch batch = decode_batch(encoded, image_spec(), max_image_pixels());
  if (!state_->transform.identity()) batch.images = transform_batch(batch.images, state_->transform, input_spec());
  return batch;
}

Predictor::EncodedPredictions Predictor::predict_encoded(const std::vector<EncodedImage>& encoded) const {
  DecodedBatch batch = decode_batch(encoded, image_spec(), max_image_pixels());
  const auto classes = static_cast<std::int64_t>(state_->saved.classes.size());
  const std::int64_t decoded = batch.decoded();
  EncodedPredictions result;
  result.errors = std::move(batch.errors);
  result.conversions = std::move(batch.conversions);
  if (decoded == static_cast<std::int64_t>(encoded.size())) {
    result.probabilities = predict(batch.images);
    return result;
  }
  // Only the decodable images go through the model; the others keep a zero row.
  std::vector<std::int64_t> rows;
  rows.reserve(decoded);
  for (std::size_t i = 0; i < result.errors.size(); ++i) {
    if (result.errors[i].empty()) rows.push_back(static_cast<std::int64_t>(i));
  }
  result.probabilities = at::zeros({static_cast<std::int64_t>(encoded.size()), classes}, at::kFloat);
  if (!rows.empty()) {
    const at::Tensor index = at::tensor(rows, at::kLong);
    result.probabilities.index_copy_(0, index, predict(batch.images.index_select(0, index)));
  }
  return result;
}

const std::vector<std::string>& Predictor::classes() const {
  return state_->saved.classes;
}
ImageSpec Predictor::image_spec() const {
  return state_->saved.stored_image;
}
ImageSpec Predictor::input_spec() const {
  const ModelSpec& spec = state_->saved.spec;
  return {spec.in_channels, spec.height, spec.width};
}
const EvalTransformOptions& Predictor::eval_transform() const {
  return state_->saved.eval_transform;
}
const ModelSpec& Predictor::model_spec() const {
  return state_->saved.spec;
}
std::int64_t Predictor::epoch() const {
  return state_->saved.epoch;
}
Precision Predictor::precision() const {
  return state_->precision;
}
const std::string& Predictor::int8_unavailable() const {
  return state_->int8_unavailable;
}
std::int64_t Predictor::max_image_pixels() const {
  return state_->max_image_pixels.load(std::memory_order_relaxed);
}
void Predictor::set_max_image_pixels(std::int64_t pixels) {
  if (pixels < 1) throw_data_error("max_image_pixels must be at least 1, got " + std::to_string(pixels));
  state_->max_image_pixels.store(pixels, std::memory_order_relaxed);
}

}  // namespace kiln
