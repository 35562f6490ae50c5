#include "kiln/detail/small_map_conv.hpp"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace kiln::detail {
namespace {

// An (input pixel, output pixel) pair the kernel joins, and the kernel tap between them; pixels are counted
// row by row.
struct Pair {
  std::int64_t in, out, tap;
};

struct Geometry {
  std::int64_t batch, channels, height, width;  // the input's
  std::int64_t outputs, kernel_h, kernel_w;     // the weight's
  std::int64_t out_height, out_width;
  std::vector<Pair> pairs;  // by output pixel, then input pixel: the order every sum below takes
};

// x: [batch, channels, height, width].
Geometry geometry_of(at::IntArrayRef x_sizes, const at::Tensor& weight, std::int64_t padding) {
  Geometry g{x_sizes[0], x_sizes[1], x_sizes[2], x_sizes[3], weight.size(0), weight.size(2), weight.size(3), 0, 0, {}};
  g.out_height = g.height + 2 * padding - g.kernel_h + 1;
  g.out_width = g.width + 2 * padding - g.kernel_w + 1;
  for (std::int64_t oy = 0; oy < g.out_height; ++oy) {
    for (std::int64_t ox = 0; ox < g.out_width; ++ox) {
      for (std::int64_t iy = 0; iy < g.height; ++iy) {
        for (std::int64_t ix = 0; ix < g.width; ++ix) {
          const std::int64_t ky = iy - oy + padding;
          const std::int64_t kx = ix - ox + padding;
          if (ky >= 0 && ky < g.kernel_h && kx >= 0 && kx < g.kernel_w) {
            g.pairs.push_back({iy * g.width + ix, oy * g.out_width + ox, ky * g.kernel_w + kx});
          }
        }
      }
    }
  }
  return g;
}

// [N, C, H, W] in any layout -> its channels-last rows [N, H * W, C].
at::Tensor pixel_rows(const at::Tensor& map) {
  const at::Tensor rows = map.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1});
  return rows.reshape({map.size(0), map.size(2) * map.size(3), map.size(1)});
}

// Rows [N, H * W, C] -> [N, C, H, W] in the given layout.
at::Tensor from_pixel_rows(const at::Tensor& rows, std::int64_t height, std::int64_t width, bool channels_last) {
  const at::Tensor map = rows.view({rows.size(0), height, width, rows.size(2)}).permute({0, 3, 1, 2});
  // clone, not contiguous(): a permuted 1x1 map counts as contiguous but keeps channels-last strides.
  return channels_last ? map : map.clone(at::MemoryFormat::Contiguous);
}

// Calls visit(o, c, t, offset) for every weight element: output channel o, input channel c, tap t (row by row) and
// its offset in a tensor of `weight`'s sizes and strides; output channels shared out between the threads.
template <typename Visit>
void for_each_weight_element(const at::Tensor& weight, const Visit& visit) {
  const std::int64_t channels = weight.size(1), kernel_h = weight.size(2), kernel_w = weight.size(3);
  const std::int64_t so = weight.stride(0), sc = weight.stride(1), sy = weight.stride(2), sx = weight.stride(3);
  at::parallel_for(0, weight.size(0), 16, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t o = begin; o < end; ++o) {
      for (std::int64_t c = 0; c < channels; ++c) {
        for (std::int64_t ky = 0, t = 0; ky < kernel_h; ++ky) {
          for (std::int64_t kx = 0; kx < kernel_w; ++kx, ++t) visit(o, c, t, o * so + c * sc + ky * sy + kx * sx);
        }
      }
    }
  });
}

// The [O x C] matrices of a channels-last weight's taps, as views: a view [kh * kw, O, C] whose rows are the
// weight's own (stride kh * kw * C), which the matrix products read in place.
bool taps_are_views(const at::Tensor& weight) {
  return weight.size(1) > 1 && weight.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::Tensor tap_view(const at::Tensor& weight) {
  return weight.permute({2, 3, 0, 1}).view({weight.size(2) * weight.size(3), weight.size(0), weight.size(1)});
}

// weight [O, C, kh, kw] -> [kh * kw, O, C]: tap t's [O x C] matrix: tap_view of a channels-last weight, else a
// contiguous copy (a contiguous weight's taps are strided 9 apart: no matrix product reads them in place).
at::Tensor weight_taps(const at::Tensor& weight) {
  if (taps_are_views(weight)) return tap_view(weight);
  const std::int64_t outputs = weight.size(0), channels = weight.size(1);
  at::Tensor result = at::empty({weight.size(2) * weight.size(3), outputs, channels}, weight.options());
  const float* in = weight.const_data_ptr<float>();
  float* out = result.data_ptr<float>();
  for_each_weight_element(weight, [&](std::int64_t o, std::int64_t c, std::int64_t t, std::int64_t offset) {
    out[(t * outputs + o) * channels + c] = in[offset];
  });
  return result;
}

// weight_taps' copy, inverted: [kh * kw, O, C] into `weight_shaped` (sizes [O, C, kh, kw], any strides).
void copy_from_taps(const at::Tensor& taps_values, at::Tensor& weight_shaped) {
  const std::int64_t outputs = weight_shaped.size(0), channels = weight_shaped.size(1);
  const float* in = taps_values.const_data_ptr<float>();
  float* out = weight_shaped.data_ptr<float>();
  for_each_weight_element(weight_shaped, [&](std::int64_t o, std::int64_t c, std::int64_t t, std::int64_t offset) {
    out[offset] = in[(t * outputs + o) * channels + c];
  });
}

// The slices of `tensor` along `dim`, made once (a select per product would cost more than small products).
std::vector<at::Tensor> slices(const at::Tensor& tensor, std::int64_t dim) {
  std::vector<at::Tensor> result;
  result.reserve(static_cast<std::size_t>(tensor.size(dim)));
  for (std::int64_t i = 0; i < tensor.size(dim); ++i) result.push_back(tensor.select(dim, i));
  return result;
}

// sums[i] = the sum over the pairs whose `index_of(pair)` is i of product(pair), in the pairs' order: the first
// product of each i overwrites (beta 0: nothing to clear), a slice no pair reaches is set to zero.
template <typename IndexOf, typename Product>
void sum_products(std::vector<at::Tensor>& sums, const std::vector<Pair>& pairs, const IndexOf& index_of,
                  const Product& product) {
  std::vector<bool> written(sums.size(), false);
  for (const Pair& pair : pairs) {
    const auto i = static_cast<std::size_t>(index_of(pair));
    const auto& [a, b] = product(pair);
    sums[i].addmm_(a, b, written[i] ? 1.0 : 0.0);
    written[i] = true;
  }
  for (std::size_t i = 0; i < sums.size(); ++i) {
    if (!written[i]) sums[i].zero_();
  }
}

struct SmallMapConv : torch::autograd::Function<SmallMapConv> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            std::int64_t padding) {
    const Geometry g = geometry_of(x.sizes(), weight, padding);
    const at::Tensor rows = pixel_rows(x);
    const at::Tensor taps = weight_taps(weight);
    // Output pixel q's [N x O] rows: the sum over its pairs of input pixel p's [N x C] rows times tap t^T.
    at::Tensor out = at::empty({g.batch, g.out_height * g.out_width, g.outputs}, x.options());
    std::vector<at::Tensor> out_pixels = slices(out, 1);
    const std::vector<at::Tensor> in_pixels = slices(rows, 1), tap_matrices = slices(taps, 0);
    sum_products(
        out_pixels, g.pairs, [](const Pair& pair) { return pair.out; },
        [&](const Pair& pair) { return std::pair(in_pixels[pair.in], tap_matrices[pair.tap].t()); });
    const bool channels_last = x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
    if (ctx != nullptr) {
      ctx->save_for_backward({rows, taps, weight});
      ctx->saved_data["padding"] = padding;
      ctx->saved_data["height"] = g.height;
      ctx->saved_data["width"] = g.width;
      ctx->saved_data["channels_last"] = channels_last;
    }
    return from_pixel_rows(out, g.out_height, g.out_width, channels_last);
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& rows = saved[0];
    const at::Tensor& taps = saved[1];
    const at::Tensor& weight = saved[2];
    const std::int64_t height = ctx->saved_data["height"].toInt();
    const std::int64_t width = ctx->saved_data["width"].toInt();
    const Geometry g =
        geometry_of({rows.size(0), rows.size(2), height, width}, weight, ctx->saved_data["padding"].toInt());
    const at::Tensor grad = pixel_rows(grads[0]);  // [N, Q, O]
    const std::vector<at::Tensor> grad_pixels = slices(grad, 1), in_pixels = slices(rows, 1);
    const std::vector<at::Tensor> tap_matrices = slices(taps, 0);
    at::Tensor grad_input, grad_weight;
    if (ctx->needs_input_grad(0)) {
      at::Tensor grad_rows = at::empty_like(rows);
      std::vector<at::Tensor> sums = slices(grad_rows, 1);
      sum_products(
          sums, g.pairs, [](const Pair& pair) { return pair.in; },
          [&](const Pair& pair) { return std::pair(grad_pixels[pair.out], tap_matrices[pair.tap]); });
      grad_input = from_pixel_rows(grad_rows, height, width, ctx->saved_data["channels_last"].toBool());
    }
    if (ctx->needs_input_grad(1)) {
      // In the weight's own strides, which the fused optimizer step needs of a gradient: a channels-last
      // weight's gradient is summed into in place, a contiguous one's taps are copied back.
      grad_weight = at::empty_like(weight);
      const bool in_place = taps_are_views(grad_weight);
      at::Tensor grad_taps = in_place ? tap_view(grad_weight) : at::empty_like(taps);
      std::vector<at::Tensor> sums = slices(grad_taps, 0);
      sum_products(
          sums, g.pairs, [](const Pair& pair) { return pair.tap; },
          [&](const Pair& pair) { return std::pair(grad_pixels[pair.out].t(), in_pixels[pair.in]); });
      if (!in_place) copy_from_taps(grad_taps, grad_weight);
    }
    return {grad_input, grad_weight, at::Tensor()};
  }
};

}  // namespace

// Measured against oneDNN (batch 32, forward + both gradients, 2 threads, channels-last weights): 512 channels on
// 2x2 maps under 3x3 (resnet18's layer4 at 64 px) AVX2 7.0 ms vs 40 ms, AVX-512 5.7 vs 24 ms (contiguous weights,
// whose taps are copied: AVX2 11 vs 32 ms, AVX-512 9.7 vs 14 ms); 256 on 2x2: AVX2 1.8 vs 6.5 ms, AVX-512 1.3 vs
// 4.3 ms. A 3x3 map (as many pixels as the kernel: 49 pairs, the products' work equal to the direct kernel's)
// measured even with oneDNN in a first version, hence maps with fewer pixels than the kernel only.
bool small_map_conv_applies(const at::Tensor& x, const at::Tensor& weight, std::int64_t padding) {
  return x.device().is_cpu() && x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && x.dim() == 4 &&
         weight.dim() == 4 && weight.size(1) == x.size(1) && x.size(0) > 0 && padding >= 0 &&
         x.size(2) + 2 * padding >= weight.size(2) && x.size(3) + 2 * padding >= weight.size(3) &&
         x.size(2) * x.size(3) < weight.size(2) * weight.size(3) && !at::autocast::is_autocast_enabled(at::kCPU);
}

at::Tensor small_map_conv(const at::Tensor& x, const at::Tensor& weight, std::int64_t padding) {
  if (!small_map_conv_applies(x, weight, padding)) return at::conv2d(x, weight, {}, 1, padding);
  if (at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad())) {
    return SmallMapConv::apply(x, weight, padding);
  }
  return SmallMapConv::forward(nullptr, x, weight, padding);  // evaluation: nothing kept for backward
}

}  // namespace kiln::detail
