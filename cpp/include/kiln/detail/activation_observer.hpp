// The calibration of static int8 inference (kiln/int8.hpp): activation ranges recorded while a model
// runs, by the trainer's evaluation.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <initializer_list>
#include <vector>

namespace kiln::detail {

// The largest value each activation that int8 inference quantises took over the batches a model
// ran while observed (mnist_cnn: see kiln/detail/mnist_cnn.hpp).
class ActivationObserver {
 public:
  // One call per forward pass: the activations, in the model's fixed order.
  void observe(std::initializer_list<at::Tensor> activations, std::int64_t images);
  // Per activation, the largest value seen (empty before any batch).
  std::vector<double> maxima() const;
  std::int64_t images() const { return images_; }

 private:
  at::Tensor max_;  // float [activations], on the model's device: no sync per batch
  std::int64_t images_ = 0;
};

}  // namespace kiln::detail
