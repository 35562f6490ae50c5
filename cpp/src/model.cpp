#include "kiln/model.hpp"

#include <torch/nn/functional/activation.h>
#include <torch/nn/functional/dropout.h>
#include <torch/nn/functional/pooling.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>

#include <ATen/Parallel.h>
#include <bit>
#include <type_traits>
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/GradMode.h>

#include "kiln/detail/random_stream.hpp"
#include "kiln/error.hpp"

namespace kiln {
namespace F = torch::nn::functional;

namespace {

// relu then 2x2 max pooling (stride 2, floor), as torch::max_pool2d(torch::relu(x), 2) computes it
// (the same values, and the same gradient: ties go to the first position in scan order, nothing to a
// window whose maximum is not positive), in one pass over channels-last activations each way. The
// two ATen ops cost ~2.5 ms of a ~12 ms bf16 training step here: their backward fills and converts
// the 24x24 gradient several times. Other layouts take the ATen ops.
// The pooling loops, branch-free so they vectorise: per output position, the four inputs of its
// window for all channels at once (channels-last: each is a contiguous run of `c` values).
template <typename T>
[[gnu::always_inline]] inline float widen(T v) {
  return static_cast<float>(v);
}
// `v` is one of the inputs or 0: exactly representable, so the bits are cut, not rounded.
template <typename T>
[[gnu::always_inline]] inline T narrow(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return T(static_cast<std::uint16_t>(std::bit_cast<std::uint32_t>(v) >> 16), T::from_bits());
  }
}

template <typename T>
[[gnu::always_inline]] inline void pool_rows(const T* __restrict in, T* __restrict out,
                                             std::uint8_t* __restrict winner, std::int64_t begin, std::int64_t end,
                                             std::int64_t h, std::int64_t w, std::int64_t c) {
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
      for (std::int64_t k = 0; k < c; ++k) {
        // torch's scan: a later value wins if greater or NaN.
        float best = widen(a[k]);
        std::uint8_t at = 0;
        const float vb = widen(b[k]), vd = widen(d[k]), ve = widen(e[k]);
        bool take = vb > best || vb != vb;
        best = take ? vb : best;
        at = take ? 1 : at;
        take = vd > best || vd != vd;
        best = take ? vd : best;
        at = take ? 2 : at;
        take = ve > best || ve != ve;
        best = take ? ve : best;
        at = take ? 3 : at;
        const bool passes = best > 0.0f || best != best;  // relu keeps NaN
        o[k] = narrow<T>(passes ? best : 0.0f);
        if (win != nullptr) win[k] = passes ? at : std::uint8_t{4};  // 4: no gradient
      }
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

#define KILN_POOL_VARIANTS(T, U, suffix)                                                                        \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void pool_##suffix(            \
      const T* in, T* out, std::uint8_t* winner, std::int64_t begin, std::int64_t end, std::int64_t h,          \
      std::int64_t w, std::int64_t c) {                                                                         \
    pool_rows<T>(in, out, winner, begin, end, h, w, c);                                                         \
  }                                                                                                             \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void unpool_##suffix(          \
      const T* grad_out, const std::uint8_t* winner, T* grad_in, std::int64_t begin, std::int64_t end,          \
      std::int64_t h, std::int64_t w, std::int64_t c) {                                                         \
    static_assert(sizeof(T) == sizeof(U));                                                                      \
    unpool_rows<U>(reinterpret_cast<const U*>(grad_out), winner, reinterpret_cast<U*>(grad_in), begin, end, h, \
                   w, c);                                                                                       \
  }
KILN_POOL_VARIANTS(float, std::uint32_t, f32)
KILN_POOL_VARIANTS(at::BFloat16, std::uint16_t, bf16)
#undef KILN_POOL_VARIANTS

void pool(const torch::Tensor& x, torch::Tensor& out, std::uint8_t* winner) {
  const std::int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  at::parallel_for(0, n * (h / 2), 1, [&](std::int64_t begin, std::int64_t end) {
    if (x.scalar_type() == at::kFloat) {
      pool_f32(x.const_data_ptr<float>(), out.data_ptr<float>(), winner, begin, end, h, w, c);
    } else {
      pool_bf16(x.const_data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), winner, begin, end, h, w, c);
    }
  });
}

void unpool(const torch::Tensor& grad_out, const torch::Tensor& winner, torch::Tensor& grad_in) {
  const std::int64_t n = grad_in.size(0), c = grad_in.size(1), h = grad_in.size(2), w = grad_in.size(3);
  const std::uint8_t* win = winner.const_data_ptr<std::uint8_t>();
  at::parallel_for(0, n * h, 1, [&](std::int64_t begin, std::int64_t end) {
    if (grad_out.scalar_type() == at::kFloat) {
      unpool_f32(grad_out.const_data_ptr<float>(), win, grad_in.data_ptr<float>(), begin, end, h, w, c);
    } else {
      unpool_bf16(grad_out.const_data_ptr<at::BFloat16>(), win, grad_in.data_ptr<at::BFloat16>(), begin, end, h, w,
                  c);
    }
  });
}

struct ReluMaxPool2x2 : torch::autograd::Function<ReluMaxPool2x2> {
  static bool applies(const torch::Tensor& x) {
    return x.device().is_cpu() && x.dim() == 4 && x.size(2) >= 2 && x.size(3) >= 2 &&
           (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
           x.is_contiguous(at::MemoryFormat::ChannelsLast);
  }

  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x) {
    const std::int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
    torch::Tensor out =
        at::empty({n, c, h / 2, w / 2}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
    torch::Tensor winner = at::empty({n, h / 2, w / 2, c}, x.options().dtype(at::kByte));
    pool(x, out, winner.data_ptr<std::uint8_t>());
    ctx->save_for_backward({winner});
    ctx->saved_data["shape"] = std::vector<std::int64_t>{n, c, h, w};
    return out;
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const torch::Tensor winner = ctx->get_saved_variables()[0];
    const auto shape = ctx->saved_data["shape"].toIntVector();
    const std::int64_t n = shape[0], c = shape[1], h = shape[2], w = shape[3];
    const torch::Tensor grad_out = grads[0].contiguous(at::MemoryFormat::ChannelsLast);
    torch::Tensor grad_in = at::empty({n, c, h, w}, grad_out.options().memory_format(at::MemoryFormat::ChannelsLast));
    unpool(grad_out, winner, grad_in);
    return {grad_in};
  }
};

}  // namespace

torch::Tensor relu_max_pool2x2(const torch::Tensor& x) {
  if (!ReluMaxPool2x2::applies(x)) return torch::max_pool2d(torch::relu(x), 2);
  if (at::GradMode::is_enabled() && x.requires_grad()) return ReluMaxPool2x2::apply(x);
  // Evaluation: the values only, no record of the winners.
  const std::int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  torch::Tensor out = at::empty({n, c, h / 2, w / 2}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  pool(x, out, nullptr);
  return out;
}

namespace {

// pytorch/examples mnist/main.py's Net: conv 32 -> conv 64 -> max pool -> dropout -> fc 128 ->
// dropout -> fc classes. The fc input size follows the image size instead of assuming 28x28.
class MnistCnn : public Classifier {
 public:
  explicit MnistCnn(const ModelSpec& spec) {
    pooled_h_ = (spec.height - 4) / 2;
    pooled_w_ = (spec.width - 4) / 2;
    if (pooled_h_ < 1 || pooled_w_ < 1) {
      throw_data_error("mnist_cnn needs images of at least 6x6 pixels, got " + std::to_string(spec.height) + "x" +
                       std::to_string(spec.width));
    }
    conv1_ = register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(spec.in_channels, 32, 3)));
    conv2_ = register_module("conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(32, kConv2Channels, 3)));
    fc1_ = register_module("fc1", torch::nn::Linear(kConv2Channels * pooled_h_ * pooled_w_, 128));
    fc2_ = register_module("fc2", torch::nn::Linear(128, spec.num_classes));
    // Same values, stored [in, out]: linear() multiplies by weight.t(), which is then contiguous, so
    // the bf16 matmul needs no transposed copy of the 1.2M weights per step (nor of their gradient).
    c10::NoGradGuard no_grad;
    fc1_->weight.set_data(fc1_->weight.t().contiguous().t());
  }

  torch::Tensor forward(const torch::Tensor& input) override {
    // With one input channel, "channels-last" and "contiguous" are the same memory, and conv1 picks
    // contiguous output from contiguous strides; the rest of the network then mixes layouts (slow
    // kernels, extra copies). Given channels-last strides for the same memory, conv1 writes
    // channels-last itself (measured: saves a 0.4 ms copy per 32-image training step, each way).
    const bool channels_last = conv2_->weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
    torch::Tensor x = input;
    if (channels_last && x.size(1) == 1 && x.is_contiguous()) {
      x = x.as_strided(x.sizes(), {x.size(2) * x.size(3), 1, x.size(3), 1});
    }
    const auto conv1 = torch::relu(
        conv1_->forward(x).contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
    // Pooling keeps conv2's largest activation: it is observed after pooling (4x fewer values).
    x = relu_max_pool2x2(conv2_->forward(conv1));
    const auto pooled = x;
    x = dropout(x, 0.25, is_training(), dropout_stream_);
    // Flattened in memory order: (h, w, c) for channels-last activations, which fc1's weights then
    // follow (prepare_channels_last_inference), so no copy is made.
    x = hwc_flatten_ ? x.permute({0, 2, 3, 1}).flatten(1) : torch::flatten(x, 1);
    x = torch::relu(fc1_->forward(x));
    if (observer_ != nullptr) observer_->observe({conv1, pooled, x}, input.size(0));
    x = dropout(x, 0.5, is_training(), dropout_stream_);
    return fc2_->forward(x);
  }

  void prepare_channels_last_inference() override {
    if (hwc_flatten_) return;
    c10::NoGradGuard no_grad;
    const auto& weight = fc1_->weight;  // [out, c * h * w] -> [out, h * w * c], stored [in, out] as before
    fc1_->weight.set_data(weight.view({weight.size(0), kConv2Channels, pooled_h_, pooled_w_})
                              .permute({0, 2, 3, 1})
                              .reshape({weight.size(0), -1})
                              .t()
                              .contiguous()
                              .t());
    hwc_flatten_ = true;
  }

 private:
  static constexpr int kConv2Channels = 64;
  int pooled_h_ = 0;
  int pooled_w_ = 0;
  bool hwc_flatten_ = false;
  torch::nn::Conv2d conv1_{nullptr};
  torch::nn::Conv2d conv2_{nullptr};
  torch::nn::Linear fc1_{nullptr};
  torch::nn::Linear fc2_{nullptr};
};

// The basic residual block of ResNet (two 3x3 convs with batch norm), with a 1x1 projection when the
// shape changes.
class BasicBlock : public torch::nn::Module {
 public:
  BasicBlock(int in_channels, int out_channels, int stride) {
    using torch::nn::Conv2dOptions;
    conv1_ = register_module(
        "conv1", torch::nn::Conv2d(Conv2dOptions(in_channels, out_channels, 3).stride(stride).padding(1).bias(false)));
    bn1_ = register_module("bn1", torch::nn::BatchNorm2d(out_channels));
    conv2_ = register_module("conv2",
                             torch::nn::Conv2d(Conv2dOptions(out_channels, out_channels, 3).padding(1).bias(false)));
    bn2_ = register_module("bn2", torch::nn::BatchNorm2d(out_channels));
    if (stride != 1 || in_channels != out_channels) {
      shortcut_ = register_module(
          "shortcut", torch::nn::Sequential(
                          torch::nn::Conv2d(Conv2dOptions(in_channels, out_channels, 1).stride(stride).bias(false)),
                          torch::nn::BatchNorm2d(out_channels)));
    }
  }

  torch::Tensor forward(const torch::Tensor& input) {
    auto x = torch::relu(bn1_->forward(conv1_->forward(input)));
    x = bn2_->forward(conv2_->forward(x));
    return torch::relu(x + (shortcut_ ? shortcut_->forward(input) : input));
  }

 private:
  torch::nn::Conv2d conv1_{nullptr};
  torch::nn::BatchNorm2d bn1_{nullptr};
  torch::nn::Conv2d conv2_{nullptr};
  torch::nn::BatchNorm2d bn2_{nullptr};
  torch::nn::Sequential shortcut_{nullptr};
};

// A small CIFAR-style ResNet: 3x3 stem, three stages of one basic block (16, 32, 64 channels),
// global average pooling, fc.
class ResNet8 : public Classifier {
 public:
  explicit ResNet8(const ModelSpec& spec) {
    using torch::nn::Conv2dOptions;
    stem_ = register_module("stem", torch::nn::Conv2d(Conv2dOptions(spec.in_channels, 16, 3).padding(1).bias(false)));
    bn_ = register_module("bn", torch::nn::BatchNorm2d(16));
    layer1_ = register_module("layer1", std::make_shared<BasicBlock>(16, 16, 1));
    layer2_ = register_module("layer2", std::make_shared<BasicBlock>(16, 32, 2));
    layer3_ = register_module("layer3", std::make_shared<BasicBlock>(32, 64, 2));
    fc_ = register_module("fc", torch::nn::Linear(64, spec.num_classes));
  }

  torch::Tensor forward(const torch::Tensor& input) override {
    auto x = torch::relu(bn_->forward(stem_->forward(input)));
    x = layer3_->forward(layer2_->forward(layer1_->forward(x)));
    x = torch::adaptive_avg_pool2d(x, {1, 1}).flatten(1);
    return fc_->forward(x);
  }

 private:
  torch::nn::Conv2d stem_{nullptr};
  torch::nn::BatchNorm2d bn_{nullptr};
  std::shared_ptr<BasicBlock> layer1_, layer2_, layer3_;
  torch::nn::Linear fc_{nullptr};
};

// splitmix64's finaliser: a well-mixed 64-bit value per (seed, index).
inline std::uint64_t mix(std::uint64_t seed, std::uint64_t index) {
  std::uint64_t z = seed + (index + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

template <typename T>
void fill_mask(T* mask, std::int64_t size, std::uint64_t seed, std::uint64_t offset, double keep) {
  // Compare 24-bit uniforms against an integer threshold: exact, and vectorisable.
  const auto threshold = static_cast<std::uint64_t>(keep * 16777216.0);
  const T kept = static_cast<T>(1.0 / keep);
  const T dropped = static_cast<T>(0.0);
  at::parallel_for(0, size, 16384, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t i = begin; i < end; ++i) {
      mask[i] = (mix(seed, offset + static_cast<std::uint64_t>(i)) >> 40) < threshold ? kept : dropped;
    }
  });
}

}  // namespace

torch::Tensor dropout(const torch::Tensor& input, double p, bool training, DropoutStream* stream) {
  if (!training || p == 0.0) return input;
  if (stream == nullptr || !input.device().is_cpu() ||
      (input.scalar_type() != at::kFloat && input.scalar_type() != at::kBFloat16)) {
    return torch::dropout(input, p, training);
  }
  // The mask takes the input's memory format, so the product needs no layout conversion.
  at::Tensor mask = at::empty_like(input);
  const double keep = 1.0 - p;
  if (input.scalar_type() == at::kFloat) {
    fill_mask(mask.data_ptr<float>(), mask.numel(), stream->seed, stream->offset, keep);
  } else {
    fill_mask(mask.data_ptr<at::BFloat16>(), mask.numel(), stream->seed, stream->offset, keep);
  }
  stream->offset += static_cast<std::uint64_t>(mask.numel());
  return input * mask;
}

void ActivationObserver::observe(std::initializer_list<torch::Tensor> activations, std::int64_t images) {
  std::vector<torch::Tensor> maxima;
  maxima.reserve(activations.size());
  for (const auto& activation : activations) maxima.push_back(activation.detach().amax().to(at::kFloat));
  const torch::Tensor batch = torch::stack(maxima);
  max_ = max_.defined() ? torch::maximum(max_, batch) : batch;
  images_ += images;
}

std::vector<double> ActivationObserver::maxima() const {
  std::vector<double> result;
  if (!max_.defined()) return result;
  const torch::Tensor values = max_.to(at::kCPU, at::kDouble).contiguous();
  result.assign(values.data_ptr<double>(), values.data_ptr<double>() + values.numel());
  return result;
}

std::vector<std::string> model_names() {
  return {"mnist_cnn", "resnet8"};
}

std::shared_ptr<Classifier> make_model(const ModelSpec& spec) {
  if (spec.in_channels < 1 || spec.num_classes < 2) {
    throw_data_error("a model needs at least 1 input channel and 2 classes, got " + std::to_string(spec.in_channels) +
                     " channel(s) and " + std::to_string(spec.num_classes) + " class(es)");
  }
  if (spec.name == "mnist_cnn") return std::make_shared<MnistCnn>(spec);
  if (spec.name == "resnet8") return std::make_shared<ResNet8>(spec);
  std::string known;
  for (const auto& name : model_names()) known += (known.empty() ? "" : ", ") + name;
  throw_data_error("unknown model '" + spec.name + "' (known: " + known + ")");
}

void prepare_for_inference(Classifier& model, bool bf16, bool channels_last) {
  c10::NoGradGuard no_grad;
  model.eval();
  if (channels_last) model.prepare_channels_last_inference();
  for (auto& param : model.parameters()) {
    if (channels_last && param.dim() == 4) param.set_data(param.contiguous(at::MemoryFormat::ChannelsLast));
    if (bf16 && param.dim() >= 2) param.set_data(param.to(at::kBFloat16));
  }
}

std::shared_ptr<Classifier> inference_copy(const Classifier& model, const ModelSpec& spec, bool bf16,
                                           bool channels_last) {
  std::shared_ptr<Classifier> copy;
  {
    // The copy's own initialisation is overwritten below: run it on a scratch stream, not torch's.
    at::Tensor scratch = detail::seeded_stream(0, at::kCPU);
    detail::RandomStreamScope stream(scratch, at::kCPU);
    copy = make_model(spec);
  }
  c10::NoGradGuard no_grad;
  const auto source_params = model.parameters();
  if (!source_params.empty()) copy->to(source_params.front().device());
  auto copy_params = copy->parameters();
  for (std::size_t i = 0; i < copy_params.size(); ++i) copy_params[i].set_data(source_params[i].detach());
  const auto source_buffers = model.buffers();
  auto copy_buffers = copy->buffers();
  for (std::size_t i = 0; i < copy_buffers.size(); ++i) copy_buffers[i].set_data(source_buffers[i].detach());
  prepare_for_inference(*copy, bf16, channels_last);
  return copy;
}

}  // namespace kiln
