// The normalisation training and inference share: uint8 pixels -> (pixel / 255 - mean) / std, one
// mean/std per channel from the dataset's manifest.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <vector>

namespace kiln {

class Normalizer {
 public:
  Normalizer() = default;
  Normalizer(const std::vector<double>& mean, const std::vector<double>& std, const c10::Device& device);

  // uint8 [N, C, H, W] on the normaliser's device -> float32, same layout.
  at::Tensor operator()(const at::Tensor& pixels) const;

 private:
  // pixel * scale_ + offset_ == (pixel / 255 - mean) / std, as one fused op.
  at::Tensor scale_;
  at::Tensor offset_;
};

}  // namespace kiln
