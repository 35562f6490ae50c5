#include "kiln/predictor.hpp"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include "kiln/checkpoint.hpp"
#include "kiln/error.hpp"
#include "kiln/normalize.hpp"

namespace kiln {

struct Predictor::State {
  CheckpointModel saved;
  torch::Device device{torch::kCPU};
  std::shared_ptr<Classifier> model;
  Normalizer normalizer;
};

Predictor::Predictor(const std::filesystem::path& checkpoint, const std::string& device)
    : state_(std::make_unique<State>()) {
  State& s = *state_;
  try {
    s.device = torch::Device(device);
  } catch (const c10::Error&) {
    throw_data_error("unknown device '" + device + "' (expected cpu, cuda or cuda:N)");
  }
  s.saved = checkpoint_model(read_checkpoint(checkpoint), checkpoint);
  s.model = make_model(s.saved.spec);
  load_module_state_dict(*s.model, s.saved.state_dict, "checkpoint '" + checkpoint.string() + "'");
  s.saved.state_dict = c10::IValue();  // the weights now live in the model
  s.model->to(s.device);
  s.model->eval();
  s.normalizer = Normalizer(s.saved.mean, s.saved.std, s.device);
}

Predictor::~Predictor() = default;

at::Tensor Predictor::predict(const at::Tensor& images) const {
  const State& s = *state_;
  const ImageSpec spec = image_spec();
  at::Tensor batch = images.dim() == 3 ? images.unsqueeze(0) : images;
  if (batch.scalar_type() != at::kByte || batch.dim() != 4 || batch.size(1) != spec.channels ||
      batch.size(2) != spec.height || batch.size(3) != spec.width) {
    throw_data_error("expected uint8 images of shape [N, " + std::to_string(spec.channels) + ", " +
                     std::to_string(spec.height) + ", " + std::to_string(spec.width) + "], got " +
                     std::string(c10::toString(images.scalar_type())) + " " + c10::str(images.sizes()));
  }
  if (batch.size(0) == 0) return at::empty({0, static_cast<std::int64_t>(s.saved.classes.size())}, at::kFloat);
  c10::NoGradGuard no_grad;
  const at::Tensor x = s.normalizer(batch.to(s.device));
  return at::softmax(s.model->forward(x).to(at::kFloat), 1).cpu();
}

const std::vector<std::string>& Predictor::classes() const {
  return state_->saved.classes;
}
ImageSpec Predictor::image_spec() const {
  const ModelSpec& spec = state_->saved.spec;
  return {spec.in_channels, spec.height, spec.width};
}
const ModelSpec& Predictor::model_spec() const {
  return state_->saved.spec;
}
std::int64_t Predictor::epoch() const {
  return state_->saved.epoch;
}

}  // namespace kiln
