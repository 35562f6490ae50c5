// Shared fixtures of the kiln GoogleTest suite: temp dirs and encoded test images.
#pragma once

#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <unistd.h>

#include "kiln/detail/files.hpp"

namespace kiln::testing {

// A fresh directory removed when the test ends.
class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    path_ = std::filesystem::temp_directory_path() /
            ("kiln-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    detail::remove_tree(path_);
    std::filesystem::create_directories(path_);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  // remove_tree, not std::filesystem::remove_all: see kiln/detail/files.hpp.
  ~TempDir() { detail::remove_tree(path_); }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// A deterministic image whose pixels depend on `seed`, so tests can tell images apart.
inline cv::Mat pattern(int height, int width, int channels, int seed) {
  cv::Mat image(height, width, CV_8UC(channels));
  for (int y = 0; y < height; ++y) {
    for (int x = 0; x < width; ++x) {
      for (int c = 0; c < channels; ++c) {
        image.ptr<std::uint8_t>(y)[x * channels + c] =
            static_cast<std::uint8_t>((seed * 31 + y * 7 + x * 3 + c * 50) % 256);
      }
    }
  }
  return image;
}

inline std::vector<std::uint8_t> encode(const cv::Mat& image, const std::string& extension = ".png") {
  std::vector<std::uint8_t> bytes;
  cv::imencode(extension, image, bytes);
  return bytes;
}

inline void write_bytes(const std::filesystem::path& path, const std::vector<std::uint8_t>& bytes) {
  std::filesystem::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

// What the `Error` that `call()` throws says; empty when it throws none (other exceptions go on).
template <typename Error, typename Call>
std::string error_message(Call&& call) {
  try {
    call();
  } catch (const Error& error) {
    return error.what();
  }
  return {};
}

inline void write_image(const std::filesystem::path& path, const cv::Mat& image) {
  write_bytes(path, encode(image, path.extension().string()));
}

}  // namespace kiln::testing
