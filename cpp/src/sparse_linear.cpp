#include "kiln/detail/sparse_linear.hpp"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "kiln/detail/floats8.hpp"
#include "kiln/detail/isa_dispatch.hpp"

namespace kiln::detail {
namespace {

// The sparse form wins where at most this share of x is nonzero (fc1's shape, batch 32, AVX2, 2 threads: 0.36 ms
// against at::linear's 0.58 ms with a tenth nonzero, 0.53 against 0.58 with a fifth, 0.66 against 0.58 with 0.3).
constexpr double kMostNonzero = 0.25;
// Weight rows a pass of the forward kernel reads: 2048 rows x 64 columns x 4 bytes = 512 KiB, within a core's L2
// cache while every sample's nonzero values in those rows are added.
constexpr std::int64_t kRowBlock = 2048;
constexpr std::int64_t kColumnBlock = 64;  // 8 vectors of 8 floats

// Calls visit(k) for each nonzero x[k] of a row of `size` floats, in order of k.
template <typename Visit>
[[gnu::always_inline]] inline void for_each_nonzero(const float* x, std::int64_t size, const Visit& visit) {
  std::int64_t k = 0;
  for (; k + 8 <= size; k += 8) {
    for (unsigned bits = nonzero_bits8(x + k); bits != 0; bits &= bits - 1) visit(k + std::countr_zero(bits));
  }
  for (; k < size; ++k) {
    if (x[k] != 0.0f) visit(k);
  }
}

// x's nonzero values, row by row (sample s's in [start[s], start[s + 1]), in order of their column k).
struct NonzeroRows {
  std::vector<std::int64_t> start;
  std::unique_ptr<std::int32_t[]> column;
  std::unique_ptr<float[]> value;
};

// The row starts alone (a count per row), from which the caller decides.
std::vector<std::int64_t> nonzero_row_starts(const at::Tensor& x) {
  const std::int64_t n = x.size(0), size = x.size(1);
  const float* data = x.const_data_ptr<float>();
  std::vector<std::int64_t> start(static_cast<std::size_t>(n + 1), 0);
  at::parallel_for(0, n, 1, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t s = begin; s < end; ++s) {
      std::int64_t count = 0;
      const float* row = data + s * size;
      std::int64_t k = 0;
      for (; k + 8 <= size; k += 8) count += std::popcount(nonzero_bits8(row + k));
      for (; k < size; ++k) count += row[k] != 0.0f;
      start[s + 1] = count;
    }
  });
  for (std::int64_t s = 0; s < n; ++s) start[s + 1] += start[s];
  return start;
}

bool sparse_enough(const std::vector<std::int64_t>& start, const at::Tensor& x) {
  return static_cast<double>(start.back()) <= kMostNonzero * static_cast<double>(x.numel());
}

NonzeroRows list_nonzero(const at::Tensor& x, std::vector<std::int64_t> start) {
  const std::int64_t n = x.size(0), size = x.size(1);
  const float* data = x.const_data_ptr<float>();
  NonzeroRows rows;
  const auto total = static_cast<std::size_t>(std::max<std::int64_t>(start.back(), 1));
  rows.column = std::make_unique_for_overwrite<std::int32_t[]>(total);
  rows.value = std::make_unique_for_overwrite<float[]>(total);
  rows.start = std::move(start);
  at::parallel_for(0, n, 1, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t s = begin; s < end; ++s) {
      const float* row = data + s * size;
      std::int64_t at = rows.start[s];
      for_each_nonzero(row, size, [&](std::int64_t k) {
        rows.column[at] = static_cast<std::int32_t>(k);
        rows.value[at++] = row[k];
      });
    }
  });
  return rows;
}

// Columns [c0, c0 + 8 kVectors) of y: for each sample, the running sums (in y) plus its nonzero values from
// cursor[s] on with column below k_end, times those rows of the weight (wt: [K][O], the transposed storage).
template <std::int64_t kVectors>
[[gnu::always_inline]] inline void forward_rows(const NonzeroRows& rows, const float* __restrict wt,
                                                std::int64_t outputs, float* __restrict y, std::int64_t n,
                                                std::int64_t c0, std::int64_t* __restrict cursor, std::int64_t k_end) {
  const std::int32_t* column = rows.column.get();
  const float* value = rows.value.get();
  for (std::int64_t s = 0; s < n; ++s) {
    float* out = y + s * outputs + c0;
    Floats8 sum[kVectors];
    for (std::int64_t i = 0; i < kVectors; ++i) sum[i] = floats8_at(out + i * kFloats8Lanes);
    std::int64_t e = cursor[s];
    for (const std::int64_t e_end = rows.start[s + 1]; e < e_end && column[e] < k_end; ++e) {
      const Floats8 v = Floats8{} + value[e];
      const float* w = wt + static_cast<std::int64_t>(column[e]) * outputs + c0;
      for (std::int64_t i = 0; i < kVectors; ++i) sum[i] += v * floats8_at(w + i * kFloats8Lanes);
    }
    cursor[s] = e;
    for (std::int64_t i = 0; i < kVectors; ++i) floats8_at(out + i * kFloats8Lanes) = sum[i];
  }
}

// Column blocks [begin, end) (of kColumnBlock; the last may be narrower) of y [N, O], from the bias (or zeros):
// the weight's rows in passes of kRowBlock, every sample's values in a pass added before the next.
[[gnu::always_inline]] inline void forward_body(const NonzeroRows& rows, const float* wt, const float* bias, float* y,
                                                std::int64_t n, std::int64_t size, std::int64_t outputs,
                                                std::int64_t begin, std::int64_t end) {
  std::vector<std::int64_t> cursor(static_cast<std::size_t>(n));
  for (std::int64_t block = begin; block < end; ++block) {
    const std::int64_t c0 = block * kColumnBlock, width = std::min(kColumnBlock, outputs - c0);
    for (std::int64_t s = 0; s < n; ++s) {
      float* out = y + s * outputs + c0;
      if (bias != nullptr) {
        std::copy_n(bias + c0, width, out);
      } else {
        std::fill_n(out, width, 0.0f);
      }
    }
    for (std::int64_t c = c0; c < c0 + width;) {
      const std::int64_t vectors = c + kColumnBlock <= c0 + width ? kColumnBlock / kFloats8Lanes : 1;
      std::copy_n(rows.start.begin(), n, cursor.begin());
      for (std::int64_t k0 = 0; k0 < size; k0 += kRowBlock) {
        if (vectors == kColumnBlock / kFloats8Lanes) {
          forward_rows<kColumnBlock / kFloats8Lanes>(rows, wt, outputs, y, n, c, cursor.data(), k0 + kRowBlock);
        } else {
          forward_rows<1>(rows, wt, outputs, y, n, c, cursor.data(), k0 + kRowBlock);
        }
      }
      c += vectors * kFloats8Lanes;
    }
  }
}

KILN_ISA_VARIANTS(void, sparse_forward,
                  (const NonzeroRows& rows, const float* wt, const float* bias, float* y, std::int64_t n,
                   std::int64_t size, std::int64_t outputs, std::int64_t begin, std::int64_t end),
                  forward_body(rows, wt, bias, y, n, size, outputs, begin, end))

at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  std::vector<std::int64_t> start = nonzero_row_starts(x);
  if (!sparse_enough(start, x)) return at::linear(x, weight, bias);
  const NonzeroRows rows = list_nonzero(x, std::move(start));
  const std::int64_t n = x.size(0), size = x.size(1), outputs = weight.size(0);
  at::Tensor y = at::empty({n, outputs}, x.options());
  const float* wt = weight.const_data_ptr<float>();  // [K][O] in memory
  const float* bias_data = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float* out = y.data_ptr<float>();
  at::parallel_for(0, (outputs + kColumnBlock - 1) / kColumnBlock, 1, [&](std::int64_t begin, std::int64_t end) {
    sparse_forward(rows, wt, bias_data, out, n, size, outputs, begin, end);
  });
  return y;
}

struct SparseInputLinear : torch::autograd::Function<SparseInputLinear> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias) {
    // Optional: autograd's Function takes no undefined tensor as an input.
    const at::Tensor bias_values = bias.has_value() ? *bias : at::Tensor();
    ctx->save_for_backward({x, weight});
    ctx->saved_data["has_bias"] = bias_values.defined();
    return linear_forward(x, weight, bias_values);
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor grad = grads[0].contiguous();
    at::Tensor grad_x, grad_weight, grad_bias;
    if (ctx->needs_input_grad(0)) grad_x = at::mm(grad, weight);
    // [O, K] with strides (1, O): the weight's own layout, which the fused optimizer step needs of its gradient.
    // A dense product: leaving out x's zeros measured no faster here (it writes every row of the gradient anyway).
    if (ctx->needs_input_grad(1)) grad_weight = at::mm(x.t(), grad).t();
    // needs_input_grad counts the tensor inputs only: no index 2 without a bias.
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) grad_bias = grad.sum(0);
    return {grad_x, grad_weight, grad_bias};
  }
};

}  // namespace

// Measured on mnist_cnn's fc1 (9216 -> 128, batch 32, AVX2, 2 threads): see the README's training notes.
bool sparse_input_linear_applies(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  return x.device().is_cpu() && x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
         (!bias.defined() || (bias.scalar_type() == at::kFloat && bias.dim() == 1 && bias.is_contiguous() &&
                              bias.size(0) == weight.size(0))) &&
         x.dim() == 2 && x.is_contiguous() && x.size(0) > 0 && weight.dim() == 2 && weight.size(1) == x.size(1) &&
         weight.size(0) % kFloats8Lanes == 0 && weight.size(0) > 0 && weight.stride(0) == 1 &&
         weight.stride(1) == weight.size(0) && x.size(1) <= INT32_MAX && !at::autocast::is_autocast_enabled(at::kCPU);
}

at::Tensor sparse_input_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  if (!sparse_input_linear_applies(x, weight, bias)) return at::linear(x, weight, bias);
  if (at::GradMode::is_enabled() &&
      (x.requires_grad() || weight.requires_grad() || (bias.defined() && bias.requires_grad()))) {
    return SparseInputLinear::apply(x, weight, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt);
  }
  return linear_forward(x, weight, bias);  // evaluation: nothing kept for backward
}

}  // namespace kiln::detail
