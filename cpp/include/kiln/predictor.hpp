// Inference from a kiln checkpoint: the same decoding, evaluation transform and normalisation as
// training, no gradient, thread-safe.
#pragma once

#include <ATen/core/Tensor.h>

#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kiln/augment.hpp"
#include "kiln/decode.hpp"
#include "kiln/model.hpp"
#include "kiln/precision.hpp"

namespace kiln {

using EncodedImage = std::span<const std::uint8_t>;

// Encoded images (PNG, JPEG, ...) decoded into one uint8 batch [N, C, H, W] of layout `spec`, by
// decode_into: the code data preparation uses, so serving sees the pixels training saw. Images of
// another size or channel count are converted as preparation converts them. Decodes on torch's
// intra-op threads when the batch is large enough to gain from it. An image claiming more than
// `max_image_pixels` pixels is an error of its own, refused before it is decoded.
struct DecodedBatch {
  at::Tensor images;                     // rows of undecodable images are zero
  std::vector<std::string> errors;       // per image: empty when decoded, else why it could not be
  std::vector<std::string> conversions;  // per image: what was done to fit `spec`, empty if nothing
  std::int64_t decoded() const;
};
DecodedBatch decode_batch(const std::vector<EncodedImage>& encoded, const ImageSpec& spec,
                          std::int64_t max_image_pixels = kDefaultMaxImagePixels);

class Predictor {
 public:
  // Loads `checkpoint` (a kiln checkpoint file; no code is unpickled) onto `device`, to predict in
  // `precision`: bf16 is several times faster than fp32 on CPUs with native bf16, int8 (CPU only,
  // kiln/int8.hpp) about twice bf16's speed again. When int8 cannot run for this checkpoint and machine
  // (int8_unavailable_reason; also on a GPU), it predicts in `int8_fallback` if one is given (the reason is then in
  // int8_unavailable()), else throws kiln::DataError naming the reason.
  explicit Predictor(const std::filesystem::path& checkpoint, const std::string& device = "cpu",
                     Precision precision = Precision::fp32, std::optional<Precision> int8_fallback = std::nullopt);
  ~Predictor();
  Predictor(const Predictor&) = delete;
  Predictor& operator=(const Predictor&) = delete;

  // uint8 pixels [N, C, H, W] (or one image [C, H, W]) in the layout of image_spec(), the processed
  // images the model was trained on (a processed split's images as they are) -> class probabilities
  // float32 [N, classes] on the CPU. The checkpoint's evaluation transform brings them to the model's
  // input_spec() first (without one, the two layouts are the same and nothing is copied). Throws
  // kiln::DataError for any other shape/dtype.
  at::Tensor predict(const at::Tensor& images) const;

  // What the model sees of encoded images: decoded to image_spec() as predict_encoded decodes them,
  // then the evaluation transform, as uint8 [N, C, H, W] of input_spec() (rows of undecodable images
  // zero, their reasons in `errors`). predict_encoded's probabilities are the model's on these pixels.
  DecodedBatch preprocess(const std::vector<EncodedImage>& encoded) const;

  // Encoded images -> probabilities float32 [N, classes]; rows of images that could not be decoded
  // (corrupt, not an image, over max_image_pixels()) are zero and their reason is in `errors`; a bad
  // image never fails the others.
  struct EncodedPredictions {
    at::Tensor probabilities;
    std::vector<std::string> errors;
    std::vector<std::string> conversions;
  };
  EncodedPredictions predict_encoded(const std::vector<EncodedImage>& encoded) const;

  const std::vector<std::string>& classes() const;
  // The layout predict() takes and encoded images are decoded to: the checkpoint's stored (processed)
  // images, which are the model's input when the checkpoint has no evaluation transform.
  ImageSpec image_spec() const;
  // The model's input: image_spec() after eval_transform().
  ImageSpec input_spec() const;
  const EvalTransformOptions& eval_transform() const;
  const ModelSpec& model_spec() const;
  std::int64_t epoch() const;
  Precision precision() const;
  // Why int8 was asked for but a fallback precision runs instead; empty otherwise.
  const std::string& int8_unavailable() const;

  // The pixel budget (width x height) of each image predict_encoded decodes; kDefaultMaxImagePixels
  // until set. Throws DataError unless `pixels` >= 1.
  std::int64_t max_image_pixels() const;
  void set_max_image_pixels(std::int64_t pixels);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace kiln
