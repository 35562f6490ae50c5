// Writes the fuzzer's seed corpus into the folder given: small valid images of every format kiln
// decodes (as this machine's OpenCV encodes them), so fuzzing starts from files that reach deep
// into each decoder rather than from random bytes. Generated, not committed.
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace {

cv::Mat gradient(int height, int width, int type) {
  cv::Mat image(height, width, type);
  const int channels = image.channels();
  const bool deep = image.depth() == CV_16U;
  for (int y = 0; y < height; ++y) {
    for (int x = 0; x < width; ++x) {
      for (int c = 0; c < channels; ++c) {
        const int value = (y * 37 + x * 11 + c * 80) % 256;
        if (deep) {
          image.ptr<std::uint16_t>(y)[x * channels + c] = static_cast<std::uint16_t>(value * 257 + y);
        } else {
          image.ptr<std::uint8_t>(y)[x * channels + c] = static_cast<std::uint8_t>(value);
        }
      }
    }
  }
  return image;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_seeds <output dir>\n");
    return 2;
  }
  const std::filesystem::path dir = argv[1];
  std::filesystem::create_directories(dir);
  struct Seed {
    const char* name;
    const char* extension;
    cv::Mat image;
    std::vector<int> params;
  };
  const std::vector<Seed> seeds = {
      {"gray", ".png", gradient(28, 28, CV_8UC1), {}},
      {"rgb", ".png", gradient(12, 9, CV_8UC3), {}},
      {"rgba", ".png", gradient(7, 11, CV_8UC4), {}},
      {"gray16", ".png", gradient(6, 5, CV_16UC1), {}},
      {"rgb16", ".png", gradient(5, 6, CV_16UC3), {}},
      {"rgb", ".jpg", gradient(16, 16, CV_8UC3), {}},
      {"gray", ".jpg", gradient(9, 13, CV_8UC1), {}},
      {"progressive", ".jpg", gradient(24, 16, CV_8UC3), {cv::IMWRITE_JPEG_PROGRESSIVE, 1}},
      {"rgb", ".bmp", gradient(5, 7, CV_8UC3), {}},
      {"gray", ".bmp", gradient(4, 4, CV_8UC1), {}},
      {"rgb", ".tiff", gradient(6, 8, CV_8UC3), {}},
      {"gray16", ".tiff", gradient(5, 5, CV_16UC1), {}},
      {"lossy", ".webp", gradient(10, 12, CV_8UC3), {cv::IMWRITE_WEBP_QUALITY, 80}},
      {"lossless", ".webp", gradient(8, 8, CV_8UC4), {cv::IMWRITE_WEBP_QUALITY, 101}},
      {"rgb", ".ppm", gradient(6, 4, CV_8UC3), {}},
      {"gray", ".pgm", gradient(4, 6, CV_8UC1), {}},
      {"ascii", ".pgm", gradient(3, 3, CV_8UC1), {cv::IMWRITE_PXM_BINARY, 0}},
      {"bits", ".pbm", gradient(8, 8, CV_8UC1), {}},
      {"rgb", ".pam", gradient(4, 5, CV_8UC3), {}},
      {"rgb", ".ras", gradient(5, 5, CV_8UC3), {}},
      {"rgb", ".jp2", gradient(64, 64, CV_8UC3), {}},
      {"gray", ".jp2", gradient(40, 48, CV_8UC1), {}},
  };
  int written = 0;
  for (const Seed& seed : seeds) {
    std::vector<std::uint8_t> bytes;
    try {
      if (!cv::imencode(seed.extension, seed.image, bytes, seed.params)) bytes.clear();
    } catch (const cv::Exception&) {
      bytes.clear();
    }
    if (bytes.empty()) {
      std::fprintf(stderr, "make_seeds: this OpenCV cannot write %s; no %s seed\n", seed.extension, seed.extension);
      continue;
    }
    const std::filesystem::path path = dir / (std::string(seed.name) + seed.extension);
    std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    ++written;
  }
  std::printf("make_seeds: %d seed images in %s\n", written, dir.c_str());
  return written > 0 ? 0 : 1;
}
