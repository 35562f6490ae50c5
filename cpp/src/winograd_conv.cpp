#include "kiln/detail/winograd_conv.hpp"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "kiln/detail/isa_dispatch.hpp"
#include "kiln/detail/relu_max_pool.hpp"

// MKL's batched matrix product (its LP64 interface: 32-bit integers; CBLAS's enum values), which the x86-64 Linux
// torch wheels' libtorch_cpu exports. A weak reference, null in a torch build without MKL; elsewhere (aarch64,
// macOS, whose linker takes no weak reference to a symbol it cannot see) none is made. Without it at::bmm_out
// computes the same products.
#if defined(__x86_64__) && defined(__linux__)
#define KILN_MKL_SGEMM_BATCH 1
extern "C" void cblas_sgemm_batch(int layout, const int* transa, const int* transb, const int* m, const int* n,
                                  const int* k, const float* alpha, const float** a, const int* lda, const float** b,
                                  const int* ldb, const float* beta, float** c, const int* ldc, int group_count,
                                  const int* group_size) __attribute__((weak));
#endif

namespace kiln::detail {
namespace {

#ifdef KILN_MKL_SGEMM_BATCH
constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112;

// A [batch, rows, columns] float tensor as one of cblas_sgemm_batch's operands: rows a leading dimension apart
// with unit column stride (no transpose), or its transpose stored so; none when it is neither.
struct BlasOperand {
  int transpose, leading;
};

std::optional<BlasOperand> blas_operand(const at::Tensor& t) {
  const auto fits = [](std::int64_t value) { return value >= 1 && value <= std::numeric_limits<int>::max(); };
  if (t.stride(2) == 1 && fits(t.stride(1)) && t.stride(1) >= t.size(2)) {
    return BlasOperand{kCblasNoTrans, static_cast<int>(t.stride(1))};
  }
  if (t.stride(1) == 1 && fits(t.stride(2)) && t.stride(2) >= t.size(1)) {
    return BlasOperand{kCblasTrans, static_cast<int>(t.stride(2))};
  }
  return std::nullopt;
}
#endif

// out[i] = a[i] b[i] for the 36 points' matrices, as at::bmm_out. at::bmm_out runs them one at a time (a select
// of each operand and a dispatched addmm per matrix, ~5 us each), which for mnist_cnn's conv2 (144 x 32 x 64 a
// product, ~4 us of work) cost as much as the products; one cblas_sgemm_batch call takes all 36.
void point_products(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
#ifdef KILN_MKL_SGEMM_BATCH
  const auto op_a = blas_operand(a), op_b = blas_operand(b), op_out = blas_operand(out);
  const auto fits = [](std::int64_t size) { return size <= std::numeric_limits<int>::max(); };
  if (cblas_sgemm_batch == nullptr || !op_a || !op_b || !op_out || op_out->transpose != kCblasNoTrans ||
      !fits(a.size(1)) || !fits(b.size(2)) || !fits(a.size(2))) {
    at::bmm_out(out, a, b);
    return;
  }
  const int count = static_cast<int>(a.size(0));
  std::vector<const float*> a_ptrs(count), b_ptrs(count);
  std::vector<float*> out_ptrs(count);
  for (int i = 0; i < count; ++i) {
    a_ptrs[i] = a.const_data_ptr<float>() + i * a.stride(0);
    b_ptrs[i] = b.const_data_ptr<float>() + i * b.stride(0);
    out_ptrs[i] = out.data_ptr<float>() + i * out.stride(0);
  }
  const int m = static_cast<int>(a.size(1)), n = static_cast<int>(b.size(2)), k = static_cast<int>(a.size(2));
  const float alpha = 1.0f, beta = 0.0f;
  cblas_sgemm_batch(kCblasRowMajor, &op_a->transpose, &op_b->transpose, &m, &n, &k, &alpha, a_ptrs.data(),
                    &op_a->leading, b_ptrs.data(), &op_b->leading, &beta, out_ptrs.data(), &op_out->leading, 1, &count);
#else
  at::bmm_out(out, a, b);
#endif
}

// Lavin & Gray's F(4x4, 3x3): Y = A^T [(G g G^T) . (B^T d B)] A for a 6x6 input tile d and a 3x3 filter g.
constexpr std::int64_t kOutTile = 4;
constexpr std::int64_t kInTile = 6;
constexpr std::int64_t kPoints = kInTile * kInTile;

// A block of images is what one thread transforms and multiplies at a time. Its transformed tiles (36
// points x (input + output channels) floats per tile) should stay in the core's 2 MB L2 cache between the
// transforms and the products, and it should hold enough tiles for the products to run near MKL's peak
// (>= 64 rows). mnist_cnn's conv2 (26x26 images, 32 -> 64 channels) comes to 4 images a block.
constexpr std::int64_t kBlockBytes = std::int64_t{2} << 20;
constexpr std::int64_t kMinBlockTiles = 64;
// The batch is cut into an even number of blocks (where it has two or more images), so the two threads
// of a 2-core machine take the same number of images. The cut depends on the geometry alone, never on the
// thread count, so the values (and the weight gradient's order of sums) are the same with any.
constexpr std::int64_t kBlockMultiple = 2;

struct Geometry {
  std::int64_t channels, height, width;  // input, channels-last
  std::int64_t outputs;                  // output channels
  std::int64_t padding;                  // zeros around the input, on all four sides
  std::int64_t out_height, out_width;    // height + 2 padding - 2
  std::int64_t tiles_high, tiles_wide;   // 4x4 output tiles, the last ones cut by the output's edge
  std::int64_t tiles_per_image() const { return tiles_high * tiles_wide; }
  // The first of output tile t's pixels (row, column), counted in the image's tiles.
  std::int64_t tile_y(std::int64_t t) const { return (t / tiles_wide) * kOutTile; }
  std::int64_t tile_x(std::int64_t t) const { return (t % tiles_wide) * kOutTile; }
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
// `channels` floats each, zero outside the image (y0 and x0 may be negative: the padding).
[[gnu::always_inline]] inline void gather_tile(const float* __restrict image, std::int64_t height, std::int64_t width,
                                               std::int64_t y0, std::int64_t x0, std::int64_t size,
                                               std::int64_t channels, float* __restrict tile) {
  if (y0 >= 0 && x0 >= 0 && y0 + size <= height && x0 + size <= width) {
    // Inside the image: each row of the window is size x channels consecutive floats.
    for (std::int64_t r = 0; r < size; ++r) {
      std::copy_n(image + ((y0 + r) * width + x0) * channels, size * channels, tile + r * size * channels);
    }
    return;
  }
  for (std::int64_t r = 0; r < size; ++r) {
    for (std::int64_t col = 0; col < size; ++col) {
      float* dst = tile + (r * size + col) * channels;
      const std::int64_t y = y0 + r, x = x0 + col;
      if (y < 0 || y >= height || x < 0 || x >= width) {
        std::fill(dst, dst + channels, 0.0f);
      } else {
        std::copy_n(image + (y * width + x) * channels, channels, dst);
      }
    }
  }
}

// V[p][t][c] = (B^T d_t B)[p] for the tiles t of images [first, first + count) of `x` (channels-last):
// output tile (y0, x0) reads the 6x6 input tile at (y0 - padding, x0 - padding), zero outside the image.
// `scratch` holds 2 x 36 x C floats.
[[gnu::always_inline]] inline void transform_input_body(const Geometry& g, const float* __restrict x,
                                                        std::int64_t first, std::int64_t count, float* __restrict v,
                                                        std::int64_t point_stride, float* __restrict scratch) {
  const std::int64_t c_count = g.channels, block_tiles = count * g.tiles_per_image();
  float* __restrict tile = scratch;
  float* __restrict rows = scratch + kPoints * c_count;
  for (std::int64_t t = 0; t < block_tiles; ++t) {
    const std::int64_t image = first + t / g.tiles_per_image(), in_image = t % g.tiles_per_image();
    gather_tile(x + image * g.height * g.width * c_count, g.height, g.width, g.tile_y(in_image) - g.padding,
                g.tile_x(in_image) - g.padding, kInTile, c_count, tile);
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

// A^T m_t A + bias for tile t, from the 36 matrices M[p][t][o]: its 4 rows of 4 pixels x O floats, row r written
// at dst + r * row_stride; `rows` holds the [4][6][O] half-way values. Shared by both output transforms.
[[gnu::always_inline]] inline void output_tile(const float* __restrict m, std::int64_t point_stride, std::int64_t t,
                                               std::int64_t o_count, const float* __restrict bias,
                                               float* __restrict rows, float* __restrict dst, std::int64_t row_stride) {
  for (std::int64_t col = 0; col < kInTile; ++col) {
    output_rows(m + col * point_stride + t * o_count, kInTile * point_stride, rows + col * o_count, kInTile * o_count,
                nullptr, o_count);
  }
  for (std::int64_t r = 0; r < kOutTile; ++r) {
    output_rows(rows + r * kInTile * o_count, o_count, dst + r * row_stride, o_count, bias, o_count);
  }
}

// out (channels-last) = A^T m_t A + bias for the tiles t of images [first, first + count), from the 36
// matrices M[p][t][o] (bias: O floats, or null for none); the parts of edge tiles outside the output are
// dropped. `scratch` holds (24 + 16) x O floats.
[[gnu::always_inline]] inline void transform_output_body(const Geometry& g, const float* __restrict m,
                                                         std::int64_t point_stride, const float* __restrict bias,
                                                         std::int64_t first, std::int64_t count, float* __restrict out,
                                                         float* __restrict scratch) {
  const std::int64_t o_count = g.outputs, block_tiles = count * g.tiles_per_image();
  float* __restrict rows = scratch;                                 // [4][6][O]
  float* __restrict edge = scratch + kOutTile * kInTile * o_count;  // [4][4][O]
  for (std::int64_t t = 0; t < block_tiles; ++t) {
    const std::int64_t image = first + t / g.tiles_per_image(), in_image = t % g.tiles_per_image();
    const std::int64_t y0 = g.tile_y(in_image), x0 = g.tile_x(in_image);
    float* image_out = out + image * g.out_height * g.out_width * o_count;
    const bool whole = y0 + kOutTile <= g.out_height && x0 + kOutTile <= g.out_width;
    // A whole tile's row of 4 pixels is 4 x O consecutive floats of the channels-last output.
    if (whole) {
      output_tile(m, point_stride, t, o_count, bias, rows, image_out + (y0 * g.out_width + x0) * o_count,
                  g.out_width * o_count);
      continue;
    }
    output_tile(m, point_stride, t, o_count, bias, rows, edge, kOutTile * o_count);
    for (std::int64_t r = 0; r < kOutTile && y0 + r < g.out_height; ++r) {
      for (std::int64_t col = 0; col < kOutTile && x0 + col < g.out_width; ++col) {
        std::copy_n(edge + (r * kOutTile + col) * o_count, o_count,
                    image_out + ((y0 + r) * g.out_width + x0 + col) * o_count);
      }
    }
  }
}
KILN_ISA_VARIANTS(void, transform_output,
                  (const Geometry& g, const float* __restrict m, std::int64_t point_stride,
                   const float* __restrict bias, std::int64_t first, std::int64_t count, float* __restrict out,
                   float* __restrict scratch),
                  transform_output_body(g, m, point_stride, bias, first, count, out, scratch))

// transform_output's tiles ReLU'd and max-pooled 2x2 (floor) as they come, into `pooled` ([N, PH, PW, O] with
// PH = out_height / 2, PW = out_width / 2) and, where `winner` is not null, each value's winner (relu_max_pool2x2's
// values and winners: output tiles start at even pixels, so each window lies in one tile). The convolution's
// output itself is never written. `scratch` holds (24 + 16) x O floats.
[[gnu::always_inline]] inline void transform_output_pooled_body(const Geometry& g, const float* __restrict m,
                                                                std::int64_t point_stride, const float* __restrict bias,
                                                                std::int64_t first, std::int64_t count,
                                                                float* __restrict pooled,
                                                                std::uint8_t* __restrict winner,
                                                                float* __restrict scratch) {
  const std::int64_t o_count = g.outputs, block_tiles = count * g.tiles_per_image();
  const std::int64_t pooled_height = g.out_height / 2, pooled_width = g.out_width / 2;
  float* __restrict rows = scratch;                                 // [4][6][O]
  float* __restrict tile = scratch + kOutTile * kInTile * o_count;  // [4][4][O]
  for (std::int64_t t = 0; t < block_tiles; ++t) {
    const std::int64_t image = first + t / g.tiles_per_image(), in_image = t % g.tiles_per_image();
    const std::int64_t y0 = g.tile_y(in_image), x0 = g.tile_x(in_image);
    output_tile(m, point_stride, t, o_count, bias, rows, tile, kOutTile * o_count);
    for (std::int64_t wy = 0; wy < kOutTile / 2 && y0 / 2 + wy < pooled_height; ++wy) {
      for (std::int64_t wx = 0; wx < kOutTile / 2 && x0 / 2 + wx < pooled_width; ++wx) {
        const float* a = tile + (2 * wy * kOutTile + 2 * wx) * o_count;
        const std::int64_t at = ((image * pooled_height + y0 / 2 + wy) * pooled_width + x0 / 2 + wx) * o_count;
        pooling::window(a, a + o_count, a + kOutTile * o_count, a + (kOutTile + 1) * o_count, pooled + at,
                        winner != nullptr ? winner + at : nullptr, o_count);
      }
    }
  }
}
KILN_ISA_VARIANTS(void, transform_output_pooled,
                  (const Geometry& g, const float* __restrict m, std::int64_t point_stride,
                   const float* __restrict bias, std::int64_t first, std::int64_t count, float* __restrict pooled,
                   std::uint8_t* __restrict winner, float* __restrict scratch),
                  transform_output_pooled_body(g, m, point_stride, bias, first, count, pooled, winner, scratch))

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
    const std::int64_t y0 = g.tile_y(in_image), x0 = g.tile_x(in_image);
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

// out_i = (G g)_i for the three vectors g_k = in + k * in_stride of n floats each; G is Winograd's [6, 3]
// (rows 1/4 0 0, -1/6 -1/6 -1/6, -1/6 1/6 -1/6, 1/24 1/12 1/6, 1/24 -1/12 1/6, 0 0 1).
// G's fractions as float factors: multiplications, not divisions (which the compiler keeps exact, several
// times slower).
constexpr float kSixth = 1.0f / 6, kTwelfth = 1.0f / 12, kTwentyFourth = 1.0f / 24;

[[gnu::always_inline]] inline void weight_rows(const float* __restrict in, std::int64_t in_stride,
                                               float* __restrict out, std::int64_t out_stride, std::int64_t n) {
  for (std::int64_t c = 0; c < n; ++c) {
    const float g0 = in[c], g1 = in[in_stride + c], g2 = in[2 * in_stride + c];
    const float outer = g0 * kTwentyFourth + g2 * kSixth, middle = g1 * kTwelfth;
    out[c] = g0 * 0.25f;
    out[out_stride + c] = -(g0 + g1 + g2) * kSixth;
    out[2 * out_stride + c] = -(g0 - g1 + g2) * kSixth;
    out[3 * out_stride + c] = outer + middle;
    out[4 * out_stride + c] = outer - middle;
    out[5 * out_stride + c] = g2;
  }
}

// u[p][c][o] = (G g G^T)[p] for the filters g = w[c][:][:][o] of the input channels [first, end), w in
// [C][3][3][O] order. `scratch` holds 18 x O floats.
[[gnu::always_inline]] inline void transform_weight_body(const float* __restrict w, std::int64_t channels,
                                                         std::int64_t outputs, std::int64_t first, std::int64_t end,
                                                         float* __restrict u, float* __restrict scratch) {
  const std::int64_t o_count = outputs;
  for (std::int64_t c = first; c < end; ++c) {
    const float* filter = w + c * 9 * o_count;
    for (std::int64_t col = 0; col < 3; ++col) {  // G g down each column: rows[i][col][o]
      weight_rows(filter + col * o_count, 3 * o_count, scratch + col * o_count, 3 * o_count, o_count);
    }
    for (std::int64_t r = 0; r < kInTile; ++r) {  // then G^T along each row, into the 36 matrices' row c
      weight_rows(scratch + r * 3 * o_count, o_count, u + (r * kInTile * channels + c) * o_count, channels * o_count,
                  o_count);
    }
  }
}
KILN_ISA_VARIANTS(void, transform_weight_channels,
                  (const float* __restrict w, std::int64_t channels, std::int64_t outputs, std::int64_t first,
                   std::int64_t end, float* __restrict u, float* __restrict scratch),
                  transform_weight_body(w, channels, outputs, first, end, u, scratch))

// G g G^T of every 3x3 filter of `weight` [O, C, 3, 3] (any strides), as the 36 matrices U[p] = [C][O]. A loop
// vectorised over the output channels: at::matmul's broadcast [6, 3] x [O, C, 3, 3] products took 25 ms for a
// 256 x 256 weight, three times oneDNN's whole forward convolution of resnet18's layer3 at 64 px.
at::Tensor transform_weight(const at::Tensor& weight) {
  const std::int64_t outputs = weight.size(0), channels = weight.size(1);
  const at::Tensor w = weight.permute({1, 2, 3, 0}).contiguous();  // [C, 3, 3, O]
  at::Tensor u = at::empty({kPoints, channels, outputs}, weight.options());
  const float* w_data = w.const_data_ptr<float>();
  float* u_data = u.data_ptr<float>();
  at::parallel_for(0, channels, 8, [&](std::int64_t begin, std::int64_t end) {
    std::vector<float> scratch(static_cast<std::size_t>(kInTile * 3 * outputs));
    transform_weight_channels(w_data, channels, outputs, begin, end, u_data, scratch.data());
  });
  return u;
}

// out_k = (G^T m)_k for the six vectors m_i = in + i * in_stride of n floats each.
[[gnu::always_inline]] inline void weight_grad_rows(const float* __restrict in, std::int64_t in_stride,
                                                    float* __restrict out, std::int64_t out_stride, std::int64_t n) {
  for (std::int64_t c = 0; c < n; ++c) {
    const float m0 = in[c], m1 = in[in_stride + c], m2 = in[2 * in_stride + c], m3 = in[3 * in_stride + c],
                m4 = in[4 * in_stride + c], m5 = in[5 * in_stride + c];
    const float sum12 = m1 + m2, diff12 = m1 - m2, sum34 = m3 + m4, diff34 = m3 - m4;
    out[c] = m0 * 0.25f - sum12 * kSixth + sum34 * kTwentyFourth;
    out[out_stride + c] = -diff12 * kSixth + diff34 * kTwelfth;
    out[2 * out_stride + c] = (sum34 - sum12) * kSixth + m5;
  }
}

// grad[c][:][:][o] = G^T (sum over blocks of partials[block][:][c][o]) G for the input channels [first, end):
// the blocks' sums added in block order. partials: [blocks][36][C][O]; grad: [C][3][3][O]. `scratch` holds
// (36 + 18) x O floats.
[[gnu::always_inline]] inline void inverse_weight_body(const float* __restrict partials, std::int64_t blocks,
                                                       std::int64_t channels, std::int64_t outputs, std::int64_t first,
                                                       std::int64_t end, float* __restrict grad,
                                                       float* __restrict scratch) {
  const std::int64_t o_count = outputs, point_stride = channels * o_count, block_stride = kPoints * point_stride;
  float* __restrict sum = scratch;                       // [36][O]
  float* __restrict rows = scratch + kPoints * o_count;  // [3][6][O]
  for (std::int64_t c = first; c < end; ++c) {
    for (std::int64_t p = 0; p < kPoints; ++p) {
      float* __restrict dst = sum + p * o_count;
      const float* src = partials + p * point_stride + c * o_count;
      std::copy_n(src, o_count, dst);
      for (std::int64_t block = 1; block < blocks; ++block) {
        const float* add = src + block * block_stride;
        for (std::int64_t o = 0; o < o_count; ++o) dst[o] += add[o];
      }
    }
    for (std::int64_t col = 0; col < kInTile; ++col) {  // G^T down each column: rows[k][col][o]
      weight_grad_rows(sum + col * o_count, kInTile * o_count, rows + col * o_count, kInTile * o_count, o_count);
    }
    for (std::int64_t k = 0; k < 3; ++k) {  // then G along each row
      weight_grad_rows(rows + k * kInTile * o_count, o_count, grad + (c * 9 + k * 3) * o_count, o_count, o_count);
    }
  }
}
KILN_ISA_VARIANTS(void, inverse_weight_channels,
                  (const float* __restrict partials, std::int64_t blocks, std::int64_t channels, std::int64_t outputs,
                   std::int64_t first, std::int64_t end, float* __restrict grad, float* __restrict scratch),
                  inverse_weight_body(partials, blocks, channels, outputs, first, end, grad, scratch))

// The geometry of the convolution of `x` [N, C, H, W] (padded by `padding`) into `outputs` channels.
Geometry geometry_of(const at::Tensor& x, std::int64_t outputs, std::int64_t padding) {
  Geometry g{};
  g.channels = x.size(1);
  g.height = x.size(2);
  g.width = x.size(3);
  g.outputs = outputs;
  g.padding = padding;
  g.out_height = g.height + 2 * padding - 2;
  g.out_width = g.width + 2 * padding - 2;
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

// The number of blocks a batch of n images is cut into (see kBlockBytes): as many images a block as fit
// the L2 budget, at least kMinBlockTiles tiles, then a multiple of kBlockMultiple blocks.
std::int64_t block_count(const Geometry& g, std::int64_t n, std::int64_t m_width) {
  const std::int64_t image_bytes =
      g.tiles_per_image() * kPoints * (g.channels + m_width) * static_cast<std::int64_t>(sizeof(float));
  const std::int64_t images = std::max(
      {std::int64_t{1}, kBlockBytes / image_bytes, (kMinBlockTiles + g.tiles_per_image() - 1) / g.tiles_per_image()});
  const std::int64_t blocks = (n + images - 1) / images;
  return std::min(n, (blocks + kBlockMultiple - 1) / kBlockMultiple * kBlockMultiple);
}

// Block b of `blocks` holds images [b n / blocks, (b + 1) n / blocks): sizes that differ by one at most.
std::int64_t block_start(std::int64_t block, std::int64_t blocks, std::int64_t n) {
  return block * n / blocks;
}

// Runs body(block, first, count, v, m, scratch) for the `blocks` blocks of a batch of n images (block_count):
// images [first, first + count), with this thread's buffers v [36, tiles, C] and m [36, tiles, m_width] and
// scratch of 2 x 36 x max(C, O) floats. The blocks are shared out between the intra-op threads, each of which
// transforms and multiplies whole blocks: no fork-join between a block's transforms and its products, which
// run in the thread's own (single-threaded, nested) MKL call.
template <typename Body>
void for_each_block(const Geometry& g, std::int64_t n, std::int64_t blocks, std::int64_t m_width,
                    const at::TensorOptions& options, const Body& body) {
  const std::int64_t most_tiles = (n + blocks - 1) / blocks * g.tiles_per_image();
  at::parallel_for(0, blocks, 1, [&](std::int64_t begin, std::int64_t end) {
    std::vector<float> scratch(static_cast<std::size_t>(2 * kPoints * std::max(g.channels, g.outputs)));
    const at::Tensor v_buffer = padded_points(most_tiles, g.channels, options);
    const at::Tensor m_buffer = padded_points(most_tiles, m_width, options);
    for (std::int64_t block = begin; block < end; ++block) {
      const std::int64_t first = block_start(block, blocks, n), count = block_start(block + 1, blocks, n) - first;
      const std::int64_t block_tiles = count * g.tiles_per_image();
      at::Tensor v = v_buffer.narrow(1, 0, block_tiles), m = m_buffer.narrow(1, 0, block_tiles);
      body(block, first, count, v, m, scratch.data());
    }
  });
}

// The 3x3 convolution of `x` (padded by `padding`) with the transformed weights `u` [36, C, O], plus `bias`
// (O floats, or null): channels-last [N, O, H + 2 padding - 2, W + 2 padding - 2]. With `pooled`, ReLU'd and
// max-pooled 2x2 in the output transform instead ([N, O, out_height / 2, out_width / 2]), the winners into `winner`
// ([N, PH, PW, O] bytes) unless it is null.
at::Tensor winograd_conv(const at::Tensor& x, const at::Tensor& u, const float* bias, std::int64_t padding,
                         bool pooled = false, std::uint8_t* winner = nullptr) {
  const at::Tensor input = x.contiguous(at::MemoryFormat::ChannelsLast);
  const Geometry g = geometry_of(input, u.size(2), padding);
  const std::int64_t n = input.size(0), scale = pooled ? 2 : 1;
  at::Tensor out = at::empty({n, g.outputs, g.out_height / scale, g.out_width / scale},
                             input.options().memory_format(at::MemoryFormat::ChannelsLast));
  const float* in_data = input.const_data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  for_each_block(
      g, n, block_count(g, n, g.outputs), g.outputs, input.options(),
      [&](std::int64_t, std::int64_t first, std::int64_t count, at::Tensor& v, at::Tensor& m, float* scratch) {
        transform_input(g, in_data, first, count, v.data_ptr<float>(), v.stride(0), scratch);
        point_products(m, v, u);  // [36, tiles, O]
        if (pooled) {
          transform_output_pooled(g, m.const_data_ptr<float>(), m.stride(0), bias, first, count, out_data, winner,
                                  scratch);
        } else {
          transform_output(g, m.const_data_ptr<float>(), m.stride(0), bias, first, count, out_data, scratch);
        }
      });
  return out;
}

// d(loss)/d(weight) [O, C, 3, 3] of the convolution of `x` (padded by `padding`) whose output gradient is
// `grad` (both channels-last): G^T [sum over tiles of (B^T d B) . (A dy A^T)] G, the sums as 36 products
// [C x tiles] x [tiles x O] per block of images, added in block order whatever the thread count.
at::Tensor winograd_weight_grad(const at::Tensor& x, const at::Tensor& grad, std::int64_t padding) {
  const Geometry g = geometry_of(x, grad.size(1), padding);
  const std::int64_t n = x.size(0);
  const std::int64_t blocks = block_count(g, n, g.outputs);
  at::Tensor partials = at::empty({blocks, kPoints, g.channels, g.outputs}, x.options());
  const float* x_data = x.const_data_ptr<float>();
  const float* grad_data = grad.const_data_ptr<float>();
  for_each_block(
      g, n, blocks, g.outputs, x.options(),
      [&](std::int64_t block, std::int64_t first, std::int64_t count, at::Tensor& v, at::Tensor& w, float* scratch) {
        transform_input(g, x_data, first, count, v.data_ptr<float>(), v.stride(0), scratch);
        transform_grad(g, grad_data, first, count, w.data_ptr<float>(), w.stride(0), scratch);
        at::Tensor partial = partials.select(0, block);
        point_products(partial, v.transpose(1, 2), w);  // [36, C, O]
      });
  at::Tensor summed = at::empty({g.channels, 3, 3, g.outputs}, x.options());
  const float* partial_data = partials.const_data_ptr<float>();
  float* summed_data = summed.data_ptr<float>();
  at::parallel_for(0, g.channels, 8, [&](std::int64_t begin, std::int64_t end) {
    std::vector<float> scratch(static_cast<std::size_t>((kPoints + 3 * kInTile) * g.outputs));
    inverse_weight_channels(partial_data, blocks, g.channels, g.outputs, begin, end, summed_data, scratch.data());
  });
  return summed.permute({3, 0, 1, 2});  // [O, C, 3, 3]
}

// The input gradient in Winograd form where it measured faster than oneDNN's convolution_backward: the
// output gradient, padded by 2 - padding, convolved with the weight flipped in both spatial dims and its
// channels swapped ([C, O, 3, 3]). With padding 1 (resnet18 at 64 px, batch 32, AVX2, one thread): 1.06x on
// layer1's 16x16 maps of 64 channels, 1.42x on layer2's 8x8 of 128. Not for padding 0 (mnist_cnn's conv2: 64
// input channels, 49 tiles per image instead of 36, products only 32 wide measured slower).
constexpr bool winograd_input_grad(std::int64_t padding) {
  return padding == 1;
}

struct Conv3x3Winograd : torch::autograd::Function<Conv3x3Winograd> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, std::int64_t padding) {
    // Optional: autograd's Function takes no undefined tensor as an input.
    const at::Tensor bias_values = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
    at::Tensor out = winograd_conv(x, transform_weight(weight),
                                   bias_values.defined() ? bias_values.const_data_ptr<float>() : nullptr, padding);
    if (ctx != nullptr) {
      ctx->save_for_backward({x.contiguous(at::MemoryFormat::ChannelsLast), weight});
      ctx->saved_data["padding"] = padding;
      ctx->saved_data["has_bias"] = bias_values.defined();
      ctx->saved_data["input_channels_last"] = x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
    }
    return out;
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    const std::int64_t padding = ctx->saved_data["padding"].toInt();
    const at::Tensor grad = grads[0].contiguous(at::MemoryFormat::ChannelsLast);
    at::Tensor grad_input, grad_weight, grad_bias;
    if (ctx->needs_input_grad(0)) {
      if (winograd_input_grad(padding)) {
        // In the input's own layout, as oneDNN's would be (a contiguous input is a contiguous layer's).
        const bool channels_last = ctx->saved_data["input_channels_last"].toBool();
        grad_input = winograd_conv(grad, transform_weight(weight.flip({2, 3}).transpose(0, 1)), nullptr, 2 - padding)
                         .contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
      } else {
        grad_input = std::get<0>(at::convolution_backward(grad, x, weight, std::nullopt, {1, 1}, {padding, padding},
                                                          {1, 1}, false, {0, 0}, 1, {true, false, false}));
      }
    }
    if (ctx->needs_input_grad(1)) grad_weight = winograd_weight_grad(x, grad, padding);
    // needs_input_grad counts the tensor inputs only: no index 2 without a bias.
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) grad_bias = grad.sum({0, 2, 3});
    if (grad_weight.defined()) {
      // In the weight's own strides, which the fused optimizer step needs of a gradient.
      grad_weight = at::empty_like(weight).copy_(grad_weight);
    }
    return {grad_input, grad_weight, grad_bias, at::Tensor()};
  }
};

}  // namespace

// Measured against oneDNN's direct kernels for mnist_cnn's conv2 (batch 32, AVX2): 1.9-2.0x the forward and
// 1.3x forward + backward with one thread, 1.7x and 1.3x with two.
bool conv3x3_winograd_applies(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                              std::int64_t padding) {
  return x.device().is_cpu() && x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
         (!bias.defined() || bias.scalar_type() == at::kFloat) && x.dim() == 4 && weight.dim() == 4 &&
         weight.size(1) == x.size(1) && weight.size(2) == 3 && weight.size(3) == 3 && x.size(0) > 0 && padding >= 0 &&
         x.size(2) + 2 * padding >= 3 && x.size(3) + 2 * padding >= 3 && !at::autocast::is_autocast_enabled(at::kCPU);
}

at::Tensor conv3x3_winograd_relu_max_pool(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                          std::int64_t padding, at::Tensor* winner) {
  TORCH_CHECK(
      conv3x3_winograd_applies(x, weight, bias, padding) && x.size(2) + 2 * padding >= 4 &&
          x.size(3) + 2 * padding >= 4,
      "conv3x3_winograd_relu_max_pool: not a convolution conv3x3_winograd computes, or its output is under 2x2");
  const at::Tensor bias_values = bias.defined() ? bias.contiguous() : at::Tensor();
  std::uint8_t* winner_data = nullptr;
  if (winner != nullptr) {
    const std::int64_t pooled_height = (x.size(2) + 2 * padding - 2) / 2,
                       pooled_width = (x.size(3) + 2 * padding - 2) / 2;
    *winner = at::empty({x.size(0), pooled_height, pooled_width, weight.size(0)}, x.options().dtype(at::kByte));
    winner_data = winner->data_ptr<std::uint8_t>();
  }
  return winograd_conv(x, transform_weight(weight),
                       bias_values.defined() ? bias_values.const_data_ptr<float>() : nullptr, padding, /*pooled=*/true,
                       winner_data);
}

at::Tensor conv3x3_winograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            std::int64_t padding) {
  if (!conv3x3_winograd_applies(x, weight, bias, padding)) {
    return at::conv2d(x, weight, bias, 1, padding).contiguous(at::MemoryFormat::ChannelsLast);
  }
  if (at::GradMode::is_enabled() &&
      (x.requires_grad() || weight.requires_grad() || (bias.defined() && bias.requires_grad()))) {
    return Conv3x3Winograd::apply(x, weight, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt, padding);
  }
  return Conv3x3Winograd::forward(nullptr, x, weight, bias, padding);  // evaluation: nothing kept for backward
}

}  // namespace kiln::detail
