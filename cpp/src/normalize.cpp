#include "kiln/normalize.hpp"

#include <ATen/ATen.h>

namespace kiln {

Normalizer::Normalizer(const std::vector<double>& mean, const std::vector<double>& std, const c10::Device& device) {
  std::vector<float> scale;
  std::vector<float> offset;
  for (std::size_t c = 0; c < mean.size(); ++c) {
    scale.push_back(static_cast<float>(1.0 / (255.0 * std[c])));
    offset.push_back(static_cast<float>(-mean[c] / std[c]));
  }
  const auto channels = static_cast<std::int64_t>(scale.size());
  scale_ = at::tensor(scale).view({1, channels, 1, 1}).to(device);
  offset_ = at::tensor(offset).view({1, channels, 1, 1}).to(device);
}

at::Tensor Normalizer::operator()(const at::Tensor& pixels) const {
  return at::addcmul(offset_, pixels.to(at::kFloat), scale_);
}

}  // namespace kiln
