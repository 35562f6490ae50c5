// torchvision.transforms.v2's augmentation and evaluation transforms on uint8 CHW pixels.
//
// Parity with torchvision is by construction: the resampling is the ATen op torchvision itself runs on
// uint8 tensors (_upsample_bilinear2d_aa), and the colour adjustments redo, per pixel, the float32
// arithmetic torchvision's tensor ops perform (ATen's vectorised a + alpha * b is one fused multiply-add,
// so std::fma here; products and quotients are rounded the same way; uint8 results are truncated).
#include "kiln/augment.hpp"

#include <ATen/Parallel.h>
#include <ATen/ops/_upsample_bilinear2d_aa.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <stdexcept>

#include "kiln/detail/isa_dispatch.hpp"
#include "kiln/error.hpp"

// The OpenMP runtime LibTorch runs its intra-op threads on (weak: a LibTorch without OpenMP has none).
extern "C" void omp_set_num_threads(int) __attribute__((weak));

namespace kiln {
namespace {

constexpr std::uint64_t kGolden = 0x9e3779b97f4a7c15ULL;

// splitmix64's output function: a bijection whose every output bit depends on every input bit.
std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

std::uint64_t rotl(std::uint64_t x, int k) {
  return (x << k) | (x >> (64 - k));
}

std::uint64_t stream_key(std::uint64_t seed, std::uint64_t epoch, std::uint64_t position) {
  std::uint64_t key = mix64(seed + kGolden);
  key = mix64((key ^ epoch) + kGolden);
  return mix64((key ^ position) + kGolden);
}

// Python's round() (half to even), which torchvision's size computations use.
double round_half_even(double value) {
  return std::nearbyint(value);
}

std::string number(double value) {
  std::ostringstream text;
  text << value;
  return text.str();
}

std::string range_text(double low, double high) {
  return "[" + number(low) + ", " + number(high) + "]";
}

void check(bool ok, const std::string& key, const std::string& value, const std::string& expected) {
  if (!ok) throw_data_error(key + " is " + value + ": expected " + expected);
}

void check_range(double low, double high, bool zero_allowed, double upper, const std::string& key,
                 const std::string& expected) {
  const bool ok =
      std::isfinite(low) && std::isfinite(high) && (zero_allowed ? low >= 0 : low > 0) && low <= high && high <= upper;
  check(ok, key, range_text(low, high), expected);
}

void check_size(std::pair<int, int> size, const std::string& key) {
  check(size.first >= 1 && size.second >= 1, key, range_text(size.first, size.second),
        "[height, width] of at least 1 pixel each");
}

// Runs ATen on the calling thread alone while alive. LibTorch's OpenMP parallel_for would start a team of
// threads for every thread that calls it (every loader worker: workers x cores threads); c10::ParallelGuard
// does not stop that in torch 2.13, since at::in_parallel_region() asks omp_in_parallel() only. OpenMP's
// thread count is per thread, so setting it here leaves the caller's other threads alone.
class IntraOpInline {
 public:
  IntraOpInline() {
    if (omp_set_num_threads == nullptr || at::in_parallel_region()) return;
    // Also runs ATen's per-thread initialisation, which would otherwise reset the count on first use.
    const int threads = at::get_num_threads();
    if (threads > 1) {
      omp_set_num_threads(1);
      previous_ = threads;
    }
  }
  ~IntraOpInline() {
    if (previous_ > 0) omp_set_num_threads(previous_);
  }
  IntraOpInline(const IntraOpInline&) = delete;
  IntraOpInline& operator=(const IntraOpInline&) = delete;

 private:
  int previous_ = 0;
};

// Copies `box` of a C x height x width image into `out` (C x box.height x box.width); pixels of the box
// outside the image are 0, as torchvision's crop pads them.
void copy_box(const std::uint8_t* in, int channels, int height, int width, const CropBox& box, std::uint8_t* out) {
  const int first_column = std::clamp(-box.left, 0, box.width);
  const int end_column = std::clamp(width - box.left, first_column, box.width);
  for (int c = 0; c < channels; ++c) {
    const std::uint8_t* plane = in + static_cast<std::int64_t>(c) * height * width;
    for (int y = 0; y < box.height; ++y, out += box.width) {
      const int source_row = box.top + y;
      if (source_row < 0 || source_row >= height) {
        std::memset(out, 0, box.width);
        continue;
      }
      const std::uint8_t* row = plane + static_cast<std::int64_t>(source_row) * width + box.left;
      std::memset(out, 0, first_column);
      std::memcpy(out + first_column, row + first_column, end_column - first_column);
      std::memset(out + end_column, 0, box.width - end_column);
    }
  }
}

bool inside(const CropBox& box, int height, int width) {
  return box.top >= 0 && box.left >= 0 && box.height >= 0 && box.width >= 0 && box.top + box.height <= height &&
         box.left + box.width <= width;
}

// torchvision's resized_crop on a box inside the image: the crop, and unless it already has the output
// size, ATen's antialiased bilinear resampling of it (uint8 in, uint8 out, as v2 runs it on the CPU).
void resized_crop_into(const std::uint8_t* in, int channels, int height, int width, const CropBox& box,
                       std::uint8_t* out, int out_height, int out_width) {
  if (box.height == out_height && box.width == out_width) {
    copy_box(in, channels, height, width, box, out);
    return;
  }
  const std::int64_t plane = static_cast<std::int64_t>(height) * width;
  // The box is a strided view of the image: no copy, and read only.
  const at::Tensor source = at::from_blob(
      const_cast<std::uint8_t*>(in) + box.top * static_cast<std::int64_t>(width) + box.left,
      {1, channels, box.height, box.width}, {channels * plane, plane, width, 1}, at::TensorOptions(at::kByte));
  at::Tensor target = at::from_blob(out, {1, channels, out_height, out_width}, at::TensorOptions(at::kByte));
  IntraOpInline inline_only;
  at::_upsample_bilinear2d_aa_out(target, source, {out_height, out_width}, /*align_corners=*/false);
}

CropBox center_crop_box(int height, int width, int crop_height, int crop_width) {
  // torchvision pads a too-small image by (crop - size) // 2 before the top/left edge, else it anchors
  // the crop at round((size - crop) / 2).
  const auto start = [](int size, int crop) {
    return crop > size ? -((crop - size) / 2) : static_cast<int>(round_half_even((size - crop) / 2.0));
  };
  return {start(height, crop_height), start(width, crop_width), crop_height, crop_width};
}

// The per-pixel loops below come in AVX-512, AVX2 + FMA and baseline copies (KILN_ISA_VARIANTS), one picked when
// the library loads: vectorised, with std::fma one instruction (the baseline copy calls libm's, equally exact,
// for CPUs without FMA).

[[gnu::always_inline]] inline void flip_in_place_body(std::uint8_t* pixels, int channels, int height, int width) {
  for (std::int64_t row = 0; row < static_cast<std::int64_t>(channels) * height; ++row) {
    std::uint8_t* line = pixels + row * width;
    for (int x = 0; x < width / 2; ++x) std::swap(line[x], line[width - 1 - x]);
  }
}
KILN_ISA_VARIANTS(void, flip_in_place, (std::uint8_t* pixels, int channels, int height, int width),
                  flip_in_place_body(pixels, channels, height, width))

// torchvision's float32 arithmetic, see the top of the file.
constexpr float kRed = 0.2989f;
constexpr float kGreen = 0.587f;
constexpr float kBlue = 0.114f;

// _rgb_to_grayscale_image then floor_(), as adjust_contrast/adjust_saturation use it on uint8 images (the
// value is >= 0, so truncation is the floor, and vectorises where std::floor would need -fno-trapping-math).
[[gnu::always_inline]] inline float gray(std::uint8_t red, std::uint8_t green, std::uint8_t blue) {
  const float level = std::fma(static_cast<float>(blue), kBlue,
                               std::fma(static_cast<float>(green), kGreen, static_cast<float>(red) * kRed));
  return static_cast<float>(static_cast<std::int32_t>(level));
}

// _blend(image, other, ratio) for one pixel: image * ratio + other * (1 - ratio), clamped, truncated.
[[gnu::always_inline]] inline std::uint8_t blend(std::uint8_t pixel, float other, float ratio, float other_ratio) {
  const float value = std::fma(other, other_ratio, static_cast<float>(pixel) * ratio);
  return static_cast<std::uint8_t>(std::clamp(value, 0.0f, 255.0f));
}

[[gnu::always_inline]] inline void brightness_in_place_body(std::uint8_t* pixels, std::int64_t count, double factor) {
  const auto ratio = static_cast<float>(factor);
  for (std::int64_t i = 0; i < count; ++i) {
    pixels[i] = static_cast<std::uint8_t>(std::min(static_cast<float>(pixels[i]) * ratio, 255.0f));
  }
}
KILN_ISA_VARIANTS(void, brightness_in_place, (std::uint8_t* pixels, std::int64_t count, double factor),
                  brightness_in_place_body(pixels, count, factor))

[[gnu::always_inline]] inline std::int64_t gray_sum_body(const std::uint8_t* pixels, int channels, std::int64_t plane) {
  std::int64_t sum = 0;
  if (channels == 3) {
    for (std::int64_t i = 0; i < plane; ++i) {
      sum += static_cast<std::int32_t>(gray(pixels[i], pixels[plane + i], pixels[2 * plane + i]));
    }
  } else {
    for (std::int64_t i = 0; i < plane; ++i) sum += pixels[i];
  }
  return sum;
}
KILN_ISA_VARIANTS(std::int64_t, gray_sum, (const std::uint8_t* pixels, int channels, std::int64_t plane),
                  gray_sum_body(pixels, channels, plane))

[[gnu::always_inline]] inline void blend_in_place_body(std::uint8_t* pixels, std::int64_t count, float other,
                                                       float ratio, float other_ratio) {
  for (std::int64_t i = 0; i < count; ++i) pixels[i] = blend(pixels[i], other, ratio, other_ratio);
}
KILN_ISA_VARIANTS(void, blend_in_place,
                  (std::uint8_t* pixels, std::int64_t count, float other, float ratio, float other_ratio),
                  blend_in_place_body(pixels, count, other, ratio, other_ratio))

void contrast_in_place(std::uint8_t* pixels, int channels, std::int64_t plane, double factor) {
  // The mean of the (floored) gray image: a sum of integers, exact, where torchvision sums in float32
  // (exact too while the sum stays below 2^24, i.e. images up to 65,793 pixels).
  const float mean = static_cast<float>(gray_sum(pixels, channels, plane)) / static_cast<float>(plane);
  blend_in_place(pixels, channels * plane, mean, static_cast<float>(factor), static_cast<float>(1.0 - factor));
}

[[gnu::always_inline]] inline void saturation_in_place_body(std::uint8_t* pixels, int channels, std::int64_t plane,
                                                            double factor) {
  if (channels == 1) return;  // torchvision leaves a 1-channel image as it is (PIL's behaviour)
  const auto ratio = static_cast<float>(factor);
  const auto other_ratio = static_cast<float>(1.0 - factor);
  std::uint8_t* red = pixels;
  std::uint8_t* green = pixels + plane;
  std::uint8_t* blue = pixels + 2 * plane;
  for (std::int64_t i = 0; i < plane; ++i) {
    const float level = gray(red[i], green[i], blue[i]);
    red[i] = blend(red[i], level, ratio, other_ratio);
    green[i] = blend(green[i], level, ratio, other_ratio);
    blue[i] = blend(blue[i], level, ratio, other_ratio);
  }
}
KILN_ISA_VARIANTS(void, saturation_in_place, (std::uint8_t* pixels, int channels, std::int64_t plane, double factor),
                  saturation_in_place_body(pixels, channels, plane, factor))

void erase_in_place(std::uint8_t* pixels, int channels, int height, int width, const CropBox& box,
                    const std::vector<int>& value) {
  for (int c = 0; c < channels; ++c) {
    const auto fill = static_cast<std::uint8_t>(value.size() == 1 ? value[0] : value[c]);
    std::uint8_t* plane = pixels + static_cast<std::int64_t>(c) * height * width;
    for (int y = box.top; y < box.top + box.height; ++y) {
      std::memset(plane + static_cast<std::int64_t>(y) * width + box.left, fill, box.width);
    }
  }
}

void adjust_in_place(std::uint8_t* pixels, int channels, std::int64_t plane, const ColorStep& step) {
  switch (step.adjustment) {
    case ColorAdjustment::brightness:
      brightness_in_place(pixels, channels * plane, step.factor);
      break;
    case ColorAdjustment::contrast:
      contrast_in_place(pixels, channels, plane, step.factor);
      break;
    case ColorAdjustment::saturation:
      saturation_in_place(pixels, channels, plane, step.factor);
      break;
  }
}

// Reused per thread, so evaluation's resize-then-crop allocates nothing per image once warm.
std::uint8_t* scratch(std::size_t bytes) {
  thread_local std::vector<std::uint8_t> buffer;
  if (buffer.size() < bytes) buffer.resize(bytes);
  return buffer.data();
}

}  // namespace

SampleRandom::SampleRandom(std::uint64_t seed) {
  std::uint64_t counter = seed;
  for (auto& word : state_) {
    counter += kGolden;
    word = mix64(counter);  // four distinct inputs of a bijection: never the all-zero state
  }
}

SampleRandom::SampleRandom(std::uint64_t seed, std::uint64_t epoch, std::uint64_t position)
    : SampleRandom(stream_key(seed, epoch, position)) {}

std::uint64_t SampleRandom::next() {
  const std::uint64_t result = rotl(state_[1] * 5, 7) * 9;
  const std::uint64_t shifted = state_[1] << 17;
  state_[2] ^= state_[0];
  state_[3] ^= state_[1];
  state_[1] ^= state_[2];
  state_[0] ^= state_[3];
  state_[2] ^= shifted;
  state_[3] = rotl(state_[3], 45);
  return result;
}

double SampleRandom::uniform(double low, double high) {
  const double unit = static_cast<double>(next() >> 11) * 0x1.0p-53;
  const double value = low + (high - low) * unit;
  // low + (high - low) * unit can round up to high.
  return value < high ? value : (low < high ? std::nextafter(high, low) : low);
}

std::int64_t SampleRandom::integer(std::int64_t low, std::int64_t high) {
  if (low > high) throw std::invalid_argument("SampleRandom::integer: low > high");
  const std::uint64_t span = static_cast<std::uint64_t>(high) - static_cast<std::uint64_t>(low);
  if (span == std::numeric_limits<std::uint64_t>::max()) return static_cast<std::int64_t>(next());
  const std::uint64_t count = span + 1;
  // Rejects the top 2^64 mod count values, so that every result is equally likely.
  const std::uint64_t threshold = (0 - count) % count;
  std::uint64_t value = next();
  while (value < threshold) value = next();
  return static_cast<std::int64_t>(static_cast<std::uint64_t>(low) + value % count);
}

bool TrainTransformOptions::any() const {
  const bool jitter =
      color_jitter && (color_jitter->brightness > 0 || color_jitter->contrast > 0 || color_jitter->saturation > 0);
  return random_resized_crop.has_value() || horizontal_flip > 0 || jitter || (random_erasing && random_erasing->p > 0);
}

CropBox random_resized_crop_params(int height, int width, const RandomResizedCropOptions& options,
                                   SampleRandom& random) {
  const double area = static_cast<double>(height) * width;
  const double log_ratio_min = std::log(options.ratio_min);
  const double log_ratio_max = std::log(options.ratio_max);
  for (int attempt = 0; attempt < 10; ++attempt) {
    const double target_area = area * random.uniform(options.scale_min, options.scale_max);
    const double aspect_ratio = std::exp(random.uniform(log_ratio_min, log_ratio_max));
    const double w = round_half_even(std::sqrt(target_area * aspect_ratio));
    const double h = round_half_even(std::sqrt(target_area / aspect_ratio));
    if (0 < w && w <= width && 0 < h && h <= height) {
      const auto crop_height = static_cast<int>(h);
      const auto crop_width = static_cast<int>(w);
      const auto top = static_cast<int>(random.integer(0, height - crop_height));
      const auto left = static_cast<int>(random.integer(0, width - crop_width));
      return {top, left, crop_height, crop_width};
    }
  }
  // The whole image, cut to the nearest aspect ratio in range, centred. (At least 1 pixel: torchvision
  // would fail on the 0 a very thin image with an extreme ratio rounds to.)
  const double input_ratio = static_cast<double>(width) / height;
  int w = width;
  int h = height;
  if (input_ratio < options.ratio_min) {
    h = std::max(1, static_cast<int>(round_half_even(w / options.ratio_min)));
  } else if (input_ratio > options.ratio_max) {
    w = std::max(1, static_cast<int>(round_half_even(h * options.ratio_max)));
  }
  return {(height - h) / 2, (width - w) / 2, h, w};
}

std::optional<CropBox> random_erasing_params(int height, int width, const RandomErasingOptions& options,
                                             SampleRandom& random) {
  const double area = static_cast<double>(height) * width;
  const double log_ratio_min = std::log(options.ratio_min);
  const double log_ratio_max = std::log(options.ratio_max);
  for (int attempt = 0; attempt < 10; ++attempt) {
    const double erase_area = area * random.uniform(options.scale_min, options.scale_max);
    const double aspect_ratio = std::exp(random.uniform(log_ratio_min, log_ratio_max));
    const double h = round_half_even(std::sqrt(erase_area * aspect_ratio));
    const double w = round_half_even(std::sqrt(erase_area / aspect_ratio));
    if (!(h < height && w < width)) continue;
    const auto erase_height = static_cast<int>(h);
    const auto erase_width = static_cast<int>(w);
    const auto top = static_cast<int>(random.integer(0, height - erase_height));
    const auto left = static_cast<int>(random.integer(0, width - erase_width));
    return CropBox{top, left, erase_height, erase_width};
  }
  return std::nullopt;
}

ImageTransform::ImageTransform(TrainTransformOptions train, EvalTransformOptions eval, int channels)
    : train_(std::move(train)), eval_(std::move(eval)), channels_(channels), training_(true) {
  check(channels >= 1, "the image channel count", std::to_string(channels), "at least 1");
  if (eval_.resize) {
    const auto [height, width] = *eval_.resize;
    check(height >= 1 && width >= 0, "transforms.eval.resize", range_text(height, width),
          "one size (the shorter edge) or [height, width], each at least 1");
  }
  if (eval_.center_crop) check_size(*eval_.center_crop, "transforms.eval.center_crop");
  const std::string key = "transforms.train.";
  if (const auto& crop = train_.random_resized_crop) {
    check_size({crop->height, crop->width}, key + "random_resized_crop.size");
    check_range(crop->scale_min, crop->scale_max, false, 1, key + "random_resized_crop.scale",
                "[min, max] with 0 < min <= max <= 1 (fractions of the image's area)");
    check_range(crop->ratio_min, crop->ratio_max, false, std::numeric_limits<double>::infinity(),
                key + "random_resized_crop.ratio", "[min, max] with 0 < min <= max (width / height)");
  }
  check(train_.horizontal_flip >= 0 && train_.horizontal_flip <= 1, key + "horizontal_flip",
        number(train_.horizontal_flip), "a probability in [0, 1]");
  if (const auto& jitter = train_.color_jitter) {
    for (const auto& [name, value] :
         {std::pair{"brightness", jitter->brightness}, std::pair{"contrast", jitter->contrast},
          std::pair{"saturation", jitter->saturation}}) {
      check(std::isfinite(value) && value >= 0, key + "color_jitter." + name, number(value),
            "a number >= 0 (the factor is drawn from [max(0, 1 - x), 1 + x])");
    }
    check(channels == 1 || channels == 3, key + "color_jitter",
          "set for " + std::to_string(channels) + "-channel images",
          "1 (grayscale) or 3 (RGB) channels, as torchvision's ColorJitter");
  }
  if (const auto& erasing = train_.random_erasing) {
    check(erasing->p >= 0 && erasing->p <= 1, key + "random_erasing.p", number(erasing->p), "a probability in [0, 1]");
    check_range(erasing->scale_min, erasing->scale_max, true, 1, key + "random_erasing.scale",
                "[min, max] with 0 <= min <= max <= 1 (fractions of the image's area)");
    check_range(erasing->ratio_min, erasing->ratio_max, false, std::numeric_limits<double>::infinity(),
                key + "random_erasing.ratio", "[min, max] with 0 < min <= max (height / width)");
    std::string values = "[";
    bool in_range = true;
    for (const int value : erasing->value) {
      values += (values.size() > 1 ? ", " : "") + std::to_string(value);
      in_range = in_range && value >= 0 && value <= 255;
    }
    values += "]";
    const auto count = erasing->value.size();
    check(in_range && (count == 1 || count == static_cast<std::size_t>(channels)), key + "random_erasing.value", values,
          "one pixel value in 0..255 for every channel, or one per channel (" + std::to_string(channels) +
              "); erasing runs on uint8 pixels, before normalisation");
  }
}

ImageTransform ImageTransform::evaluation(EvalTransformOptions eval, int channels) {
  ImageTransform transform({}, std::move(eval), channels);
  transform.training_ = false;
  return transform;
}

std::pair<int, int> ImageTransform::output_size(int height, int width) const {
  if (height < 1 || width < 1) {
    throw_data_error("cannot transform a " + std::to_string(height) + "x" + std::to_string(width) +
                     " image: expected at least 1x1 pixels");
  }
  if (training_ && train_.random_resized_crop) {
    return {train_.random_resized_crop->height, train_.random_resized_crop->width};
  }
  std::pair<int, int> size{height, width};
  if (eval_.resize) size = transforms::resize_output_size(size.first, size.second, *eval_.resize);
  if (eval_.center_crop) size = *eval_.center_crop;
  return size;
}

bool ImageTransform::random() const {
  return training_ && train_.any();
}

bool ImageTransform::identity() const {
  return !random() && !eval_.resize && !eval_.center_crop;
}

TransformDraw ImageTransform::draw(int height, int width, SampleRandom& random) const {
  TransformDraw drawn;
  if (!training_) return drawn;
  const auto [out_height, out_width] = output_size(height, width);
  if (const auto& crop = train_.random_resized_crop) {
    drawn.resized_crop = random_resized_crop_params(height, width, *crop, random);
  }
  if (train_.horizontal_flip > 0) drawn.horizontal_flip = random.uniform() < train_.horizontal_flip;
  if (const auto& jitter = train_.color_jitter) {
    // torchvision draws the order first, then the factors in the order brightness, contrast, saturation.
    auto& steps = drawn.color_steps;
    int& count = drawn.color_step_count;
    for (const auto& [adjustment, amount] : {std::pair{ColorAdjustment::brightness, jitter->brightness},
                                             std::pair{ColorAdjustment::contrast, jitter->contrast},
                                             std::pair{ColorAdjustment::saturation, jitter->saturation}}) {
      if (amount > 0) steps[count++].adjustment = adjustment;
    }
    for (int i = count - 1; i > 0; --i) std::swap(steps[i], steps[random.integer(0, i)]);
    for (const auto& [adjustment, amount] : {std::pair{ColorAdjustment::brightness, jitter->brightness},
                                             std::pair{ColorAdjustment::contrast, jitter->contrast},
                                             std::pair{ColorAdjustment::saturation, jitter->saturation}}) {
      if (amount <= 0) continue;
      const double factor = random.uniform(std::max(0.0, 1 - amount), 1 + amount);
      for (int i = 0; i < count; ++i) {
        if (steps[i].adjustment == adjustment) steps[i].factor = factor;
      }
    }
  }
  if (const auto& erasing = train_.random_erasing; erasing && erasing->p > 0 && random.uniform() < erasing->p) {
    drawn.erase = random_erasing_params(out_height, out_width, *erasing, random);
  }
  return drawn;
}

void ImageTransform::apply(const std::uint8_t* in, int height, int width, std::uint8_t* out,
                           SampleRandom& random) const {
  apply(in, height, width, out, draw(height, width, random));
}

void ImageTransform::apply(const std::uint8_t* in, int height, int width, std::uint8_t* out,
                           const TransformDraw& drawn) const {
  const auto [out_height, out_width] = output_size(height, width);
  const bool resized_crop = training_ && train_.random_resized_crop.has_value();
  if (drawn.resized_crop.has_value() != resized_crop ||
      (drawn.resized_crop && !inside(*drawn.resized_crop, height, width)) ||
      (drawn.erase && !inside(*drawn.erase, out_height, out_width))) {
    throw std::invalid_argument("ImageTransform::apply: the draw is not one of this transform for this image size");
  }
  if (drawn.resized_crop) {
    resized_crop_into(in, channels_, height, width, *drawn.resized_crop, out, out_height, out_width);
  } else if (!eval_.resize) {
    const CropBox whole{0, 0, height, width};
    const CropBox box = eval_.center_crop ? center_crop_box(height, width, out_height, out_width) : whole;
    copy_box(in, channels_, height, width, box, out);
  } else if (!eval_.center_crop) {
    resized_crop_into(in, channels_, height, width, {0, 0, height, width}, out, out_height, out_width);
  } else {
    const auto [resized_height, resized_width] = transforms::resize_output_size(height, width, *eval_.resize);
    std::uint8_t* resized =
        scratch(static_cast<std::size_t>(channels_) * static_cast<std::size_t>(resized_height) * resized_width);
    resized_crop_into(in, channels_, height, width, {0, 0, height, width}, resized, resized_height, resized_width);
    copy_box(resized, channels_, resized_height, resized_width,
             center_crop_box(resized_height, resized_width, out_height, out_width), out);
  }
  const std::int64_t plane = static_cast<std::int64_t>(out_height) * out_width;
  if (drawn.horizontal_flip) flip_in_place(out, channels_, out_height, out_width);
  for (int i = 0; i < drawn.color_step_count; ++i) adjust_in_place(out, channels_, plane, drawn.color_steps[i]);
  if (drawn.erase) erase_in_place(out, channels_, out_height, out_width, *drawn.erase, train_.random_erasing->value);
}

namespace {

// A uint8 [C, H, W] CPU tensor, contiguous; `what` names the caller in the error.
at::Tensor checked_image(const at::Tensor& image, const std::string& what) {
  if (!image.defined() || image.dim() != 3 || image.scalar_type() != at::kByte || !image.device().is_cpu() ||
      image.size(0) < 1 || image.size(1) < 1 || image.size(2) < 1) {
    std::ostringstream got;
    if (image.defined()) {
      got << image.scalar_type() << " " << image.sizes() << " on " << image.device();
    } else {
      got << "an undefined tensor";
    }
    throw_data_error(what + ": expected a uint8 [C, H, W] image on the CPU, got " + got.str());
  }
  return image.contiguous();
}

void check_color_image(const at::Tensor& image, double factor, const std::string& what) {
  check(std::isfinite(factor) && factor >= 0, what + "'s factor", number(factor), "a number >= 0");
  check(image.size(0) == 1 || image.size(0) == 3, what + "'s image", std::to_string(image.size(0)) + " channels",
        "1 or 3 channels");
}

int dimension(const at::Tensor& image, int index) {
  return static_cast<int>(image.size(index));
}

}  // namespace

at::Tensor ImageTransform::apply(const at::Tensor& image, SampleRandom& random) const {
  const at::Tensor in = checked_image(image, "ImageTransform.apply");
  check(in.size(0) == channels_, "ImageTransform.apply's image", std::to_string(in.size(0)) + " channels",
        std::to_string(channels_) + " channels, the transform's");
  const auto [out_height, out_width] = output_size(dimension(in, 1), dimension(in, 2));
  at::Tensor out = at::empty({channels_, out_height, out_width}, at::kByte);
  apply(in.data_ptr<std::uint8_t>(), dimension(in, 1), dimension(in, 2), out.data_ptr<std::uint8_t>(), random);
  return out;
}

namespace transforms {

at::Tensor crop(const at::Tensor& image, int top, int left, int height, int width) {
  const at::Tensor in = checked_image(image, "crop");
  check_size({height, width}, "crop's size");
  at::Tensor out = at::empty({in.size(0), height, width}, at::kByte);
  copy_box(in.data_ptr<std::uint8_t>(), dimension(in, 0), dimension(in, 1), dimension(in, 2),
           {top, left, height, width}, out.data_ptr<std::uint8_t>());
  return out;
}

at::Tensor resized_crop(const at::Tensor& image, int top, int left, int height, int width, int out_height,
                        int out_width) {
  at::Tensor in = checked_image(image, "resized_crop");
  check_size({height, width}, "resized_crop's crop size");
  check_size({out_height, out_width}, "resized_crop's output size");
  CropBox box{top, left, height, width};
  if (!inside(box, dimension(in, 1), dimension(in, 2))) {
    in = crop(in, top, left, height, width);
    box = {0, 0, height, width};
  }
  at::Tensor out = at::empty({in.size(0), out_height, out_width}, at::kByte);
  resized_crop_into(in.data_ptr<std::uint8_t>(), dimension(in, 0), dimension(in, 1), dimension(in, 2), box,
                    out.data_ptr<std::uint8_t>(), out_height, out_width);
  return out;
}

at::Tensor resize(const at::Tensor& image, int out_height, int out_width) {
  const at::Tensor in = checked_image(image, "resize");
  return resized_crop(in, 0, 0, dimension(in, 1), dimension(in, 2), out_height, out_width);
}

at::Tensor center_crop(const at::Tensor& image, int height, int width) {
  const at::Tensor in = checked_image(image, "center_crop");
  check_size({height, width}, "center_crop's size");
  const CropBox box = center_crop_box(dimension(in, 1), dimension(in, 2), height, width);
  return crop(in, box.top, box.left, box.height, box.width);
}

at::Tensor horizontal_flip(const at::Tensor& image) {
  at::Tensor out = checked_image(image, "horizontal_flip").clone();
  flip_in_place(out.data_ptr<std::uint8_t>(), dimension(out, 0), dimension(out, 1), dimension(out, 2));
  return out;
}

at::Tensor adjust_brightness(const at::Tensor& image, double factor) {
  at::Tensor out = checked_image(image, "adjust_brightness").clone();
  check_color_image(out, factor, "adjust_brightness");
  brightness_in_place(out.data_ptr<std::uint8_t>(), out.numel(), factor);
  return out;
}

at::Tensor adjust_contrast(const at::Tensor& image, double factor) {
  at::Tensor out = checked_image(image, "adjust_contrast").clone();
  check_color_image(out, factor, "adjust_contrast");
  contrast_in_place(out.data_ptr<std::uint8_t>(), dimension(out, 0), out.size(1) * out.size(2), factor);
  return out;
}

at::Tensor adjust_saturation(const at::Tensor& image, double factor) {
  at::Tensor out = checked_image(image, "adjust_saturation").clone();
  check_color_image(out, factor, "adjust_saturation");
  saturation_in_place(out.data_ptr<std::uint8_t>(), dimension(out, 0), out.size(1) * out.size(2), factor);
  return out;
}

at::Tensor erase(const at::Tensor& image, int top, int left, int height, int width, const std::vector<int>& value) {
  at::Tensor out = checked_image(image, "erase").clone();
  const int channels = dimension(out, 0);
  const bool values_ok = (value.size() == 1 || value.size() == static_cast<std::size_t>(channels)) &&
                         std::all_of(value.begin(), value.end(), [](int v) { return v >= 0 && v <= 255; });
  check(values_ok, "erase's value", std::to_string(value.size()) + " value(s)",
        "1 or " + std::to_string(channels) + " pixel values in 0..255");
  check(top >= 0 && left >= 0 && height >= 0 && width >= 0, "erase's box",
        range_text(top, left) + " " + range_text(height, width), "a top, left, height and width >= 0");
  // Python's slicing, which torchvision erases with, stops at the image's edge.
  const CropBox box{top, left, std::clamp(height, 0, std::max(0, dimension(out, 1) - top)),
                    std::clamp(width, 0, std::max(0, dimension(out, 2) - left))};
  erase_in_place(out.data_ptr<std::uint8_t>(), channels, dimension(out, 1), dimension(out, 2), box, value);
  return out;
}

std::pair<int, int> resize_output_size(int height, int width, std::pair<int, int> size) {
  if (size.second > 0) return size;
  const int shorter = std::min(height, width);
  const int longer = std::max(height, width);
  // int(size * longer / shorter): Python's true division, then truncation.
  const auto other = static_cast<int>(static_cast<double>(static_cast<std::int64_t>(size.first) * longer) / shorter);
  return width <= height ? std::pair{other, size.first} : std::pair{size.first, other};
}

}  // namespace transforms

}  // namespace kiln
