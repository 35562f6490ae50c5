#include "fixtures.hpp"

#include <algorithm>
#include <fstream>
#include <iterator>
#include <random>
#include <string>

#include "kiln/dataset.hpp"

namespace kiln::testing {

namespace fs = std::filesystem;

std::vector<std::uint8_t> read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

fs::path write_halves_dataset(const fs::path& root, int per_class) {
  std::mt19937 noise(7);
  for (const char* split : {"train", "test"}) {
    for (int label = 0; label < 2; ++label) {
      for (int i = 0; i < per_class; ++i) {
        cv::Mat image(12, 12, CV_8UC1);
        for (int y = 0; y < 12; ++y) {
          for (int x = 0; x < 12; ++x) {
            const bool bright = (y < 6) == (label == 0);
            image.at<std::uint8_t>(y, x) = static_cast<std::uint8_t>((bright ? 180 : 40) + noise() % 60);
          }
        }
        write_image(root / "raw" / split / (label == 0 ? "up" : "down") / (std::to_string(i) + ".png"), image);
      }
    }
  }
  PrepareOptions options;
  options.raw_dir = root / "raw";
  options.out_dir = root / "processed";
  prepare_dataset(options);
  return options.out_dir;
}

TrainerOptions small_options(const fs::path& data) {
  TrainerOptions options;
  options.data_dir = data;
  options.lr = 1.0;
  options.train_batch_size = 16;
  options.test_batch_size = 10;
  options.seed = 3;
  return options;
}

CheckpointedDataset::CheckpointedDataset() {
  for (int i = 0; i < 12; ++i) {
    const std::string label = i % 2 ? "odd" : "even";
    cv::Mat image = pattern(12, 12, 1, i);
    std::string extension = ".png";
    if (i % 4 == 1) image = pattern(12, 12, 3, i);  // converted RGB -> gray
    if (i % 4 == 2) image = pattern(20, 16, 1, i);  // resized
    if (i % 4 == 3) extension = ".jpg";
    write_image(raw / "train" / label / (std::to_string(i) + extension), image);
    write_image(raw / "test" / label / (std::to_string(i) + extension), image);
  }
  PrepareOptions options;
  options.raw_dir = raw;
  options.out_dir = processed;
  options.image_size = std::pair{12, 12};
  options.channels = 1;
  prepare_dataset(options);
  // The processed split's row order: classes in name order, files in name order within each.
  for (const char* label : {"even", "odd"}) {
    std::vector<fs::path> files;
    for (const auto& entry : fs::directory_iterator(raw / "train" / label)) files.push_back(entry.path());
    std::sort(files.begin(), files.end());
    train_files.insert(train_files.end(), files.begin(), files.end());
  }
  TrainerOptions trainer_options;
  trainer_options.data_dir = processed;
  Trainer(trainer_options).save_checkpoint(checkpoint);
}

}  // namespace kiln::testing
