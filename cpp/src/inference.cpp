#include "kiln/detail/inference.hpp"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <algorithm>

#include "kiln/detail/random_stream.hpp"

namespace kiln::detail {

std::int64_t inference_slice_size(std::int64_t count, const c10::Device& device) {
  if (!device.is_cpu() || count <= kInferenceSlice) return std::max<std::int64_t>(count, 1);
  const std::int64_t slices = (count + kInferenceSlice - 1) / kInferenceSlice;
  return (count + slices - 1) / slices;
}

at::Tensor forward_in_slices(const at::Tensor& input, std::int64_t classes, const c10::Device& device,
                             const std::function<at::Tensor(const at::Tensor&)>& forward) {
  const std::int64_t count = input.size(0);
  const std::int64_t slice = inference_slice_size(count, device);
  at::Tensor logits;
  for (std::int64_t begin = 0; begin < count; begin += slice) {
    const std::int64_t end = std::min(count, begin + slice);
    const at::Tensor part = forward(input.slice(0, begin, end));
    // The first slice says where the logits live (the model's device).
    if (!logits.defined()) logits = at::empty({count, classes}, part.options().dtype(at::kFloat));
    logits.slice(0, begin, end).copy_(part);
  }
  return logits.defined() ? logits : at::empty({0, classes}, input.options().dtype(at::kFloat));
}

void prepare_for_inference(Classifier& model, bool bf16, bool channels_last) {
  c10::NoGradGuard no_grad;
  model.eval();
  if (channels_last) model.prepare_channels_last_inference();
  for (auto& param : model.parameters()) {
    // clone, not contiguous: a depthwise weight [C, 1, k, k] counts as channels-last contiguous in its
    // NCHW strides, which contiguous() then keeps, and oneDNN took a ~250x slower path for it on 1x1
    // activations (mobilenet_v3 and efficientnet's last stage at 32 px). clone() lays it out as channels-last.
    if (channels_last && param.dim() == 4) param.set_data(param.clone(at::MemoryFormat::ChannelsLast));
    if (bf16 && param.dim() >= 2) param.set_data(param.to(at::kBFloat16));
  }
}

std::shared_ptr<Classifier> inference_copy(const Classifier& model, const ModelSpec& spec, bool bf16,
                                           bool channels_last) {
  std::shared_ptr<Classifier> copy;
  {
    // The copy's own initialisation is overwritten below: run it on a scratch stream, not torch's.
    at::Tensor scratch = seeded_stream(0, at::kCPU);
    RandomStreamScope stream(scratch, at::kCPU);
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

}  // namespace kiln::detail
