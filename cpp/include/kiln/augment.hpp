// Image transforms of training (augmentation) and evaluation, with torchvision.transforms.v2's names,
// parameters and semantics, on uint8 CHW pixels. Evaluation's transform (resize, center_crop) is the one
// batch inference and serving apply too, so every stage sees the same pixels.
//
// Randomness: every random transform draws its parameters from the SampleRandom it is given, the way
// torchvision's get_params draws them; the loader seeds one per sample from (seed, epoch, position in
// the epoch), so the same seed gives the same augmented batches whatever the number of worker threads.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace kiln {

// A small, fast, seedable generator (splitmix64 seeding, xoshiro256** stream) for per-sample draws.
class SampleRandom {
 public:
  explicit SampleRandom(std::uint64_t seed);
  // Seeded from a run's seed, an epoch and a sample's position in that epoch: independent streams.
  SampleRandom(std::uint64_t seed, std::uint64_t epoch, std::uint64_t position);
  std::uint64_t next();
  double uniform(double low = 0.0, double high = 1.0);        // [low, high)
  std::int64_t integer(std::int64_t low, std::int64_t high);  // [low, high]

 private:
  std::array<std::uint64_t, 4> state_{};
};

// torchvision.transforms.v2.RandomResizedCrop(size, scale, ratio), bilinear with antialias (v2's default).
struct RandomResizedCropOptions {
  int height = 0;
  int width = 0;
  double scale_min = 0.08;
  double scale_max = 1.0;
  double ratio_min = 3.0 / 4.0;
  double ratio_max = 4.0 / 3.0;
};

// torchvision.transforms.v2.ColorJitter(brightness, contrast, saturation): factors drawn uniformly from
// [max(0, 1 - x), 1 + x]; 0 leaves that property alone. Applied in a random order, as torchvision does.
struct ColorJitterOptions {
  double brightness = 0;
  double contrast = 0;
  double saturation = 0;
};

// torchvision.transforms.v2.RandomErasing(p, scale, ratio, value) on uint8 pixels: `value` is a pixel
// value per channel (one value: every channel), since kiln's augmentation runs before normalisation.
struct RandomErasingOptions {
  double p = 0.5;
  double scale_min = 0.02;
  double scale_max = 0.33;
  double ratio_min = 0.3;
  double ratio_max = 3.3;
  std::vector<int> value = {0};
};

// Evaluation: torchvision.transforms.v2.Resize(size) then CenterCrop(size). A resize with one value
// (width 0) brings the shorter edge to it, keeping the aspect ratio, as Resize(int) does.
struct EvalTransformOptions {
  std::optional<std::pair<int, int>> resize;       // (height, width); width 0: shorter edge = height
  std::optional<std::pair<int, int>> center_crop;  // (height, width)
  bool operator==(const EvalTransformOptions&) const = default;
};

struct TrainTransformOptions {
  std::optional<RandomResizedCropOptions> random_resized_crop;
  double horizontal_flip = 0;  // probability, torchvision.transforms.v2.RandomHorizontalFlip(p)
  std::optional<ColorJitterOptions> color_jitter;
  std::optional<RandomErasingOptions> random_erasing;

  // Whether any random transform is configured (a probability or jitter of 0 counts as none).
  bool any() const;
};

// A rectangle of an image, in pixels.
struct CropBox {
  int top = 0;
  int left = 0;
  int height = 0;
  int width = 0;
  bool operator==(const CropBox&) const = default;
};

// torchvision.transforms.v2.RandomResizedCrop's make_params: up to 10 attempts at an area drawn uniformly
// from scale x image area and an aspect ratio drawn log-uniformly from ratio, then the central crop of
// the image clamped to the ratio range. Always inside the image.
CropBox random_resized_crop_params(int height, int width, const RandomResizedCropOptions& options,
                                   SampleRandom& random);
// torchvision.transforms.v2.RandomErasing's make_params once it has decided to erase: up to 10 attempts,
// nullopt when none fits (the image is then left as it is). Height or width may be 0, as in torchvision.
std::optional<CropBox> random_erasing_params(int height, int width, const RandomErasingOptions& options,
                                             SampleRandom& random);

enum class ColorAdjustment : std::uint8_t { brightness, contrast, saturation };
struct ColorStep {
  ColorAdjustment adjustment = ColorAdjustment::brightness;
  double factor = 1;
};

// What one call of a training transform drew, in the order it applies them; evaluation draws nothing.
struct TransformDraw {
  std::optional<CropBox> resized_crop;  // random_resized_crop's box in the input image
  bool horizontal_flip = false;
  std::array<ColorStep, 3> color_steps{};  // color_jitter's adjustments in their random order
  int color_step_count = 0;
  std::optional<CropBox> erase;  // random_erasing's box in the output image
};

// The transforms one split is read with: train (augmentation, then nothing else; without a
// random_resized_crop the evaluation resize/crop apply first) or eval only.
class ImageTransform {
 public:
  ImageTransform() = default;
  // Throws kiln::DataError naming the key for options out of range (sizes < 1, scale/ratio min > max,
  // p outside [0, 1], negative jitter, erasing value count not 1 or `channels`).
  ImageTransform(TrainTransformOptions train, EvalTransformOptions eval, int channels);
  static ImageTransform evaluation(EvalTransformOptions eval, int channels);

  // The (height, width) this transform outputs for inputs of (height, width).
  std::pair<int, int> output_size(int height, int width) const;
  bool random() const;    // whether apply() uses `random`
  bool identity() const;  // no transform at all: output = input

  // Transforms one uint8 image `in` (C x height x width, contiguous) into `out`, which holds
  // C x output_size(height, width) bytes. `random` is not used by evaluation transforms.
  void apply(const std::uint8_t* in, int height, int width, std::uint8_t* out, SampleRandom& random) const;
  // For tensors: uint8 [C, H, W] -> uint8 [C, H', W'].
  at::Tensor apply(const at::Tensor& image, SampleRandom& random) const;

  // The parameters apply() draws from `random` for an input of (height, width); apply(in, ..., random)
  // is apply(in, ..., draw(height, width, random)), so tests can redo a call with torchvision.
  TransformDraw draw(int height, int width, SampleRandom& random) const;
  void apply(const std::uint8_t* in, int height, int width, std::uint8_t* out, const TransformDraw& drawn) const;

  const TrainTransformOptions& train_options() const { return train_; }
  const EvalTransformOptions& eval_options() const { return eval_; }

 private:
  TrainTransformOptions train_;
  EvalTransformOptions eval_;
  int channels_ = 1;
  bool training_ = false;
};

// The functional forms, torchvision.transforms.v2.functional's, on uint8 [C, H, W] tensors; the parity
// tests compare these with torchvision for the same parameters.
// Sizes come as (height, width); pixels outside the image (crop and center_crop boxes reaching past it)
// are 0, as torchvision pads them. They run on the calling thread only: no ATen intra-op threads.
namespace transforms {
at::Tensor crop(const at::Tensor& image, int top, int left, int height, int width);
at::Tensor resized_crop(const at::Tensor& image, int top, int left, int height, int width, int out_height,
                        int out_width);
at::Tensor resize(const at::Tensor& image, int out_height, int out_width);
at::Tensor center_crop(const at::Tensor& image, int height, int width);
at::Tensor horizontal_flip(const at::Tensor& image);
at::Tensor adjust_brightness(const at::Tensor& image, double factor);
at::Tensor adjust_contrast(const at::Tensor& image, double factor);
at::Tensor adjust_saturation(const at::Tensor& image, double factor);
at::Tensor erase(const at::Tensor& image, int top, int left, int height, int width, const std::vector<int>& value);
// torchvision.transforms.v2.Resize's output size: `size` (height, width), or with width 0 the shorter edge
// brought to height and the longer one to int(height * longer / shorter).
std::pair<int, int> resize_output_size(int height, int width, std::pair<int, int> size);
}  // namespace transforms

}  // namespace kiln
