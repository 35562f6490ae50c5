// The image classifiers kiln trains. Parameter names match the equivalent PyTorch modules, so a
// checkpoint's state dict also loads into the Python definitions (torchvision's for its models).
#pragma once

#include <torch/nn/module.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace kiln {

namespace detail {
struct DropoutStream;       // kiln/detail/dropout.hpp
class ActivationObserver;  // kiln/detail/activation_observer.hpp
}  // namespace detail

struct ModelSpec {
  std::string name = "mnist_cnn";  // see model_names()
  int in_channels = 1;
  int num_classes = 10;
  int height = 28;
  int width = 28;
};

// A classifier: float input [N, C, H, W] (already normalised) -> logits [N, classes].
class Classifier : public torch::nn::Module {
 public:
  virtual torch::Tensor forward(const torch::Tensor& input) = 0;
  // Where dropout masks come from while training; none: torch's global generator.
  void set_dropout_stream(detail::DropoutStream* stream) { dropout_stream_ = stream; }
  // Records activation ranges into `observer` on every forward pass (none: stop). Models without an
  // int8 path record nothing.
  void set_activation_observer(detail::ActivationObserver* observer) { observer_ = observer; }
  // For inference on channels-last activations: lets the model rearrange its (loaded) weights so
  // that no layout copy is needed on the way. The model must not be trained or saved afterwards.
  virtual void prepare_channels_last_inference() {}

 protected:
  detail::DropoutStream* dropout_stream_ = nullptr;
  detail::ActivationObserver* observer_ = nullptr;
};

// The names make_model accepts: "mnist_cnn" (the PyTorch MNIST example network), "resnet8" (a small
// CIFAR-style ResNet), and torchvision's "resnet18", "resnet34", "resnet50", "mobilenet_v3_small",
// "mobilenet_v3_large", "efficientnet_b0" with torchvision's parameter names, so their state dicts
// load into torchvision.models.<name>(num_classes=K) and back.
std::vector<std::string> model_names();

// Builds an initialised model; throws kiln::DataError for an unknown name or an input too small.
std::shared_ptr<Classifier> make_model(const ModelSpec& spec);

// Stops gradients for every parameter but the classifier head's (the model's last layer, registered
// last by every kiln model): fine-tuning with a frozen backbone. Returns the parameters left to train.
std::int64_t freeze_backbone(Classifier& model);

}  // namespace kiln
