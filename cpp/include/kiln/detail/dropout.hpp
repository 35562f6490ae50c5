// Dropout masks from kiln's own counter-based stream on the CPU: a trainer's dropout is reproducible
// for any thread count and resumes exactly from a checkpoint.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace kiln::detail {

// A counter-based random stream for dropout masks: element i of a mask depends only on (seed,
// position in the stream), so masks are the same for any thread count, cheap to make in parallel,
// and the stream resumes exactly from (seed, offset) stored in a checkpoint.
//
// Data-parallel training interleaves ranks' samples in a global batch (rank r holds rows r, r + W,
// ...): with row_start = r and row_stride = W, row j of a rank's mask takes the stream positions of
// row r + W * j of the global batch's, and the offset moves past the whole global batch, so W ranks
// draw the masks one process would draw for their global batch.
struct DropoutStream {
  std::uint64_t seed = 0;
  std::uint64_t offset = 0;
  std::uint64_t row_start = 0;
  std::uint64_t row_stride = 1;
};

// Dropout with a mask from `stream` on the CPU (torch's bernoulli_ draws each element from a
// sequential Mersenne Twister, a large share of a small CNN's CPU time); elsewhere torch's dropout.
at::Tensor dropout(const at::Tensor& input, double p, bool training, DropoutStream* stream);

}  // namespace kiln::detail
