// A stride-1 convolution on a map with fewer pixels than its kernel (resnet18/34's layer4 on images of up to ~90 px:
// 2x2 maps under a 3x3 kernel), as matrix products over the pixel pairs it connects.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace kiln::detail {

// at::conv2d(x, weight, /*bias=*/{}, /*stride=*/1, padding), returned in x's layout, with the same values and
// gradients up to float rounding. On such a map oneDNN's direct kernels spend most of their work on the zero
// padding and their weight gradient runs far below the FMA peak (resnet18's layer4, 512 channels on 2x2 maps,
// batch 32: 35 ms on AVX2 for 302M multiply-adds). Here each (input pixel, output pixel) pair the kernel joins is
// one product [N x C] x [C x O] with the kernel tap between them (16 for a 2x2 map under 3x3), and the input and
// weight gradients are the same pairs' products ([N x O] x [O x C] and [O x N] x [N x C]), summed in a fixed
// order. Taken where small_map_conv_applies; anything else takes at::conv2d.
at::Tensor small_map_conv(const at::Tensor& x, const at::Tensor& weight, std::int64_t padding);

// Whether small_map_conv computes this convolution as pixel-pair products: float32 CPU tensors outside autocast,
// a 4-d weight of x's channels (groups 1), a non-empty batch, an output of at least one pixel, and an input map
// with fewer pixels than the kernel.
bool small_map_conv_applies(const at::Tensor& x, const at::Tensor& weight, std::int64_t padding);

}  // namespace kiln::detail
