// The builders of kiln's torchvision-compatible classifiers (cpp/src/models/, one file per family).
// Each takes spec.in_channels for the stem and spec.num_classes for the head; parameter and buffer
// names, shapes and eval-mode numerics are those of torchvision.models.<name>(num_classes=K).
#pragma once

#include <memory>

#include "kiln/model.hpp"

namespace kiln::detail {

std::shared_ptr<Classifier> make_resnet(const ModelSpec& spec);        // resnet18, resnet34, resnet50
std::shared_ptr<Classifier> make_mobilenet_v3(const ModelSpec& spec);  // mobilenet_v3_small, _large
std::shared_ptr<Classifier> make_efficientnet(const ModelSpec& spec);  // efficientnet_b0

}  // namespace kiln::detail
