#include "kiln/detail/winograd_conv.hpp"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "kiln/detail/isa_dispatch.hpp"

namespace kiln::detail {
namespace {

// Lavin & Gray's F(4x4, 3x3): Y = A^T [(G g G^T) . (B^T d B)] A for a 6x6 input tile d and a 3x3 filter g.
constexpr std::int64_t kOutTile = 4;
constexpr std::int64_t kInTile = 6;
constexpr std::int64_t kPoints = kInTile * kInTile;

// Images per block: their transformed input and output tiles (36 x 36 tiles x (32 + 64) floats, 0.5 MB
// per 26x26 image of mnist_cnn's conv2) stay in or near the core's 2 MB L2 cache between the transforms
// and the products (one thread, AVX2: blocks of 2, 4 and 8 images measured within noise of each other).
constexpr std::int64_t kImagesPerBlock = 4;

struct Geometry {
  std::int64_t channels, height, width;  // input, channels-last
  std::int64_t outputs;                  // output channels
  std::int64_t out_height, out_width;    // height - 2, width - 2
  std::int64_t tiles_high, tiles_wide;   // 4x4 output tiles, the last ones cut by the output's edge
  std::int64_t tiles_per_image() const { return tiles_high * tiles_wide; }
};

// out_i = (B^T d)_i for the six vectors d_k = in + k * in_stride of n floats each.
[[gnu::always_inline]] inline void input_rows(const float* __restrict in, std::int64_t in_stride, float* __restrict out,
                                              std::int64_t out_stride, std::int64_t n) {
  for (std::int64_t c = 0; c < n; ++c) {
    const float d0 = in[c], d1 = in[in_stride + c], d2 = in[2 * in_stride + c], d3 = in[3 * in_stride + c],
                d4 = in[4 * in_stride + c], d5 = in[5 * in_stride + c];
    out[c] = 4.0f * d0 - 5.0f * d2 + d4;
    out[out_stride + c] = -4.0f * (d1 + d2) + d3 + d4;
    out[2 * out_stride + c] = 4.0f * (d1 - d2) - d3 + d4;
    out[3 * out_stride + c] = 2.0f * (d3 - d1) - d2 + d4;
    out[4 * out_stride + c] = 2.0f * (d1 - d3) - d2 + d4;
    out[5 * out_stride + c] = 4.0f * d1 - 5.0f * d3 + d5;
  }
}

// out_i = (A^T m)_i (+ bias) for the six vectors m_k = in + k * in_stride of n floats each.
[[gnu::always_inline]] inline void output_rows(const float* __restrict in, std::int64_t in_stride,
                                               float* __restrict out, std::int64_t out_stride,
                                               const float* __restrict bias, std::int64_t n) {
  for (std::int64_t c = 0; c < n; ++c) {
    const float m0 = in[c], m1 = in[in_stride + c], m2 = in[2 * in_stride + c], m3 = in[3 * in_stride + c],
                m4 = in[4 * in_stride + c], m5 = in[5 * in_stride + c];
    const float b = bias != nullptr ? bias[c] : 0.0f;
    const float sum12 = m1 + m2, diff12 = m1 - m2, sum34 = m3 + m4, diff34 = m3 - m4;
    out[c] = b + m0 + sum12 + sum34;
    out[out_stride + c] = b + diff12 + 2.0f * diff34;
    out[2 * out_stride + c] = b + sum12 + 4.0f * sum34;
    out[3 * out_stride + c] = b + diff12 + 8.0f * diff34 + m5;
  }
}

// tile[r][col][:] = the size x size window at (y0, x0) of a channels-last image of height x width pixels and
// `channels` floats each, zero past the image's edge.
[[gnu::always_inline]] inline void gather_tile(const float* __restrict image, std::int64_t height, std::int64_t width,
                                               std::int64_t y0, std::int64_t x0, std::int64_t size,
                                               std::int64_t channels, float* __restrict tile) {
  for (std::int64_t r = 0; r < size; ++r) {
    for (std::int64_t col = 0; col < size; ++col) {
      float* dst = tile + (r * size + col) * channels;
      if (y0 + r >= height || x0 + col >= width) {
        std::fill(dst, dst + channels, 0.0f);
      } else {
        std::copy_n(image + ((y0 + r) * width + x0 + col) * channels, channels, dst);
      }
    }
  }
}

// V[p][t][c] = (B^T d_t B)[p] for the tiles t of images [first, first + count) of `x` (channels-last),
// zero past the image's edge. `scratch` holds 2 x 36 x C floats.
[[gnu::always_inline]] inline void transform_input_body(const Geometry& g, const float* __restrict x,
                                                        std::int64_t first, std::int64_t count, float* __restrict v,
                                                        std::int64_t point_stride, float* __restrict scratch) {
  const std::int64_t c_count = g.channels, block_tiles = count * g.tiles_per_image();
  float* __restrict tile = scratch;
  float* __restrict rows = scratch + kPoints * c_count;
  for (std::int64_t t = 0; t < block_tiles; ++t) {
    const std::int64_t image = first + t / g.tiles_per_image(), in_image = t % g.tiles_per_image();
    const std::int64_t y0 = (in_image / g.tiles_wide) * kOutTile, x0 = (in_image % g.tiles_wide) * kOutTile;
    gather_tile(x + image * g.height * g.width * c_count, g.height, g.width, y0, x0, kInTile, c_count, tile);
    // B^T d down each column, then B along each row, into the 36 matrices' row t.
    for (std::int64_t col = 0; col < kInTile; ++col) {
      input_rows(tile + col * c_count, kInTile * c_count, rows + col * c_count, kInTile * c_count, c_count);
    }
    for (std::int64_t r = 0; r < kInTile; ++r) {
      input_rows(rows + r * kInTile * c_count, c_count, v + r * kInTile * point_stride + t * c_count, point_stride,
                 c_count);
    }
  }
}
KILN_ISA_VARIANTS(void, transform_input,
                  (const Geometry& g, const float* __restrict x, std::int64_t first, std::int64_t count,
                   float* __restrict v, std::int64_t point_stride, float* __restrict scratch),
                  transform_input_body(g, x, first, count, v, point_stride, scratch))

// out (channels-last) = A^T m_t A + bias for the tiles t of images [first, first + count), from the 36
// matrices M[p][t][o]; the parts of edge tiles outside the output are dropped. `scratch` holds
// (24 + 16) x O floats.
[[gnu::always_inline]] inline void transform_output_body(const Geometry& g, const float* __restrict m,
                                                         std::int64_t point_stride, const float* __restrict bias,
                                                         std::int64_t first,
                                                         std::int64_t count, float* __restrict out,
                                                         float* __restrict scratch) {
  const std::int64_t o_count = g.outputs, block_tiles = count * g.tiles_per_image();
  float* __restrict rows = scratch;                                 // [4][6][O]
  float* __restrict edge = scratch + kOutTile * kInTile * o_count;  // [4][4][O]
  for (std::int64_t t = 0; t < block_tiles; ++t) {
    const std::int64_t image = first + t / g.tiles_per_image(), in_image = t % g.tiles_per_image();
    const std::int64_t y0 = (in_image / g.tiles_wide) * kOutTile, x0 = (in_image % g.tiles_wide) * kOutTile;
    for (std::int64_t col = 0; col < kInTile; ++col) {
      output_rows(m + col * point_stride + t * o_count, kInTile * point_stride, rows + col * o_count,
                  kInTile * o_count, nullptr, o_count);
    }
    float* image_out = out + image * g.out_height * g.out_width * o_count;
    const bool whole = y0 + kOutTile <= g.out_height && x0 + kOutTile <= g.out_width;
    for (std::int64_t r = 0; r < kOutTile; ++r) {
      // A whole tile's row of 4 pixels is 4 x O consecutive floats of the channels-last output.
      float* dst = whole ? image_out + ((y0 + r) * g.out_width + x0) * o_count : edge + r * kOutTile * o_count;
      output_rows(rows + r * kInTile * o_count, o_count, dst, o_count, bias, o_count);
    }
    if (whole) continue;
    for (std::int64_t r = 0; r < kOutTile && y0 + r < g.out_height; ++r) {
      for (std::int64_t col = 0; col < kOutTile && x0 + col < g.out_width; ++col) {
        std::copy_n(edge + (r * kOutTile + col) * o_count, o_count,
                    image_out + ((y0 + r) * g.out_width + x0 + col) * o_count);
      }
    }
  }
}
KILN_ISA_VARIANTS(void, transform_output,
                  (const Geometry& g, const float* __restrict m, std::int64_t point_stride, const float* __restrict bias,
                   std::int64_t first, std::int64_t count, float* __restrict out, float* __restrict scratch),
                  transform_output_body(g, m, point_stride, bias, first, count, out, scratch))

// out_i = (A y)_i for the four vectors y_k = in + k * in_stride of n floats each.
[[gnu::always_inline]] inline void grad_rows(const float* __restrict in, std::int64_t in_stride, float* __restrict out,
                                             std::int64_t out_stride, std::int64_t n) {
  for (std::int64_t c = 0; c < n; ++c) {
    const float y0 = in[c], y1 = in[in_stride + c], y2 = in[2 * in_stride + c], y3 = in[3 * in_stride + c];
    const float even = y0 + y2, odd = y1 + y3, even4 = y0 + 4.0f * y2, odd8 = 2.0f * y1 + 8.0f * y3;
    out[c] = y0;
    out[out_stride + c] = even + odd;
    out[2 * out_stride + c] = even - odd;
    out[3 * out_stride + c] = even4 + odd8;
    out[4 * out_stride + c] = even4 - odd8;
    out[5 * out_stride + c] = y3;
  }
}

// W[p][t][o] = (A dy_t A^T)[p] for the 4x4 tiles t of the output gradient `grad` (channels-last) of images
// [first, first + count), zero past the output's edge (those outputs were dropped). `scratch` holds
// (16 + 24) x O floats.
[[gnu::always_inline]] inline void transform_grad_body(const Geometry& g, const float* __restrict grad,
                                                       std::int64_t first, std::int64_t count, float* __restrict w,
                                                       std::int64_t point_stride, float* __restrict scratch) {
  const std::int64_t o_count = g.outputs, block_tiles = count * g.tiles_per_image();
  float* __restrict tile = scratch;                                  // [4][4][O]
  float* __restrict rows = scratch + kOutTile * kOutTile * o_count;  // [6][4][O]
  for (std::int64_t t = 0; t < block_tiles; ++t) {
    const std::int64_t image = first + t / g.tiles_per_image(), in_image = t % g.tiles_per_image();
    const std::int64_t y0 = (in_image / g.tiles_wide) * kOutTile, x0 = (in_image % g.tiles_wide) * kOutTile;
    gather_tile(grad + image * g.out_height * g.out_width * o_count, g.out_height, g.out_width, y0, x0, kOutTile,
                o_count, tile);
    for (std::int64_t col = 0; col < kOutTile; ++col) {
      grad_rows(tile + col * o_count, kOutTile * o_count, rows + col * o_count, kOutTile * o_count, o_count);
    }
    for (std::int64_t r = 0; r < kInTile; ++r) {
      grad_rows(rows + r * kOutTile * o_count, o_count, w + r * kInTile * point_stride + t * o_count, point_stride,
                o_count);
    }
  }
}
KILN_ISA_VARIANTS(void, transform_grad,
                  (const Geometry& g, const float* __restrict grad, std::int64_t first, std::int64_t count,
                   float* __restrict w, std::int64_t point_stride, float* __restrict scratch),
                  transform_grad_body(g, grad, first, count, w, point_stride, scratch))

// Winograd's G [6, 3].
at::Tensor winograd_g(const at::TensorOptions& options) {
  return at::tensor({1.0f / 4, 0.0f, 0.0f,             //
                     -1.0f / 6, -1.0f / 6, -1.0f / 6,  //
                     -1.0f / 6, 1.0f / 6, -1.0f / 6,   //
                     1.0f / 24, 1.0f / 12, 1.0f / 6,   //
                     1.0f / 24, -1.0f / 12, 1.0f / 6,  //
                     0.0f, 0.0f, 1.0f},
                    options)
      .view({kInTile, 3});
}

// G g G^T of every 3x3 filter of `weight` [O, C, 3, 3], as the 36 matrices U[p] = [C][O].
at::Tensor transform_weight(const at::Tensor& weight) {
  const at::Tensor g = winograd_g(weight.options());
  const at::Tensor transformed = at::matmul(at::matmul(g, weight), g.t());  // [O, C, 6, 6]
  return transformed.flatten(2).permute({2, 1, 0}).contiguous();
}

// The 3x3 convolution of `x` [N, C, H, W] with the transformed weights `u` [36, C, O], plus `bias`:
// channels-last [N, O, H - 2, W - 2].
Geometry geometry_of(const at::Tensor& x, std::int64_t outputs) {
  Geometry g{};
  g.channels = x.size(1);
  g.height = x.size(2);
  g.width = x.size(3);
  g.outputs = outputs;
  g.out_height = g.height - 2;
  g.out_width = g.width - 2;
  g.tiles_high = (g.out_height + kOutTile - 1) / kOutTile;
  g.tiles_wide = (g.out_width + kOutTile - 1) / kOutTile;
  return g;
}

// [36, tiles, width] floats, each of the 36 matrices one cache line further along than a plain [36, tiles, width]
// tensor puts it: the transforms write (and read) the 36 matrices' rows of a tile at once, and with strides of
// 4 KiB multiples (144 tiles x 32 or 64 floats) those 36 rows all fall into the same few L1 cache sets.
at::Tensor padded_points(std::int64_t tiles, std::int64_t width, const at::TensorOptions& options) {
  constexpr std::int64_t kCacheLineFloats = 16;
  return at::empty({kPoints, tiles * width + kCacheLineFloats}, options)
      .narrow(1, 0, tiles * width)
      .view({kPoints, tiles, width});
}

// Runs body(block, first, count, v, m, scratch) for the blocks of up to kImagesPerBlock images of a batch of n:
// images [first, first + count), with this thread's buffers v [36, tiles, C] and m [36, tiles, m_width] and
// scratch of 2 x 36 x max(C, O) floats. The blocks are shared out between the intra-op threads, each of which
// transforms and multiplies whole blocks: no fork-join between a block's transforms and its products, which
// run in the thread's own (single-threaded, nested) MKL call.
template <typename Body>
void for_each_block(const Geometry& g, std::int64_t n, std::int64_t m_width, const at::TensorOptions& options,
                    const Body& body) {
  const std::int64_t per_block = std::min(kImagesPerBlock, n);
  const std::int64_t blocks = (n + per_block - 1) / per_block;
  at::parallel_for(0, blocks, 1, [&](std::int64_t begin, std::int64_t end) {
    std::vector<float> scratch(static_cast<std::size_t>(2 * kPoints * std::max(g.channels, g.outputs)));
    at::Tensor v = padded_points(per_block * g.tiles_per_image(), g.channels, options);
    at::Tensor m = padded_points(per_block * g.tiles_per_image(), m_width, options);
    for (std::int64_t block = begin; block < end; ++block) {
      const std::int64_t first = block * per_block, count = std::min(per_block, n - first);
      const std::int64_t block_tiles = count * g.tiles_per_image();
      if (block_tiles != v.size(1)) {
        v = padded_points(block_tiles, g.channels, options);
        m = padded_points(block_tiles, m_width, options);
      }
      body(block, first, count, v, m, scratch.data());
    }
  });
}

at::Tensor winograd_conv(const at::Tensor& x, const at::Tensor& u, const float* bias) {
  const at::Tensor input = x.contiguous(at::MemoryFormat::ChannelsLast);
  const Geometry g = geometry_of(input, u.size(2));
  const std::int64_t n = input.size(0);
  at::Tensor out = at::empty({n, g.outputs, g.out_height, g.out_width},
                             input.options().memory_format(at::MemoryFormat::ChannelsLast));
  const float* in_data = input.const_data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  for_each_block(g, n, g.outputs, input.options(),
                 [&](std::int64_t, std::int64_t first, std::int64_t count, at::Tensor& v, at::Tensor& m,
                     float* scratch) {
                   transform_input(g, in_data, first, count, v.data_ptr<float>(), v.stride(0), scratch);
                   at::bmm_out(m, v, u);  // [36, tiles, O]
                   transform_output(g, m.const_data_ptr<float>(), m.stride(0), bias, first, count, out_data, scratch);
                 });
  return out;
}

// d(loss)/d(weight) [O, C, 3, 3] of the convolution of `x` whose output gradient is `grad` (both
// channels-last): G^T [sum over tiles of (B^T d B) . (A dy A^T)] G, the sums as 36 products
// [C x tiles] x [tiles x O] per block of images, added in block order whatever the thread count.
at::Tensor winograd_weight_grad(const at::Tensor& x, const at::Tensor& grad) {
  const Geometry g = geometry_of(x, grad.size(1));
  const std::int64_t n = x.size(0);
  const std::int64_t per_block = std::min(kImagesPerBlock, n);
  at::Tensor partials = at::empty({(n + per_block - 1) / per_block, kPoints, g.channels, g.outputs}, x.options());
  const float* x_data = x.const_data_ptr<float>();
  const float* grad_data = grad.const_data_ptr<float>();
  for_each_block(g, n, g.outputs, x.options(),
                 [&](std::int64_t block, std::int64_t first, std::int64_t count, at::Tensor& v, at::Tensor& w,
                     float* scratch) {
                   transform_input(g, x_data, first, count, v.data_ptr<float>(), v.stride(0), scratch);
                   transform_grad(g, grad_data, first, count, w.data_ptr<float>(), w.stride(0), scratch);
                   at::Tensor partial = partials.select(0, block);
                   at::bmm_out(partial, v.transpose(1, 2), w);  // [36, C, O]
                 });
  const at::Tensor gm = winograd_g(x.options());
  const at::Tensor summed = partials.sum(0).permute({2, 1, 0}).reshape({g.outputs, g.channels, kInTile, kInTile});
  return at::matmul(at::matmul(gm.t(), summed), gm);  // [O, C, 3, 3]
}

struct Conv3x3Winograd : torch::autograd::Function<Conv3x3Winograd> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias) {
    const at::Tensor bias_values = bias.contiguous();
    at::Tensor out = winograd_conv(x, transform_weight(weight), bias_values.const_data_ptr<float>());
    if (ctx != nullptr) ctx->save_for_backward({x.contiguous(at::MemoryFormat::ChannelsLast), weight});
    return out;
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor grad = grads[0].contiguous(at::MemoryFormat::ChannelsLast);
    // The input gradient is oneDNN's: in the same Winograd form (the output gradient padded by 2, convolved
    // with the flipped weight) it measured slower than oneDNN's direct kernel (64 input channels, 49 tiles
    // per image instead of 36, products only 32 wide).
    at::Tensor grad_input, grad_weight, grad_bias;
    if (ctx->needs_input_grad(0)) {
      grad_input = std::get<0>(at::convolution_backward(grad, x, weight, c10::IntArrayRef{weight.size(0)}, {1, 1},
                                                        {0, 0}, {1, 1}, false, {0, 0}, 1, {true, false, false}));
    }
    if (ctx->needs_input_grad(1)) grad_weight = winograd_weight_grad(x, grad);
    if (ctx->needs_input_grad(2)) grad_bias = grad.sum({0, 2, 3});
    if (grad_weight.defined() && grad_weight.strides() != weight.strides()) {
      // In the weight's own strides, which the fused optimizer step needs of a gradient.
      grad_weight = at::empty_like(weight).copy_(grad_weight);
    }
    return {grad_input, grad_weight, grad_bias};
  }
};

// Measured against oneDNN's direct kernels for mnist_cnn's conv2 (batch 32, AVX2): 1.9-2.0x the forward and
// 1.3x forward + backward with one thread, 1.7x and 1.3x with two.
bool applies(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  return x.device().is_cpu() && x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && bias.defined() &&
         bias.scalar_type() == at::kFloat && x.dim() == 4 && weight.dim() == 4 && weight.size(1) == x.size(1) &&
         weight.size(2) == 3 && weight.size(3) == 3 && x.size(2) >= 3 && x.size(3) >= 3 &&
         !at::autocast::is_autocast_enabled(at::kCPU);
}

}  // namespace

at::Tensor conv3x3_winograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  if (!applies(x, weight, bias)) return at::conv2d(x, weight, bias).contiguous(at::MemoryFormat::ChannelsLast);
  if (at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad() || bias.requires_grad())) {
    return Conv3x3Winograd::apply(x, weight, bias);
  }
  return Conv3x3Winograd::forward(nullptr, x, weight, bias);  // evaluation: nothing kept for a backward pass
}

}  // namespace kiln::detail
