// Static int8 inference of kiln's mnist_cnn on the CPU, through the oneDNN int8 kernels PyTorch's
// x86 quantisation path lowers to (onednn::qconv2d_pointwise / qlinear_pointwise, called through the
// dispatcher on plain uint8/int8 tensors). The uint8 pixels go in as they are: the normalisation is
// folded into conv1's weights and bias. Activations stay uint8 between layers, at the ranges the
// trainer's evaluation measured for these weights (Int8Calibration); weights are int8 per output
// channel (at most 63 in magnitude without VNNI: see int8.cpp); fc2 returns float logits. Measured on
// the Fashion-MNIST test split: ~2x the images/s of bf16 with VNNI, ~3.7x fp32's on AVX2 alone, the
// same accuracy (99.9% of predictions equal to fp32's).
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>

#include "kiln/checkpoint.hpp"

namespace kiln {

// Why `saved` cannot run in int8 here (empty when it can): a model without an int8 path, a checkpoint
// without calibration, a CPU without AVX2 (or ONEDNN_MAX_CPU_ISA below it), a CPU that is not x86-64, or
// a LibTorch without oneDNN's int8 kernels.
std::string int8_unavailable_reason(const CheckpointModel& saved);

class Int8Classifier {
 public:
  // Quantises `saved`'s weights; throws kiln::DataError with int8_unavailable_reason when it cannot.
  explicit Int8Classifier(const CheckpointModel& saved);
  ~Int8Classifier();
  Int8Classifier(const Int8Classifier&) = delete;
  Int8Classifier& operator=(const Int8Classifier&) = delete;

  // uint8 pixels [N, C, H, W] on the CPU, in the checkpoint's image layout -> float logits [N, classes].
  // Thread-safe.
  at::Tensor forward(const at::Tensor& pixels) const;

 private:
  struct Layers;
  std::unique_ptr<Layers> layers_;
};

}  // namespace kiln
