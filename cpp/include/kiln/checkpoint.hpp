// kiln's checkpoint file: a dict in torch.save's format, so Python reads it with
// torch.load(path, weights_only=True) and no code is ever unpickled. Layout:
//   format, format_version, kiln_version
//   model:      {name, in_channels, num_classes, height, width, state_dict: {name: tensor}}
//   classes, normalization: {mean, std}
//   optimizer:  torch.optim.Adadelta's state_dict layout
//   scheduler:  torch.optim.lr_scheduler.StepLR's state_dict layout
//   epoch, history: [{epoch, train_loss, train_accuracy, test_loss, test_accuracy, learning_rate}]
//   rng:        {torch_cpu, shuffle: generator states (uint8 tensors), dropout_seed, dropout_offset}
//   options
//   int8_calibration (optional): {activation_max: [float], images}: see kiln/int8.hpp
#pragma once

#include <ATen/core/ivalue.h>
#include <torch/nn/module.h>

#include <filesystem>
#include <string>
#include <vector>

#include "kiln/model.hpp"

namespace kiln {

inline constexpr const char* kCheckpointFormat = "kiln-checkpoint";
inline constexpr int kCheckpointFormatVersion = 1;

// The ranges static int8 inference quantises activations to, measured on `images` test images with
// the checkpoint's weights (ActivationObserver). Empty in checkpoints of models without an int8 path
// and in those written before kiln recorded it.
struct Int8Calibration {
  std::vector<double> activation_max;
  std::int64_t images = 0;
};
c10::IValue calibration_to_ivalue(const Int8Calibration& calibration);

// What inference needs from a checkpoint.
struct CheckpointModel {
  ModelSpec spec;
  std::vector<std::string> classes;
  std::vector<double> mean;
  std::vector<double> std;
  std::int64_t epoch = 0;
  c10::IValue state_dict;
  Int8Calibration calibration;
};

// Loads and validates a checkpoint file; throws kiln::NotFoundError / kiln::DataError naming it.
c10::impl::GenericDict read_checkpoint(const std::filesystem::path& path);
CheckpointModel checkpoint_model(const c10::impl::GenericDict& checkpoint, const std::filesystem::path& path);

// Parameters and buffers by their dotted names, as CPU tensors (torch's Module.state_dict()).
c10::IValue module_state_dict(const torch::nn::Module& module);
// Copies a state dict into `module`; every name must be present with the right shape.
void load_module_state_dict(torch::nn::Module& module, const c10::IValue& state, const std::string& source);

}  // namespace kiln
