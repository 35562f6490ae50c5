// Inference from a kiln checkpoint: the same normalisation as training, no gradient, thread-safe.
#pragma once

#include <ATen/core/Tensor.h>

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "kiln/decode.hpp"
#include "kiln/model.hpp"

namespace kiln {

class Predictor {
 public:
  // Loads `checkpoint` (a kiln checkpoint file; no code is unpickled) onto `device`.
  explicit Predictor(const std::filesystem::path& checkpoint, const std::string& device = "cpu");
  ~Predictor();
  Predictor(const Predictor&) = delete;
  Predictor& operator=(const Predictor&) = delete;

  // uint8 pixels [N, C, H, W] (or one image [C, H, W]) in the layout of image_spec() -> class
  // probabilities float32 [N, classes] on the CPU. Throws kiln::DataError for any other shape/dtype.
  at::Tensor predict(const at::Tensor& images) const;

  const std::vector<std::string>& classes() const;
  ImageSpec image_spec() const;
  const ModelSpec& model_spec() const;
  std::int64_t epoch() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace kiln
