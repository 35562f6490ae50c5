// kiln's checkpoint file: a dict in torch.save's format, so Python reads it with
// torch.load(path, weights_only=True) and no code is ever unpickled. Layout:
//   format, format_version, kiln_version
//   model:      {name, in_channels, num_classes, height, width, state_dict: {name: tensor}}
//   classes, normalization: {mean, std}
//   transform:  {image_shape: [C, H, W], resize: [h, w] | [shorter edge] | None, center_crop: [h, w] | None}:
//               the processed images the model was trained on and the evaluation transform
//               (torchvision.transforms.v2 Resize then CenterCrop) that brings them to the model's
//               height x width; every inference path applies it. Absent in checkpoints written before
//               kiln recorded it: the images were the model's input, no transform.
//   optimizer:  torch.optim.Adadelta's state_dict layout
//   scheduler:  torch.optim.lr_scheduler.StepLR's state_dict layout
//   epoch, history: [{epoch, train_loss, train_accuracy, test_loss, test_accuracy, learning_rate}]
//   rng:        {torch_cpu, shuffle: generator states (uint8 tensors), dropout_seed, dropout_offset}
//   options
//   int8_calibration (optional): {activation_max: [float], images}: see kiln/int8.hpp
//   integrity:  {algorithm: "crc32", tensors: {dotted path: CRC-32 of the tensor's dtype, shape and
//               bytes, as a signed 32-bit int}}, e.g. "model.state_dict.fc1.weight". Checkpoints
//               written before kiln recorded it have none and load unverified; one edited outside
//               kiln (a tensor added, changed or removed) is refused until this entry is deleted.
#pragma once

#include <ATen/core/ivalue.h>
#include <torch/nn/module.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "kiln/augment.hpp"
#include "kiln/decode.hpp"
#include "kiln/model.hpp"
#include "kiln/trainer_options.hpp"

namespace kiln {

inline constexpr const char* kCheckpointFormat = "kiln-checkpoint";
// The newest format this kiln reads. A checkpoint is written as version 1 (the layout kiln has always
// read) unless its evaluation transform does something: then as version 2, which older kilns refuse
// ("newer than this kiln reads; upgrade kiln") instead of ignoring the transform and predicting on
// pixels the model never saw.
inline constexpr int kCheckpointFormatVersion = 2;

// The largest image side a checkpoint may claim (model input, processed images, resize): larger ones
// are refused before any model or buffer of that size is allocated.
inline constexpr int kMaxCheckpointImageSide = 16384;

// The ranges static int8 inference quantises activations to, measured on `images` test images with
// the checkpoint's weights (ActivationObserver). Empty in checkpoints of models without an int8 path
// and in those written before kiln recorded it.
struct Int8Calibration {
  std::vector<double> activation_max;
  std::int64_t images = 0;
};

// What inference needs from a checkpoint.
struct CheckpointModel {
  ModelSpec spec;
  // The processed images (the dataset manifest's image shape) that `eval_transform` brings to the
  // model's input, spec.height x spec.width; channels are spec.in_channels. When writing, an unset
  // one (height 0) means the model's input shape, with no transform.
  ImageSpec stored_image{0, 0, 0};
  EvalTransformOptions eval_transform;
  std::vector<std::string> classes;
  std::vector<double> mean;
  std::vector<double> std;
  std::int64_t epoch = 0;
  c10::IValue state_dict;
  Int8Calibration calibration;
};

// What a trainer saves to go on exactly where it stopped: the model and everything else in the file.
struct TrainingState {
  CheckpointModel model;  // its epoch: the epochs trained so far
  c10::IValue optimizer;  // Adadelta::state_dict()
  double base_lr = 0;     // StepLR's
  double gamma = 0;
  double lr = 0;  // the rate the next epoch trains with
  std::vector<EpochMetrics> history;
  at::Tensor torch_cpu_rng;     // generator states (uint8 tensors)
  at::Tensor torch_device_rng;  // undefined when training on the CPU
  at::Tensor shuffle_rng;
  std::uint64_t dropout_seed = 0;
  std::uint64_t dropout_offset = 0;
  // Recorded for the reader's information (lr, batch sizes, seed, precision, device); a resumed
  // run trains with its own options, so read_training_state leaves these at their defaults.
  TrainerOptions options;
};

// Writes `state` atomically in the layout above, with the checksums of every tensor. Taken by value and
// moved into the file's dict: the pickler memoizes any object referenced twice, which would change the
// file's bytes. A model with NaN or infinite weights is not written (kiln::TrainingError naming the
// tensor): the file keeps the last good checkpoint. A transform whose output is not the model's input
// size is not written either (kiln::DataError naming the file and the sizes).
void write_checkpoint(const std::filesystem::path& path, TrainingState state);

// Loads a checkpoint file and verifies its tensors against their checksums; throws kiln::NotFoundError
// or kiln::DataError, one line naming the file and what is wrong with it: unreadable, empty, not a zip
// archive, truncated, a missing record, not a kiln checkpoint, a tensor that does not match its checksum.
c10::impl::GenericDict read_checkpoint(const std::filesystem::path& path);
// What inference needs; kiln::DataError naming the file and the entry ('model.height') if one is missing
// or of the wrong type, if a size is implausible (a side over kMaxCheckpointImageSide, weights that do
// not fit the model's input size: refused before a model of that size is built), or if the transform's
// output is not the model's input size.
CheckpointModel checkpoint_model(const c10::impl::GenericDict& checkpoint, const std::filesystem::path& path);
// Everything but `options`; kiln::DataError naming the file and the entry if one is missing or of the
// wrong type, the optimizer's entries included (those of the optimizer its param group's hyperparameters
// mark: Adadelta's rho, SGD's momentum, AdamW's betas), e.g. 'optimizer.state.3.square_avg'.
TrainingState read_training_state(const c10::impl::GenericDict& checkpoint, const std::filesystem::path& path);

// Parameters and buffers by their dotted names, as CPU tensors (torch's Module.state_dict()).
c10::IValue module_state_dict(const torch::nn::Module& module);
// Copies a state dict into `module`; every name must be present with the right shape and a dtype that
// converts (floating to floating), and no floating tensor may hold NaN or infinite values (checked
// before anything is copied). Otherwise kiln::DataError naming `source` and the tensor.
void load_module_state_dict(torch::nn::Module& module, const c10::IValue& state, const std::string& source);

}  // namespace kiln
