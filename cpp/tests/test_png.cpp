#include "kiln/detail/png.hpp"

#include <gtest/gtest.h>

#include <libdeflate.h>

#include <opencv2/imgproc.hpp>
#include <random>

#include "kiln/detail/utf8.hpp"

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

// A PNG assembled chunk by chunk with valid CRCs: IHDR (8-bit, the given colour type), one IDAT
// holding the zlib stream of `raw` (filter bytes and pixels as the header's rows would need), IEND.
void append_chunk(std::vector<std::uint8_t>& png, const char* type, const std::vector<std::uint8_t>& body) {
  const auto put32 = [&png](std::uint32_t v) {
    for (int shift = 24; shift >= 0; shift -= 8) png.push_back(static_cast<std::uint8_t>(v >> shift));
  };
  put32(static_cast<std::uint32_t>(body.size()));
  const std::size_t start = png.size();
  png.insert(png.end(), type, type + 4);
  png.insert(png.end(), body.begin(), body.end());
  put32(libdeflate_crc32(0, png.data() + start, png.size() - start));
}

std::vector<std::uint8_t> zlib(const std::vector<std::uint8_t>& raw) {
  libdeflate_compressor* compressor = libdeflate_alloc_compressor(9);
  std::vector<std::uint8_t> out(libdeflate_zlib_compress_bound(compressor, raw.size()));
  out.resize(libdeflate_zlib_compress(compressor, raw.data(), raw.size(), out.data(), out.size()));
  libdeflate_free_compressor(compressor);
  return out;
}

std::vector<std::uint8_t> png_claiming(std::uint32_t width, std::uint32_t height, int colour_type,
                                       const std::vector<std::uint8_t>& raw) {
  std::vector<std::uint8_t> png = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  std::vector<std::uint8_t> header;
  for (const std::uint32_t v : {width, height}) {
    for (int shift = 24; shift >= 0; shift -= 8) header.push_back(static_cast<std::uint8_t>(v >> shift));
  }
  header.insert(header.end(), {8, static_cast<std::uint8_t>(colour_type), 0, 0, 0});
  append_chunk(png, "IHDR", header);
  append_chunk(png, "IDAT", zlib(raw));
  append_chunk(png, "IEND", {});
  return png;
}

class png_size_claim : public ::testing::TestWithParam<int> {};

// The 69-byte bomb: before the budget, a gray claim zero-filled 3.7 GB, RGB/RGBA ones were OOM-killed.
TEST_P(png_size_claim, over_the_budget_is_refused_before_anything_is_allocated) {
  const std::vector<std::uint8_t> bomb = png_claiming(60000, 60000, GetParam(), {0});
  PngImage png;
  std::string error;
  EXPECT_EQ(decode_png(bomb, png, error, 89'478'485), PngStatus::corrupt);
  EXPECT_EQ(error, "PNG claims 60000x60000, over max_image_pixels=89478485");
  EXPECT_EQ(png.pixels.capacity(), 0u);
}

INSTANTIATE_TEST_SUITE_P(colour_types, png_size_claim, ::testing::Values(0, 4, 2, 6));

TEST(png, deflate_bomb_claiming_a_size_over_the_budget_is_refused_unread) {
  // 4000x4000 gray: 16 MB of zeros in a 16 KB file.
  const std::vector<std::uint8_t> bomb = png_claiming(4000, 4000, 0, std::vector<std::uint8_t>(4001 * 4000));
  ASSERT_LT(bomb.size(), 64u * 1024);
  PngImage png;
  std::string error;
  EXPECT_EQ(decode_png(bomb, png, error, 1'000'000), PngStatus::corrupt);
  EXPECT_EQ(error, "PNG claims 4000x4000, over max_image_pixels=1000000");
}

TEST(png, deflate_bomb_under_the_budget_stops_inflating_at_the_claimed_size) {
  // Claims 100x100 gray (10,100 bytes of rows) but its image data inflates to 64 MB.
  const std::vector<std::uint8_t> bomb = png_claiming(100, 100, 0, std::vector<std::uint8_t>(64 << 20));
  PngImage png;
  std::string error;
  EXPECT_EQ(decode_png(bomb, png, error), PngStatus::corrupt);
  EXPECT_EQ(error, "corrupt PNG (image data is longer than its header says)");
}

// libpng inflates all of a stream's excess data (1 GB from a 1 MB file) before it notices; kiln
// inflates every PNG itself first, also those it then hands to OpenCV, and stops at the claimed size.
TEST(png, deflate_bomb_outside_the_fast_path_is_refused_too) {
  std::vector<std::uint8_t> bomb = png_claiming(100, 100, 0, std::vector<std::uint8_t>(64 << 20));
  bomb[24] = 16;  // bit depth 16: OpenCV's layout, not the fast path's
  const std::size_t ihdr_crc = 8 + 8 + 13;
  const std::uint32_t crc = libdeflate_crc32(0, bomb.data() + 12, 17);
  for (int i = 0; i < 4; ++i) bomb[ihdr_crc + i] = static_cast<std::uint8_t>(crc >> (24 - 8 * i));
  PngImage png;
  std::string error;
  EXPECT_EQ(decode_png(bomb, png, error), PngStatus::corrupt);
  EXPECT_EQ(error, "corrupt PNG (image data is longer than its header says)");
}

// Adam7 (PNG spec, 8.2): pixel (x, y) belongs to the pass of this table's entry; each pass's rows
// are a filter byte and its pixels. Built independently of kiln's size formula, decoded by libpng.
TEST(png, interlaced_image_data_is_sized_by_its_seven_passes) {
  static constexpr int kPass[8][8] = {{1, 6, 4, 6, 2, 6, 4, 6}, {7, 7, 7, 7, 7, 7, 7, 7}, {5, 6, 5, 6, 5, 6, 5, 6},
                                      {7, 7, 7, 7, 7, 7, 7, 7}, {3, 6, 4, 6, 3, 6, 4, 6}, {7, 7, 7, 7, 7, 7, 7, 7},
                                      {5, 6, 5, 6, 5, 6, 5, 6}, {7, 7, 7, 7, 7, 7, 7, 7}};
  const int width = 13, height = 7;
  std::vector<std::uint8_t> raw;
  for (int pass = 1; pass <= 7; ++pass) {
    for (int y = 0; y < height; ++y) {
      std::vector<std::uint8_t> row;
      for (int x = 0; x < width; ++x) {
        if (kPass[y % 8][x % 8] == pass) row.push_back(static_cast<std::uint8_t>(pass * 30));
      }
      if (row.empty()) continue;
      raw.push_back(0);
      raw.insert(raw.end(), row.begin(), row.end());
    }
  }
  std::vector<std::uint8_t> bytes = png_claiming(width, height, 0, raw);
  bytes[28] = 1;  // interlace method 1
  const std::uint32_t crc = libdeflate_crc32(0, bytes.data() + 12, 17);
  for (int i = 0; i < 4; ++i) bytes[29 + i] = static_cast<std::uint8_t>(crc >> (24 - 8 * i));
  PngImage png;
  std::string error;
  EXPECT_EQ(decode_png(bytes, png, error), PngStatus::unsupported) << error;
  const cv::Mat decoded = cv::imdecode(bytes, cv::IMREAD_UNCHANGED);
  ASSERT_EQ(decoded.rows, height);
  EXPECT_EQ(decoded.at<std::uint8_t>(0, 0), 30);
  EXPECT_EQ(decoded.at<std::uint8_t>(1, 12), 210);
}

TEST(png, image_under_the_budget_decodes) {
  const std::vector<std::uint8_t> exact = png_claiming(100, 100, 0, std::vector<std::uint8_t>(101 * 100, 0));
  PngImage png;
  std::string error;
  EXPECT_EQ(decode_png(exact, png, error, 100 * 100), PngStatus::decoded) << error;
  EXPECT_EQ(decode_png(exact, png, error, 100 * 100 - 1), PngStatus::corrupt);
  EXPECT_EQ(error, "PNG claims 100x100, over max_image_pixels=9999");
}

// A critical chunk whose type bytes are not ASCII, with a bad CRC: the error names the type with
// the bytes escaped, so it stays valid UTF-8 (it used to carry the raw bytes into Python).
TEST(png, crc_error_in_a_chunk_with_non_ascii_type_is_printable_utf8) {
  std::vector<std::uint8_t> bytes = png_claiming(2, 2, 0, std::vector<std::uint8_t>(3 * 2));
  const std::size_t iend = bytes.size() - 12;
  std::vector<std::uint8_t> hostile(bytes.begin(), bytes.begin() + iend);
  append_chunk(hostile, "\xc1\xff\x01T", {1, 2, 3});
  hostile[hostile.size() - 1] ^= 0xff;  // break its CRC
  hostile.insert(hostile.end(), bytes.begin() + iend, bytes.end());
  PngImage png;
  std::string error;
  EXPECT_EQ(decode_png(hostile, png, error), PngStatus::corrupt);
  EXPECT_EQ(error, "corrupt PNG (CRC mismatch in \\xc1\\xff\\x01T chunk)");
  EXPECT_EQ(printable_utf8(error), error);
}

TEST(png, large_decode_buffers_are_released_after_the_image) {
  std::vector<std::uint8_t> large(8 << 20);
  release_if_large(large);
  EXPECT_EQ(large.capacity(), 0u);
  std::vector<std::uint8_t> small(64 << 10);
  release_if_large(small);
  EXPECT_EQ(small.capacity(), std::size_t{64} << 10);
}

}  // namespace
}  // namespace kiln::detail
