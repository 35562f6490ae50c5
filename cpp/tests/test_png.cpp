#include "kiln/detail/png.hpp"

#include <gtest/gtest.h>

#include <opencv2/imgproc.hpp>
#include <random>

#include "test_helpers.hpp"

namespace kiln::detail {
namespace {

// Noise makes libpng's encoder pick every row filter (none, sub, up, average, paeth).
cv::Mat noise(int height, int width, int channels, unsigned seed) {
  cv::Mat image(height, width, CV_8UC(channels));
  std::mt19937 generator(seed);
  for (int y = 0; y < height; ++y) {
    for (int x = 0; x < width * channels; ++x) {
      image.ptr<std::uint8_t>(y)[x] = static_cast<std::uint8_t>(generator() % 256);
    }
    if (y % 3 == 0) image.row(y).setTo(cv::Scalar::all(y));  // flat rows favour other filters
  }
  return image;
}

// OpenCV stores colour as BGR(A); the fast path returns the file's RGB(A) order.
cv::Mat as_rgb(const cv::Mat& bgr) {
  cv::Mat rgb;
  if (bgr.channels() == 1) return bgr;
  cv::cvtColor(bgr, rgb, bgr.channels() == 3 ? cv::COLOR_BGR2RGB : cv::COLOR_BGRA2RGBA);
  return rgb;
}

class png_fast_path : public ::testing::TestWithParam<std::tuple<int, int, int>> {};

TEST_P(png_fast_path, decodes_exactly_what_libpng_decodes) {
  const auto [height, width, channels] = GetParam();
  for (int compression : {0, 3, 9}) {
    const cv::Mat image = noise(height, width, channels, height * 131 + width + compression);
    std::vector<std::uint8_t> bytes;
    cv::imencode(".png", image, bytes, {cv::IMWRITE_PNG_COMPRESSION, compression});
    PngImage png;
    std::string error;
    ASSERT_EQ(decode_png(bytes, png, error), PngStatus::decoded) << error;
    const cv::Mat expected = as_rgb(cv::imdecode(bytes, cv::IMREAD_UNCHANGED));
    ASSERT_EQ(png.channels, channels);
    ASSERT_EQ(png.pixels.size(), expected.total() * expected.elemSize());
    EXPECT_EQ(0, std::memcmp(png.pixels.data(), expected.data, png.pixels.size())) << "compression " << compression;
  }
}

INSTANTIATE_TEST_SUITE_P(layouts, png_fast_path,
                         ::testing::Values(std::tuple{28, 28, 1}, std::tuple{1, 1, 1}, std::tuple{17, 33, 3},
                                           std::tuple{64, 48, 4}, std::tuple{300, 7, 1}));

TEST(png, sixteen_bit_and_palette_images_are_left_to_opencv) {
  PngImage png;
  std::string error;
  std::vector<std::uint8_t> deep;
  cv::imencode(".png", cv::Mat(4, 4, CV_16UC1, cv::Scalar(1000)), deep);
  EXPECT_EQ(decode_png(deep, png, error), PngStatus::unsupported);
}

TEST(png, corrupt_image_data_is_reported_not_decoded) {
  std::vector<std::uint8_t> bytes = testing::encode(noise(28, 28, 1, 1));
  bytes[bytes.size() / 2] ^= 0xff;
  PngImage png;
  std::string error;
  EXPECT_EQ(decode_png(bytes, png, error), PngStatus::corrupt);
  EXPECT_NE(error.find("CRC mismatch"), std::string::npos) << error;
}

TEST(png, truncated_file_is_reported) {
  std::vector<std::uint8_t> bytes = testing::encode(noise(28, 28, 3, 2));
  for (std::size_t keep : {std::size_t{8}, std::size_t{20}, bytes.size() / 2, bytes.size() - 1}) {
    PngImage png;
    std::string error;
    EXPECT_EQ(decode_png(std::span(bytes).first(keep), png, error), PngStatus::corrupt) << keep;
    EXPECT_NE(error.find("truncated PNG"), std::string::npos) << error;
  }
}

}  // namespace
}  // namespace kiln::detail
