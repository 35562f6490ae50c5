// The builders of kiln's torchvision-compatible classifiers (cpp/src/models/, one file per family).
// Each takes spec.in_channels for the stem and spec.num_classes for the head; parameter and buffer
// names, shapes and eval-mode numerics are those of torchvision.models.<name>(num_classes=K).
#pragma once

#include <cstdint>
#include <memory>

#include "kiln/model.hpp"

namespace kiln::detail {

// A model that trains faster in float32 on the CPU with its late layers on contiguous (NCHW) weights and
// activations, the rest channels-last. For a channels-last convolution, ATen hands oneDNN's weight
// gradient back through a strided transposing copy as large as the weight
// (mkldnn_convolution_backward_weights' .to(ChannelsLast)), while running a layer contiguous costs
// oneDNN reorders of its activations: a loss where the activations hold fewer values than the weights.
class LayoutSplit {
 public:
  virtual ~LayoutSplit() = default;
  // Makes contiguous the 4-d parameters of the layers whose activations for `batch_size` images hold
  // fewer values than their largest convolution weight, and of every later layer; the forward pass
  // then hands those layers contiguous activations. Kept as they are: the weights of convolutions that
  // take kiln's own forms there rather than oneDNN's (ResNets' 3x3 convolutions on maps smaller than the
  // kernel, detail/small_map_conv.hpp, read channels-last weights in place). Earlier, channels-last stages
  // may take Winograd's form (detail/winograd_conv.hpp). Call before the optimizer takes the parameters.
  virtual void contiguous_late_layers(std::int64_t batch_size) = 0;
};

std::shared_ptr<Classifier> make_resnet(const ModelSpec& spec);        // resnet18, resnet34, resnet50
std::shared_ptr<Classifier> make_mobilenet_v3(const ModelSpec& spec);  // mobilenet_v3_small, _large
std::shared_ptr<Classifier> make_efficientnet(const ModelSpec& spec);  // efficientnet_b0

}  // namespace kiln::detail
