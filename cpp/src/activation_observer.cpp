#include "kiln/detail/activation_observer.hpp"

#include <ATen/ATen.h>

namespace kiln::detail {

void ActivationObserver::observe(std::initializer_list<at::Tensor> activations, std::int64_t images) {
  std::vector<at::Tensor> maxima;
  maxima.reserve(activations.size());
  for (const auto& activation : activations) maxima.push_back(activation.detach().amax().to(at::kFloat));
  const at::Tensor batch = at::stack(maxima);
  max_ = max_.defined() ? at::maximum(max_, batch) : batch;
  images_ += images;
}

std::vector<double> ActivationObserver::maxima() const {
  std::vector<double> result;
  if (!max_.defined()) return result;
  const at::Tensor values = max_.to(at::kCPU, at::kDouble).contiguous();
  result.assign(values.data_ptr<double>(), values.data_ptr<double>() + values.numel());
  return result;
}

}  // namespace kiln::detail
