// Datasets and checkpoints that several test files share (test_helpers.hpp: files and images).
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

#include "kiln/trainer.hpp"
#include "test_helpers.hpp"

namespace kiln::testing {

std::vector<std::uint8_t> read_bytes(const std::filesystem::path& path);

// Two easy classes of 12x12 grayscale images, `per_class` of each in train and test: the bright
// half of the image is the top ("up") or the bottom ("down"). Returns the processed dir.
std::filesystem::path write_halves_dataset(const std::filesystem::path& root, int per_class);

// Options that train on a halves dataset in well under a second.
TrainerOptions small_options(const std::filesystem::path& data);

// A two-class grayscale 12x12 dataset with files that preparation has to convert (RGB, other sizes,
// JPEG), and an untrained model's checkpoint of it.
struct CheckpointedDataset {
  CheckpointedDataset();

  TempDir dir;
  std::filesystem::path raw = dir.path() / "raw";
  std::filesystem::path processed = dir.path() / "processed";
  std::filesystem::path checkpoint = dir.path() / "model.pt";
  std::vector<std::filesystem::path> train_files;  // in the processed train split's row order
};

}  // namespace kiln::testing
