#include "kiln/detail/relu_max_pool.hpp"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>

#include "kiln/detail/isa_dispatch.hpp"

namespace kiln::detail {
namespace {

// relu then 2x2 max pooling (stride 2, floor), as torch::max_pool2d(torch::relu(x), 2) computes it
// (the same values, and the same gradient: ties go to the first position in scan order, nothing to a
// window whose maximum is not positive), in one pass over channels-last activations each way. The
// two ATen ops cost ~2.5 ms of a ~12 ms bf16 training step here: their backward fills and converts
// the 24x24 gradient several times. Other layouts take the ATen ops.
// The pooling loops: per output position, the four inputs of its window for all channels at once
// (channels-last: each is a contiguous run of `c` values).
template <typename T>
[[gnu::always_inline]] inline void pool_rows(const T* __restrict in, T* __restrict out, std::uint8_t* __restrict winner,
                                             std::int64_t begin, std::int64_t end, std::int64_t h, std::int64_t w,
                                             std::int64_t c) {
  const std::int64_t oh = h / 2, ow = w / 2;
  for (std::int64_t row = begin; row < end; ++row) {
    const std::int64_t image = row / oh, y = row % oh;
    for (std::int64_t x = 0; x < ow; ++x) {
      const T* __restrict a = in + ((image * h + 2 * y) * w + 2 * x) * c;
      const T* __restrict b = a + c;
      const T* __restrict d = a + w * c;
      const T* __restrict e = d + c;
      T* __restrict o = out + (row * ow + x) * c;
      std::uint8_t* __restrict win = winner != nullptr ? winner + (row * ow + x) * c : nullptr;
      pooling::window(a, b, d, e, o, win, c);
    }
  }
}

// On the values' bits (U: an unsigned integer of T's size): a plain integer select vectorises.
template <typename U>
[[gnu::always_inline]] inline void unpool_rows(const U* __restrict grad_out, const std::uint8_t* __restrict winner,
                                               U* __restrict grad_in, std::int64_t begin, std::int64_t end,
                                               std::int64_t h, std::int64_t w, std::int64_t c) {
  const std::int64_t oh = h / 2, ow = w / 2;
  for (std::int64_t row = begin; row < end; ++row) {
    const std::int64_t image = row / h, y = row % h;
    U* __restrict dst = grad_in + row * w * c;
    if (y >= 2 * oh) {  // the row pooling drops (odd height)
      std::fill(dst, dst + w * c, U{0});
      continue;
    }
    const std::int64_t pooled_row = image * oh + y / 2;
    const auto dy = static_cast<std::uint8_t>((y % 2) * 2);
    for (std::int64_t x = 0; x < w; ++x, dst += c) {
      if (x >= 2 * ow) {
        std::fill(dst, dst + c, U{0});
        continue;
      }
      const std::int64_t o = (pooled_row * ow + x / 2) * c;
      const std::uint8_t position = dy + static_cast<std::uint8_t>(x % 2);
      const U* __restrict g = grad_out + o;
      const std::uint8_t* __restrict win = winner + o;
      for (std::int64_t k = 0; k < c; ++k) dst[k] = win[k] == position ? g[k] : U{0};
    }
  }
}

// One copy per dtype and ISA (kiln/detail/isa_dispatch.hpp); unpool works on the values' bits.
#define KILN_POOL_VARIANTS(T, U, suffix)                                                                               \
  KILN_ISA_VARIANTS(void, pool_##suffix,                                                                               \
                    (const T* in, T* out, std::uint8_t* winner, std::int64_t begin, std::int64_t end, std::int64_t h,  \
                     std::int64_t w, std::int64_t c),                                                                  \
                    pool_rows<T>(in, out, winner, begin, end, h, w, c))                                                \
  KILN_ISA_VARIANTS(void, unpool_##suffix,                                                                             \
                    (const T* grad_out, const std::uint8_t* winner, T* grad_in, std::int64_t begin, std::int64_t end,  \
                     std::int64_t h, std::int64_t w, std::int64_t c),                                                  \
                    unpool_rows<U>(reinterpret_cast<const U*>(grad_out), winner, reinterpret_cast<U*>(grad_in), begin, \
                                   end, h, w, c))
KILN_POOL_VARIANTS(float, std::uint32_t, f32)
KILN_POOL_VARIANTS(at::BFloat16, std::uint16_t, bf16)
#undef KILN_POOL_VARIANTS

void pool(const at::Tensor& x, at::Tensor& out, std::uint8_t* winner) {
  const std::int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  at::parallel_for(0, n * (h / 2), 1, [&](std::int64_t begin, std::int64_t end) {
    if (x.scalar_type() == at::kFloat) {
      pool_f32(x.const_data_ptr<float>(), out.data_ptr<float>(), winner, begin, end, h, w, c);
    } else {
      pool_bf16(x.const_data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), winner, begin, end, h, w, c);
    }
  });
}

void unpool(const at::Tensor& grad_out, const at::Tensor& winner, at::Tensor& grad_in) {
  const std::int64_t n = grad_in.size(0), c = grad_in.size(1), h = grad_in.size(2), w = grad_in.size(3);
  const std::uint8_t* win = winner.const_data_ptr<std::uint8_t>();
  at::parallel_for(0, n * h, 1, [&](std::int64_t begin, std::int64_t end) {
    if (grad_out.scalar_type() == at::kFloat) {
      unpool_f32(grad_out.const_data_ptr<float>(), win, grad_in.data_ptr<float>(), begin, end, h, w, c);
    } else {
      unpool_bf16(grad_out.const_data_ptr<at::BFloat16>(), win, grad_in.data_ptr<at::BFloat16>(), begin, end, h, w, c);
    }
  });
}

at::Tensor pooled(const at::Tensor& x, std::uint8_t* winner) {
  const std::int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  at::Tensor out = at::empty({n, c, h / 2, w / 2}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  pool(x, out, winner);
  return out;
}

at::Tensor winners_for(const at::Tensor& x) {
  return at::empty({x.size(0), x.size(2) / 2, x.size(3) / 2, x.size(1)}, x.options().dtype(at::kByte));
}

struct ReluMaxPool2x2 : torch::autograd::Function<ReluMaxPool2x2> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x) {
    const std::int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
    at::Tensor winner = winners_for(x);
    at::Tensor out = pooled(x, winner.data_ptr<std::uint8_t>());
    ctx->save_for_backward({winner});
    ctx->saved_data["shape"] = std::vector<std::int64_t>{n, c, h, w};
    return out;
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const at::Tensor winner = ctx->get_saved_variables()[0];
    const auto shape = ctx->saved_data["shape"].toIntVector();
    const std::int64_t n = shape[0], c = shape[1], h = shape[2], w = shape[3];
    const at::Tensor grad_out = grads[0].contiguous(at::MemoryFormat::ChannelsLast);
    at::Tensor grad_in = at::empty({n, c, h, w}, grad_out.options().memory_format(at::MemoryFormat::ChannelsLast));
    unpool(grad_out, winner, grad_in);
    return {grad_in};
  }
};

bool applies(const at::Tensor& x) {
  return x.device().is_cpu() && x.dim() == 4 && x.size(2) >= 2 && x.size(3) >= 2 &&
         (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
         x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace

at::Tensor relu_max_pool2x2(const at::Tensor& x) {
  if (!applies(x)) return at::max_pool2d(at::relu(x), 2);
  if (at::GradMode::is_enabled() && x.requires_grad()) return ReluMaxPool2x2::apply(x);
  return pooled(x, nullptr);  // evaluation: the values only, no record of the winners
}

}  // namespace kiln::detail
