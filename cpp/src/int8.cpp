#include "kiln/int8.hpp"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>
#include <optional>
#include <vector>

#include "kiln/detail/mnist_cnn.hpp"
#include "kiln/error.hpp"

namespace kiln {
namespace {

constexpr const char* kConvOp = "onednn::qconv2d_pointwise";
constexpr const char* kLinearOp = "onednn::qlinear_pointwise";
using detail::mnist_cnn::kConv2Channels;

// How far oneDNN may go, from ONEDNN_MAX_CPU_ISA (or its older name DNNL_MAX_CPU_ISA): oneDNN's own
// ladder, so that `ONEDNN_MAX_CPU_ISA=AVX2` makes kiln behave as on an AVX2-only CPU, as oneDNN does.
enum class IsaCap { below_avx2, below_vnni, avx2_vnni, avx512_vnni };

// The ISA limit set in the environment, empty when none is.
[[maybe_unused]] std::string onednn_isa_limit() {  // used on x86 only
  for (const char* name : {"ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"}) {
    const char* value = std::getenv(name);
    if (value != nullptr && *value != '\0') return std::string(name) + "=" + value;
  }
  return {};
}

[[maybe_unused]] IsaCap onednn_isa_cap() {  // used on x86 only
  const std::string limit = onednn_isa_limit();
  if (limit.empty()) return IsaCap::avx512_vnni;
  std::string isa = limit.substr(limit.find('=') + 1);
  std::transform(isa.begin(), isa.end(), isa.begin(), [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
  if (isa == "SSE41" || isa == "AVX") return IsaCap::below_avx2;
  for (const char* below : {"AVX2", "AVX512_CORE", "AVX512_MIC", "AVX512_MIC_4OPS"}) {
    if (isa == below) return IsaCap::below_vnni;
  }
  if (isa == "AVX2_VNNI" || isa == "AVX2_VNNI_2") return IsaCap::avx2_vnni;
  return IsaCap::avx512_vnni;  // AVX512_CORE_VNNI and above, ALL, DEFAULT, or a name oneDNN added later
}

// Whether oneDNN's int8 kernels run with VNNI here: the CPU has it and ONEDNN_MAX_CPU_ISA allows it.
bool cpu_has_vnni() {
#if defined(__x86_64__) || defined(__i386__)
  const IsaCap cap = onednn_isa_cap();
  return (cap == IsaCap::avx512_vnni && __builtin_cpu_supports("avx512vnni")) ||
         ((cap == IsaCap::avx2_vnni || cap == IsaCap::avx512_vnni) && __builtin_cpu_supports("avxvnni"));
#else
  return false;
#endif
}

// Whether oneDNN's int8 kernels run here at all as kiln measured them: AVX2 (with or without VNNI),
// allowed by ONEDNN_MAX_CPU_ISA. Below AVX2, and off x86, kiln has not measured int8 against fp32.
bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  return onednn_isa_cap() != IsaCap::below_avx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// The largest int8 weight magnitude. Without VNNI, oneDNN multiplies uint8 x int8 with vpmaddubsw, which
// adds each pair of products into a saturating int16: 255 x 127 x 2 = 64770 overflows it (measured:
// an all-255 input to all-127 weights gave 4718448 = 144 x 32767 instead of 9326880 under
// ONEDNN_MAX_CPU_ISA=AVX2). Weights of at most 63 keep every pair within 255 x 63 x 2 = 32130, as
// oneDNN's own "scale adjust" of 0.5 for such CPUs does; VNNI adds in int32 and takes the full 127.
double int8_weight_levels() {
  return cpu_has_vnni() ? 127.0 : 63.0;
}

std::optional<c10::OperatorHandle> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchema({name, ""});
}

// Symmetric int8 per output channel: weight ~= values * scales[o].
struct QuantizedWeight {
  at::Tensor values;       // int8, the weight's shape
  at::Tensor scales;       // float [out]
  at::Tensor zero_points;  // int64 [out], zeros
  at::Tensor packed;       // oneDNN's prepacked layout
};

QuantizedWeight quantize(const at::Tensor& weight, double levels) {
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  QuantizedWeight q;
  q.scales = (w.flatten(1).abs().amax(1) / levels).clamp_min(1e-12).contiguous();
  std::vector<std::int64_t> per_channel(static_cast<std::size_t>(w.dim()), 1);
  per_channel[0] = -1;
  q.values = at::round(w / q.scales.view(per_channel)).clamp(-levels, levels).to(at::kChar);
  q.zero_points = at::zeros({w.size(0)}, at::kLong);
  return q;
}

at::Tensor tensor_at(const CheckpointModel& saved, const std::string& name) {
  return saved.state_dict.toGenericDict().at(name).toTensor().to(at::kFloat);
}

at::Tensor call(const c10::OperatorHandle& op, torch::jit::Stack stack) {
  op.callBoxed(&stack);
  return stack.back().toTensor();
}

}  // namespace

std::string int8_unavailable_reason(const CheckpointModel& saved) {
  if (saved.spec.name != "mnist_cnn") return "int8 inference covers mnist_cnn, not " + saved.spec.name;
  if (saved.calibration.activation_max.size() != detail::mnist_cnn::kObservedActivations) {
    return "the checkpoint carries no int8 calibration (kiln's evaluation records one in every checkpoint it "
           "writes now; train one more epoch with resume=true to add it)";
  }
  if (!cpu_has_avx2()) {
#if defined(__x86_64__) || defined(__i386__)
    return onednn_isa_cap() != IsaCap::below_avx2 ? "this CPU has no AVX2 (kiln's int8 needs AVX2 or VNNI)"
                                                  : onednn_isa_limit() + " keeps oneDNN from AVX2 int8 instructions";
#else
    return "kiln's int8 runs on x86-64 CPUs with AVX2 (not measured on this architecture)";
#endif
  }
  if (!find_op(kConvOp) || !find_op(kLinearOp)) return "this LibTorch has no oneDNN int8 kernels";
  return {};
}

struct Int8Classifier::Layers {
  Layers(c10::OperatorHandle conv, c10::OperatorHandle linear) : conv_op(conv), linear_op(linear) {}

  c10::OperatorHandle conv_op;
  c10::OperatorHandle linear_op;
  QuantizedWeight conv1, conv2, fc1, fc2;
  at::Tensor conv1_bias, conv2_bias, fc1_bias, fc2_bias;
  double conv1_scale = 0, conv2_scale = 0, fc1_scale = 0;  // of the uint8 activations after each ReLU
  std::int64_t channels = 0, height = 0, width = 0, pooled_h = 0, pooled_w = 0;

  at::Tensor conv(const at::Tensor& x, double x_scale, const QuantizedWeight& w, const at::Tensor& bias,
                  double out_scale) const {
    return call(conv_op, {x, x_scale, std::int64_t{0}, w.packed, w.scales, w.zero_points, bias,
                          std::vector<std::int64_t>{1, 1}, std::vector<std::int64_t>{0, 0},
                          std::vector<std::int64_t>{1, 1}, std::int64_t{1}, out_scale, std::int64_t{0}, c10::IValue(),
                          std::string("relu"), c10::List<std::optional<at::Scalar>>(), std::string()});
  }

  // out_scale 0: float output, no ReLU (the logits).
  at::Tensor linear(const at::Tensor& x, double x_scale, const QuantizedWeight& w, const at::Tensor& bias,
                    double out_scale) const {
    const bool logits = out_scale == 0;
    return call(linear_op, {x, x_scale, std::int64_t{0}, w.packed, w.scales, w.zero_points, bias,
                            logits ? 1.0 : out_scale, std::int64_t{0},
                            logits ? c10::IValue(at::kFloat) : c10::IValue(), std::string(logits ? "none" : "relu"),
                            c10::List<std::optional<at::Scalar>>(), std::string()});
  }

  // 2x2 max pooling of channels-last uint8 [N, 64, H, W] straight into fc1's input [N, h * w * 64]
  // (the order fc1's weights were rearranged to). Exact: max commutes with ReLU and quantisation.
  at::Tensor pool(const at::Tensor& activations) const {
    const at::Tensor x = activations.contiguous(at::MemoryFormat::ChannelsLast);
    const std::int64_t n = x.size(0), h = x.size(2), w = x.size(3);
    at::Tensor out = at::empty({n, pooled_h * pooled_w * kConv2Channels}, at::kByte);
    const std::uint8_t* in = x.data_ptr<std::uint8_t>();
    std::uint8_t* o = out.data_ptr<std::uint8_t>();
    at::parallel_for(0, n, 1, [&](std::int64_t begin, std::int64_t end) {
      for (std::int64_t i = begin; i < end; ++i) {
        std::uint8_t* dst = o + i * pooled_h * pooled_w * kConv2Channels;
        for (std::int64_t y = 0; y < pooled_h; ++y) {
          for (std::int64_t xx = 0; xx < pooled_w; ++xx, dst += kConv2Channels) {
            const std::uint8_t* a = in + ((i * h + 2 * y) * w + 2 * xx) * kConv2Channels;
            const std::uint8_t* b = a + kConv2Channels;
            const std::uint8_t* c = a + w * kConv2Channels;
            const std::uint8_t* d = c + kConv2Channels;
            for (int k = 0; k < kConv2Channels; ++k) dst[k] = std::max(std::max(a[k], b[k]), std::max(c[k], d[k]));
          }
        }
      }
    });
    return out;
  }
};

Int8Classifier::Int8Classifier(const CheckpointModel& saved) {
  const std::string reason = int8_unavailable_reason(saved);
  if (!reason.empty()) throw_data_error("int8 inference is not available: " + reason);
  const auto prepack_conv = c10::Dispatcher::singleton().findSchemaOrThrow("onednn::qconv_prepack", "");
  const auto prepack_linear = c10::Dispatcher::singleton().findSchemaOrThrow("onednn::qlinear_prepack", "");
  layers_ = std::make_unique<Layers>(*find_op(kConvOp), *find_op(kLinearOp));
  Layers& l = *layers_;
  l.channels = saved.spec.in_channels;
  l.height = saved.spec.height;
  l.width = saved.spec.width;
  const auto pooled = detail::mnist_cnn::pooled_size(saved.spec.height, saved.spec.width);
  l.pooled_h = pooled.height;
  l.pooled_w = pooled.width;
  const std::vector<double>& max = saved.calibration.activation_max;
  // [0, max] in 255 uint8 steps; a layer that never fired still needs a positive scale.
  l.conv1_scale = std::max(max[0], 1e-6) / 255.0;
  l.conv2_scale = std::max(max[1], 1e-6) / 255.0;
  l.fc1_scale = std::max(max[2], 1e-6) / 255.0;

  // conv1 on raw pixels p: x_c = (p_c / 255 - mean_c) / std_c, so w . x + b = (w / (255 std_c)) . p +
  // (b - sum w mean_c / std_c), exactly (conv1 has no padding).
  const at::Tensor mean = at::tensor(saved.mean, at::kDouble).to(at::kFloat).view({1, -1, 1, 1});
  const at::Tensor std = at::tensor(saved.std, at::kDouble).to(at::kFloat).view({1, -1, 1, 1});
  const at::Tensor w1 = tensor_at(saved, "conv1.weight");
  const double levels = int8_weight_levels();
  l.conv1 = quantize(w1 / (std * 255.0), levels);
  l.conv1_bias = (tensor_at(saved, "conv1.bias") - (w1 * (mean / std)).sum({1, 2, 3})).contiguous();
  l.conv2 = quantize(tensor_at(saved, "conv2.weight"), levels);
  l.conv2_bias = tensor_at(saved, "conv2.bias").contiguous();
  // fc1's inputs in the pooled activations' memory order (h, w, c), as pool() writes them.
  l.fc1 = quantize(detail::mnist_cnn::fc1_weight_for_channels_last(tensor_at(saved, "fc1.weight"), pooled), levels);
  l.fc1_bias = tensor_at(saved, "fc1.bias").contiguous();
  l.fc2 = quantize(tensor_at(saved, "fc2.weight"), levels);
  l.fc2_bias = tensor_at(saved, "fc2.bias").contiguous();

  auto pack_conv = [&](QuantizedWeight& w, double x_scale) {
    w.packed = call(prepack_conv, {w.values.contiguous(at::MemoryFormat::ChannelsLast), w.scales, x_scale,
                                   std::int64_t{0}, std::vector<std::int64_t>{1, 1}, std::vector<std::int64_t>{0, 0},
                                   std::vector<std::int64_t>{1, 1}, std::int64_t{1}, c10::IValue()});
  };
  pack_conv(l.conv1, 1.0);
  pack_conv(l.conv2, l.conv1_scale);
  l.fc1.packed = call(prepack_linear, {l.fc1.values, c10::IValue()});
  l.fc2.packed = call(prepack_linear, {l.fc2.values, c10::IValue()});
}

Int8Classifier::~Int8Classifier() = default;

at::Tensor Int8Classifier::forward(const at::Tensor& pixels) const {
  const Layers& l = *layers_;
  TORCH_CHECK(pixels.scalar_type() == at::kByte && pixels.dim() == 4 && pixels.size(1) == l.channels &&
                  pixels.size(2) == l.height && pixels.size(3) == l.width && pixels.device().is_cpu(),
              "Int8Classifier expects uint8 CPU images [N, ", l.channels, ", ", l.height, ", ", l.width, "], got ",
              pixels.sizes());
  at::Tensor x = l.conv(pixels.contiguous(at::MemoryFormat::ChannelsLast), 1.0, l.conv1, l.conv1_bias, l.conv1_scale);
  x = l.conv(x, l.conv1_scale, l.conv2, l.conv2_bias, l.conv2_scale);
  x = l.pool(x);
  x = l.linear(x, l.conv2_scale, l.fc1, l.fc1_bias, l.fc1_scale);
  return l.linear(x, l.fc1_scale, l.fc2, l.fc2_bias, 0.0);
}

}  // namespace kiln
