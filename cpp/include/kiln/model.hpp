// The image classifiers kiln trains. Parameter names match the equivalent PyTorch modules, so a
// checkpoint's state dict also loads into the Python definitions (kiln.models).
#pragma once

#include <torch/nn/module.h>

#include <memory>
#include <string>
#include <vector>

namespace kiln {

struct ModelSpec {
  std::string name = "mnist_cnn";  // see model_names()
  int in_channels = 1;
  int num_classes = 10;
  int height = 28;
  int width = 28;
};

// A classifier: uint8-free float input [N, C, H, W] (already normalised) -> logits [N, classes].
class Classifier : public torch::nn::Module {
 public:
  virtual torch::Tensor forward(const torch::Tensor& input) = 0;
};

// The names make_model accepts: "mnist_cnn" (the PyTorch MNIST example network) and "resnet8".
std::vector<std::string> model_names();

// Builds an initialised model; throws kiln::DataError for an unknown name or an input too small.
std::shared_ptr<Classifier> make_model(const ModelSpec& spec);

}  // namespace kiln
