#include "kiln/detail/dropout.hpp"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

namespace kiln::detail {
namespace {

// splitmix64's finaliser: a well-mixed 64-bit value per (seed, index).
inline std::uint64_t mix(std::uint64_t seed, std::uint64_t index) {
  std::uint64_t z = seed + (index + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

template <typename T>
void fill_mask(T* mask, std::int64_t size, std::int64_t rows, const DropoutStream& stream, double keep) {
  // Compare 24-bit uniforms against an integer threshold: exact, and vectorisable.
  const auto threshold = static_cast<std::uint64_t>(keep * 16777216.0);
  const T kept = static_cast<T>(1.0 / keep);
  const T dropped = static_cast<T>(0.0);
  const std::uint64_t seed = stream.seed;
  const std::uint64_t offset = stream.offset;
  if (stream.row_start == 0 && stream.row_stride == 1) {
    at::parallel_for(0, size, 16384, [&](std::int64_t begin, std::int64_t end) {
      for (std::int64_t i = begin; i < end; ++i) {
        mask[i] = (mix(seed, offset + static_cast<std::uint64_t>(i)) >> 40) < threshold ? kept : dropped;
      }
    });
    return;
  }
  // A rank's rows in the global batch (DropoutStream): row j is the global batch's row start + stride * j.
  const auto row_size = static_cast<std::uint64_t>(size / rows);
  at::parallel_for(0, rows, 1, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t row = begin; row < end; ++row) {
      const std::uint64_t base =
          offset + (stream.row_start + stream.row_stride * static_cast<std::uint64_t>(row)) * row_size;
      T* out = mask + static_cast<std::uint64_t>(row) * row_size;
      for (std::uint64_t i = 0; i < row_size; ++i) {
        out[i] = (mix(seed, base + i) >> 40) < threshold ? kept : dropped;
      }
    }
  });
}

}  // namespace

at::Tensor dropout(const at::Tensor& input, double p, bool training, DropoutStream* stream) {
  if (!training || p == 0.0) return input;
  if (stream == nullptr || !input.device().is_cpu() ||
      (input.scalar_type() != at::kFloat && input.scalar_type() != at::kBFloat16)) {
    return at::dropout(input, p, training);
  }
  // The mask takes the input's memory format, so the product needs no layout conversion.
  at::Tensor mask = at::empty_like(input);
  const double keep = 1.0 - p;
  // Rows are samples: contiguous in memory in both NCHW and channels-last layouts.
  const std::int64_t rows = input.dim() > 0 && input.size(0) > 0 ? input.size(0) : 1;
  if (input.scalar_type() == at::kFloat) {
    fill_mask(mask.data_ptr<float>(), mask.numel(), rows, *stream, keep);
  } else {
    fill_mask(mask.data_ptr<at::BFloat16>(), mask.numel(), rows, *stream, keep);
  }
  stream->offset += static_cast<std::uint64_t>(mask.numel()) * stream->row_stride;
  return input * mask;
}

}  // namespace kiln::detail
