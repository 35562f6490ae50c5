// A fused ReLU + 2x2 max pooling for the models' hot path on the CPU.
#pragma once

#include <ATen/core/Tensor.h>

namespace kiln::detail {

// torch::max_pool2d(torch::relu(x), 2) with the same values and gradient, in one pass each way over
// channels-last float/bf16 CPU activations (other inputs: those two ops).
at::Tensor relu_max_pool2x2(const at::Tensor& x);

// Whether relu_max_pool2x2 takes kiln's own pass: float/bf16 channels-last CPU maps of at least 2x2.
bool relu_max_pool2x2_applies(const at::Tensor& x);

// relu_max_pool2x2's values where it applies, recorded for no gradient, with each value's winner written to
// `winner` ([N, H/2, W/2, C] bytes, channels innermost): the position in its window (0-3, row by row) whose
// value the maximum took, or 4 where no gradient flows back (a maximum that is not positive).
at::Tensor relu_max_pool2x2_winners(const at::Tensor& x, at::Tensor& winner);

}  // namespace kiln::detail
