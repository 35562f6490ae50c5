// A fully connected layer whose input is mostly zeros (mnist_cnn's fc1, after ReLU, max pooling and dropout), on
// the CPU in fp32.
#pragma once

#include <ATen/core/Tensor.h>

namespace kiln::detail {

// at::linear(x, weight, bias) with the same values and gradients up to float rounding (the forward sums leave out
// the zero products and add the rest in another order). mnist_cnn's fc1 reads the pooled, dropped-out activations
// of conv2, of which 80-90% are zero once training is under way; where at most a quarter of x is nonzero (counted
// per call) the forward pass goes through x's nonzero values only: y[s] = bias + the sum over x[s, k] != 0 of
// x[s, k] * weight[:, k], the weight's rows in passes that stay in the core's L2 cache. The gradients are
// at::linear's dense products. Applies where sparse_input_linear_applies; elsewhere at::linear.
at::Tensor sparse_input_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);

// float32 CPU tensors outside autocast: a contiguous 2-d x, a weight [O, K] stored transposed (strides (1, O),
// as mnist_cnn keeps fc1's) with O a multiple of 8, and a bias of O values or none.
bool sparse_input_linear_applies(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);

}  // namespace kiln::detail
