// How kiln evaluates a float model fastest: the weights laid out once, and large batches run in
// slices that stay in the CPU's caches. Shared by the trainer's evaluation and kiln::Predictor, so
// both compute the same function the same way.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <functional>
#include <memory>

#include "kiln/model.hpp"

namespace kiln::detail {

// Images per forward call in CPU inference, at most: activations of 64 28x28 images stay in a 2 MiB
// L2 cache; 100-256 at once measured 1.3-2x slower per image on a 2-core AVX-512 machine.
inline constexpr std::int64_t kInferenceSlice = 64;

// Rows per forward call for a batch of `count` on `device`: on the CPU the fewest slices of at most
// kInferenceSlice, of even size (100 -> 50 + 50, no small tail slice); elsewhere the whole batch.
std::int64_t inference_slice_size(std::int64_t count, const c10::Device& device);

// float32 logits [N, classes] of `forward` run on `input`'s rows [N, ...] in slices of
// inference_slice_size(N, device), on the device `forward` returns them on.
at::Tensor forward_in_slices(const at::Tensor& input, std::int64_t classes, const c10::Device& device,
                             const std::function<at::Tensor(const at::Tensor&)>& forward);

// Lays `model` out for the fastest evaluation, in place: with `channels_last`, conv weights
// channels-last and the model's own reordering (prepare_channels_last_inference); with `bf16`, every
// weight (2+ dims) cast to bfloat16 once, so autocast does not re-cast it on every call. Afterwards
// the model only runs forward in eval mode, under bf16 autocast when `bf16`.
void prepare_for_inference(Classifier& model, bool bf16, bool channels_last);

// An evaluation-only copy of `model` (same device), prepared as prepare_for_inference does; `model`
// is not changed and torch's global generator is left as it was.
std::shared_ptr<Classifier> inference_copy(const Classifier& model, const ModelSpec& spec, bool bf16,
                                           bool channels_last);

}  // namespace kiln::detail
