#include "kiln/decode.hpp"

#include <gtest/gtest.h>

#include "test_helpers.hpp"

namespace kiln {
namespace {

using testing::encode;
using testing::pattern;

TEST(decode, grayscale_png_round_trips_exactly) {
  const cv::Mat image = pattern(28, 28, 1, 1);
  const ImageSpec spec{1, 28, 28};
  std::vector<std::uint8_t> out(spec.bytes());
  const DecodeResult result = decode_into(encode(image), spec, out.data());
  ASSERT_TRUE(result.ok) << result.error;
  EXPECT_TRUE(result.conversion.empty());
  EXPECT_EQ(0, std::memcmp(out.data(), image.data, out.size()));
}

TEST(decode, colour_png_becomes_rgb_planes) {
  const cv::Mat bgr = pattern(4, 5, 3, 2);
  const ImageSpec spec{3, 4, 5};
  std::vector<std::uint8_t> out(spec.bytes());
  ASSERT_TRUE(decode_into(encode(bgr), spec, out.data()).ok);
  const std::size_t plane = 4 * 5;
  for (int y = 0; y < 4; ++y) {
    for (int x = 0; x < 5; ++x) {
      const auto* pixel = bgr.ptr<std::uint8_t>(y) + x * 3;
      EXPECT_EQ(out[0 * plane + y * 5 + x], pixel[2]) << "red plane";
      EXPECT_EQ(out[1 * plane + y * 5 + x], pixel[1]) << "green plane";
      EXPECT_EQ(out[2 * plane + y * 5 + x], pixel[0]) << "blue plane";
    }
  }
}

// An image that does not fit the dataset's layout, the layout, and what decoding says it did.
struct Conversion {
  const char* name;
  cv::Mat image;
  ImageSpec spec;
  const char* reported;
};

class decode_converts : public ::testing::TestWithParam<Conversion> {};

TEST_P(decode_converts, the_image_to_the_dataset_layout_and_reports_it) {
  const Conversion& c = GetParam();
  std::vector<std::uint8_t> out(c.spec.bytes());
  const DecodeResult result = decode_into(encode(c.image), c.spec, out.data());
  ASSERT_TRUE(result.ok) << result.error;
  EXPECT_EQ(result.conversion, c.reported);
}

INSTANTIATE_TEST_SUITE_P(
    conversions, decode_converts,
    ::testing::Values(Conversion{"image_of_another_size", pattern(56, 40, 1, 3), {1, 28, 28}, "resized from 56x40 to 28x28"},
                      Conversion{"colour_image_in_grayscale_dataset", pattern(8, 8, 3, 4), {1, 8, 8},
                                 "converted RGB to grayscale"},
                      Conversion{"alpha_channel", pattern(6, 6, 4, 5), {3, 6, 6}, "dropped alpha channel"}),
    [](const ::testing::TestParamInfo<Conversion>& info) { return std::string(info.param.name); });

TEST(decode, sixteen_bit_png_is_reduced_to_eight_bit) {
  cv::Mat deep(3, 3, CV_16UC1, cv::Scalar(65535));
  const ImageSpec spec{1, 3, 3};
  std::vector<std::uint8_t> out(spec.bytes());
  const DecodeResult result = decode_into(encode(deep), spec, out.data());
  ASSERT_TRUE(result.ok) << result.error;
  EXPECT_EQ(out[0], 255);
  EXPECT_EQ(result.conversion, "reduced 16-bit to 8-bit");
}

TEST(decode, jpeg_decodes) {
  const ImageSpec spec{3, 16, 16};
  std::vector<std::uint8_t> out(spec.bytes());
  EXPECT_TRUE(decode_into(encode(pattern(16, 16, 3, 6), ".jpg"), spec, out.data()).ok);
}

TEST(decode, skips_truncated_png_and_reports_it) {
  auto bytes = encode(pattern(28, 28, 1, 7));
  bytes.resize(bytes.size() / 2);
  std::vector<std::uint8_t> out(28 * 28);
  const DecodeResult result = decode_into(bytes, {1, 28, 28}, out.data());
  EXPECT_FALSE(result.ok);
  EXPECT_NE(result.error.find("truncated PNG"), std::string::npos) << result.error;
}

TEST(decode, skips_png_with_corrupt_pixel_data) {
  auto bytes = encode(pattern(28, 28, 1, 8));
  for (std::size_t i = 40; i < bytes.size() - 20; ++i) bytes[i] ^= 0x5a;
  std::vector<std::uint8_t> out(28 * 28);
  const DecodeResult result = decode_into(bytes, {1, 28, 28}, out.data());
  EXPECT_FALSE(result.ok);
  EXPECT_NE(result.error.find("corrupt PNG"), std::string::npos) << result.error;
}

TEST(decode, skips_truncated_jpeg_and_reports_it) {
  auto bytes = encode(pattern(32, 32, 3, 9), ".jpg");
  bytes.resize(bytes.size() - 40);
  std::vector<std::uint8_t> out(3 * 32 * 32);
  const DecodeResult result = decode_into(bytes, {3, 32, 32}, out.data());
  EXPECT_FALSE(result.ok);
  EXPECT_NE(result.error.find("truncated JPEG"), std::string::npos) << result.error;
}

TEST(decode, skips_text_that_is_not_an_image) {
  const std::string text = "this is not an image\n";
  const std::vector<std::uint8_t> bytes(text.begin(), text.end());
  std::vector<std::uint8_t> out(28 * 28);
  const DecodeResult result = decode_into(bytes, {1, 28, 28}, out.data());
  EXPECT_FALSE(result.ok);
  EXPECT_EQ(result.error, "not an image (unrecognised file contents)");
}

TEST(decode, skips_empty_input) {
  std::vector<std::uint8_t> out(4);
  const DecodeResult result = decode_into({}, {1, 2, 2}, out.data());
  EXPECT_FALSE(result.ok);
  EXPECT_EQ(result.error, "empty file (0 bytes)");
}

TEST(decode, probe_reports_native_layout) {
  const auto spec = probe_image(encode(pattern(10, 12, 3, 1)));
  ASSERT_TRUE(spec.has_value());
  EXPECT_EQ(*spec, (ImageSpec{3, 10, 12}));
  std::string error;
  EXPECT_FALSE(probe_image(std::vector<std::uint8_t>{1, 2, 3}, &error).has_value());
  EXPECT_FALSE(error.empty());
}

}  // namespace
}  // namespace kiln
