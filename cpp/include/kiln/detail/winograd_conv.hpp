// A 3x3 convolution with many channels (mnist_cnn's conv2, 32 -> 64; ResNets' stride-1 3x3 convolutions) on
// the CPU in fp32, in Winograd's F(4x4, 3x3) form: 4x fewer multiplications than the direct convolution.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace kiln::detail {

// at::conv2d(x, weight, bias, /*stride=*/1, padding) for a 3x3 kernel, returned in the channels-last layout,
// with the same values and gradients up to float rounding (within 1e-5 of the largest value). `bias` may be
// undefined (none). oneDNN's direct kernels already run near the FMA peak on AVX2, so only fewer
// multiplications could make this layer faster: each 4x4 output tile is computed from a 6x6 input tile (zero
// outside the image) with 36 products per (input, output) channel pair instead of 144, as 36 matrix products
// [tiles x C] x [C x O] per block of images sized so the transformed tiles stay in the core's L2 cache. The
// weight gradient takes the same transforms (36 products [C x tiles] x [tiles x O]); with padding 1 the input
// gradient is the same convolution of the output gradient with the flipped, transposed weight, with padding 0
// it stays oneDNN's. The intra-op threads each take whole blocks of images, and the values do not depend on
// their count. Taken where conv3x3_winograd_applies; anything else takes at::conv2d.
at::Tensor conv3x3_winograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            std::int64_t padding = 0);

// relu_max_pool2x2(conv3x3_winograd(x, weight, bias, padding)) with the same values, recorded for no gradient, where
// conv3x3_winograd_applies and the convolution's output is at least 2x2: each 4x4 output tile is ReLU'd and pooled
// as the output transform computes it (tiles start at even pixels, so no window spans two), and the convolution's
// output is never written out. Where `winner` is not null it is set to
// [N, PH, PW, O] bytes: each value's position in its window (0-3, row by row), or 4 where no gradient flows back.
at::Tensor conv3x3_winograd_relu_max_pool(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                          std::int64_t padding, at::Tensor* winner = nullptr);

// Whether conv3x3_winograd computes this convolution in Winograd form: float32 CPU tensors outside autocast,
// a 3x3 weight matching x's channels, a non-empty batch and an output of at least one pixel.
bool conv3x3_winograd_applies(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                              std::int64_t padding);

}  // namespace kiln::detail
