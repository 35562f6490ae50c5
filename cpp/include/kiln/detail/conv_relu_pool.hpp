// A 3x3 convolution followed by ReLU and 2x2 max pooling (mnist_cnn's conv2 -> ReLU -> pool; the conv-ReLU-pool
// stages of VGG-style networks), trained on the CPU in fp32 with a backward pass that only touches the
// convolution outputs that receive a gradient.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace kiln::detail {

// relu_max_pool2x2(conv3x3_winograd(x, weight, bias, padding)): the same values, and the same gradients up to
// float rounding (sums in another order). Pooling passes back each window's gradient to one convolution output
// per channel, its winner, and to none where the maximum is not positive; dropout after the pool zeroes more.
// So at least 3 in 4 of the convolution's output gradients are zero (in mnist_cnn's training, 84-93% once it is
// under way), and the dense backward (oneDNN's input gradient, Winograd's weight gradient) spends most of its work
// multiplying them. Here the backward lists the nonzero ones — one per (window, channel) at most — and sums only
// their products: for the input gradient, each window's outputs at one position (which read the same 3x3 input
// pixels) add their values times their channels' weights to those pixels; for the weight gradient, each output
// channel's values times the input patches they read. Both sums run in a fixed order whatever the thread count.
// The forward pass pools in Winograd's output transform (conv3x3_winograd_relu_max_pool), recording the winners.
// The backward's lists take up to 8 bytes per pooled value and 12 per nonzero gradient.
// Taken where conv3x3_relu_max_pool2x2_applies; elsewhere the two functions above, or ATen's ops.
at::Tensor conv3x3_relu_max_pool2x2(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                    std::int64_t padding = 0);

// Whether conv3x3_relu_max_pool2x2 takes the sparse backward: where conv3x3_winograd applies (float32 CPU
// tensors outside autocast, a 3x3 weight of x's channels), with a multiple of 8 input channels and a
// convolution output of at least 2x2.
bool conv3x3_relu_max_pool2x2_applies(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                      std::int64_t padding);

}  // namespace kiln::detail
