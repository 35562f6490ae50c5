// A 3x3 convolution with many channels (mnist_cnn's conv2, 32 -> 64) on the CPU in fp32, in Winograd's
// F(4x4, 3x3) form: 4x fewer multiplications than the direct convolution.
#pragma once

#include <ATen/core/Tensor.h>

namespace kiln::detail {

// at::conv2d(x, weight, bias) for a 3x3 kernel, stride 1, no padding, returned in the channels-last layout,
// with the same values and gradients up to float rounding (within 1e-5 of the largest value). oneDNN's
// direct kernels already run near the FMA peak on AVX2, so only fewer multiplications could make this
// layer faster: each 4x4 output tile is computed from a 6x6 input tile with 36 products per (input, output)
// channel pair instead of 144, as 36 matrix products [tiles x C] x [C x O], four images at a time so the
// transformed tiles stay in the core's L2 cache. The weight gradient takes the same transforms (36
// products [C x tiles] x [tiles x O]); the input gradient stays oneDNN's. The intra-op threads each take
// whole blocks of images, and the values do not depend on their count. Taken for float32 CPU tensors
// outside autocast with a bias and at least 3x3 pixels; anything else takes at::conv2d.
at::Tensor conv3x3_winograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);

}  // namespace kiln::detail
