// A 3x3 convolution + ReLU for few input channels (mnist_cnn's first layer) on the CPU, in fp32.
#pragma once

#include <ATen/core/Tensor.h>

namespace kiln::detail {

// torch::relu(torch::conv2d(x, weight, bias)) for a 3x3 kernel, stride 1, no padding, returned in the
// channels-last layout, with the same values (up to summation order) and the same weight and bias
// gradients. oneDNN's direct kernels are built for many input channels: with one (grayscale images)
// they ran at 2-4 GFLOP/s here, the backward pass slowest, and the ReLU was another pass over the
// output. kiln's loop reads the 9 x C input values of each output position once, multiplies them by all
// output channels at once (vectorised over those), adds the bias and clamps in the same pass; the
// weight gradient is the same loop's transpose. Taken for float32 CPU tensors that need no input
// gradient, with at most 4 input channels, outside autocast; anything else takes torch's ops.
at::Tensor conv3x3_relu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);

}  // namespace kiln::detail
