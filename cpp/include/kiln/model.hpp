// The image classifiers kiln trains. Parameter names match the equivalent PyTorch modules, so a
// checkpoint's state dict also loads into the Python definitions (kiln.models).
#pragma once

#include <torch/nn/module.h>

#include <cstdint>
#include <initializer_list>
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

// A counter-based random stream for dropout masks: element i of a mask depends only on (seed,
// position in the stream), so masks are the same for any thread count, cheap to make in parallel,
// and the stream resumes exactly from (seed, offset) stored in a checkpoint.
struct DropoutStream {
  std::uint64_t seed = 0;
  std::uint64_t offset = 0;
};

// Dropout with a mask from `stream` on the CPU (torch's bernoulli_ draws each element from a
// sequential Mersenne Twister, a large share of a small CNN's CPU time); elsewhere torch's dropout.
torch::Tensor dropout(const torch::Tensor& input, double p, bool training, DropoutStream* stream);

// The largest value each activation that int8 inference quantises took over the batches a model
// ran while observed (mnist_cnn: conv1's, conv2's and fc1's ReLU outputs): the calibration of
// static int8 inference (kiln/int8.hpp), recorded by the trainer's evaluation.
class ActivationObserver {
 public:
  // One call per forward pass: the activations, in the model's fixed order.
  void observe(std::initializer_list<torch::Tensor> activations, std::int64_t images);
  // Per activation, the largest value seen (empty before any batch).
  std::vector<double> maxima() const;
  std::int64_t images() const { return images_; }

 private:
  torch::Tensor max_;  // float [activations], on the model's device: no sync per batch
  std::int64_t images_ = 0;
};

// torch::max_pool2d(torch::relu(x), 2) with the same values and gradient, in one pass each way over
// channels-last float/bf16 CPU activations (other inputs: those two ops).
torch::Tensor relu_max_pool2x2(const torch::Tensor& x);

// A classifier: float input [N, C, H, W] (already normalised) -> logits [N, classes].
class Classifier : public torch::nn::Module {
 public:
  virtual torch::Tensor forward(const torch::Tensor& input) = 0;
  // Where dropout masks come from while training; none: torch's global generator.
  void set_dropout_stream(DropoutStream* stream) { dropout_stream_ = stream; }
  // Records activation ranges into `observer` on every forward pass (none: stop). Models without an
  // int8 path record nothing.
  void set_activation_observer(ActivationObserver* observer) { observer_ = observer; }
  // For inference on channels-last activations: lets the model rearrange its (loaded) weights so
  // that no layout copy is needed on the way. The model must not be trained or saved afterwards.
  virtual void prepare_channels_last_inference() {}

 protected:
  DropoutStream* dropout_stream_ = nullptr;
  ActivationObserver* observer_ = nullptr;
};

// The names make_model accepts: "mnist_cnn" (the PyTorch MNIST example network) and "resnet8".
std::vector<std::string> model_names();

// Builds an initialised model; throws kiln::DataError for an unknown name or an input too small.
std::shared_ptr<Classifier> make_model(const ModelSpec& spec);

// Images per forward call in CPU inference: activations of 64 28x28 images stay in a 2 MiB L2 cache;
// 100-256 at once measured 1.3-2x slower per image on a 2-core AVX-512 machine.
inline constexpr std::int64_t kInferenceSlice = 64;

// Lays `model` out for the fastest evaluation, in place: with `channels_last`, conv weights
// channels-last and the model's own reordering (prepare_channels_last_inference); with `bf16`, every
// weight (2+ dims) cast to bfloat16 once, so autocast does not re-cast it on every call. Afterwards
// the model only runs forward in eval mode, under bf16 autocast when `bf16`.
void prepare_for_inference(Classifier& model, bool bf16, bool channels_last);

// An evaluation-only copy of `model` (same device), prepared as prepare_for_inference does; `model`
// is not changed and torch's global generator is left as it was.
std::shared_ptr<Classifier> inference_copy(const Classifier& model, const ModelSpec& spec, bool bf16,
                                           bool channels_last);

}  // namespace kiln
