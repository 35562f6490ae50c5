// mnist_cnn, pytorch/examples mnist/main.py's Net: its shape and its weight layout for channels-last
// inference, in one place for the float model (mnist_cnn.cpp) and its int8 version (int8.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <memory>

#include "kiln/model.hpp"

namespace kiln::detail::mnist_cnn {

// conv1 3x3 -> conv2 3x3 (both unpadded) -> 2x2 max pool -> fc1 -> fc2 (classes).
inline constexpr int kConv1Channels = 32;
inline constexpr int kConv2Channels = 64;
inline constexpr int kFc1Features = 128;

// The activations its forward pass hands an ActivationObserver, in this order: conv1's ReLU output,
// conv2's pooled ReLU output, fc1's ReLU output.
inline constexpr std::size_t kObservedActivations = 3;

// The pooled conv2 activations' height and width (what fc1 reads) for images of `height` x `width`.
struct PooledSize {
  int height = 0;
  int width = 0;
};
constexpr PooledSize pooled_size(int height, int width) {
  return {(height - 4) / 2, (width - 4) / 2};
}

// fc1's weight [out, c * h * w] (torch.flatten's order of the pooled activations) with its inputs
// in (h, w, c) order: the memory order of channels-last activations, which then need no copy.
at::Tensor fc1_weight_for_channels_last(const at::Tensor& fc1_weight, PooledSize pooled);

// An initialised mnist_cnn; throws kiln::DataError for images smaller than 6x6.
std::shared_ptr<Classifier> make(const ModelSpec& spec);

}  // namespace kiln::detail::mnist_cnn
