// A fused ReLU + 2x2 max pooling for the models' hot path on the CPU.
#pragma once

#include <ATen/core/Tensor.h>

namespace kiln::detail {

// torch::max_pool2d(torch::relu(x), 2) with the same values and gradient, in one pass each way over
// channels-last float/bf16 CPU activations (other inputs: those two ops).
at::Tensor relu_max_pool2x2(const at::Tensor& x);

}  // namespace kiln::detail
