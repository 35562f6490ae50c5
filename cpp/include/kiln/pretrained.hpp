// Weights from elsewhere into kiln's models: a state dict with torchvision's names (a torchvision
// weights file, or any torch.save of a state_dict), loaded strictly or adapted for fine-tuning.
#pragma once

#include <ATen/core/ivalue.h>

#include <string>
#include <vector>

#include "kiln/model.hpp"

namespace kiln {

// Copies `state` (a dict of name -> tensor) into `model` as torch's load_state_dict(strict=True)
// does: the names must be the model's exactly and each shape equal; floating tensors convert to the
// model's dtype. Throws kiln::DataError naming `source` and listing the missing, unexpected or
// mis-shaped names, before anything is copied.
void load_state_dict_strict(torch::nn::Module& model, const c10::IValue& state, const std::string& source);

// What load_pretrained changed to make the weights fit, one sentence each (kiln logs them).
struct PretrainedLoad {
  std::vector<std::string> adaptations;
};

// Starts `model` from `state` (a dict of name -> tensor, e.g. a torchvision weights file as
// torch.load(path, weights_only=True) reads it; `source` names it in messages) for fine-tuning:
//  - the classifier head (the model's last Linear) keeps its fresh initialisation when the file's
//    has another class count;
//  - the stem's weights [out, 3, k, k] are adapted to the model's input channels as timm does:
//    summed over the channels for 1-channel input, repeated and scaled by 3 / C otherwise;
//  - a missing BatchNorm num_batches_tracked (files from before torch 0.4.1) starts at 0, as torch's
//    load_state_dict does.
// Any other missing, unexpected or mis-shaped name is a kiln::DataError naming `source`, and the
// model is left as it was.
PretrainedLoad load_pretrained(Classifier& model, const ModelSpec& spec, const c10::IValue& state,
                               const std::string& source);

}  // namespace kiln
