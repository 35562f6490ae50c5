#include "kiln/decode.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "kiln/detail/image_header.hpp"
#include "kiln/detail/utf8.hpp"
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
    ::testing::Values(
        Conversion{"image_of_another_size", pattern(56, 40, 1, 3), {1, 28, 28}, "resized from 56x40 to 28x28"},
        Conversion{"colour_image_in_grayscale_dataset", pattern(8, 8, 3, 4), {1, 8, 8}, "converted RGB to grayscale"},
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

// --- Hostile input: the pixel budget, read from each format's header before decoding -----------

// The formats kiln takes, each as this OpenCV writes it, with the size the header should report.
struct Written {
  const char* extension;
  cv::Mat image;
};

class image_header : public ::testing::TestWithParam<Written> {};

TEST_P(image_header, states_the_size_opencv_decodes) {
  const Written& w = GetParam();
  const std::vector<std::uint8_t> bytes = encode(w.image, w.extension);
  ASSERT_FALSE(bytes.empty());
  const detail::ImageHeader header = detail::read_image_header(bytes);
  ASSERT_EQ(header.error, "");
  const cv::Mat decoded = cv::imdecode(bytes, cv::IMREAD_UNCHANGED);
  EXPECT_EQ(header.width, static_cast<std::uint64_t>(decoded.cols));
  EXPECT_EQ(header.height, static_cast<std::uint64_t>(decoded.rows));
  // One pixel less of budget and the same file is refused, without being decoded.
  std::vector<std::uint8_t> out(decoded.total());
  const ImageSpec spec{1, decoded.rows, decoded.cols};
  EXPECT_TRUE(decode_into(bytes, spec, out.data(), std::int64_t{decoded.rows} * decoded.cols).ok);
  const DecodeResult refused = decode_into(bytes, spec, out.data(), std::int64_t{decoded.rows} * decoded.cols - 1);
  EXPECT_FALSE(refused.ok);
  EXPECT_NE(refused.error.find("claims " + std::to_string(decoded.cols) + "x" + std::to_string(decoded.rows) +
                               ", over max_image_pixels="),
            std::string::npos)
      << refused.error;
}

INSTANTIATE_TEST_SUITE_P(
    formats, image_header,
    ::testing::Values(Written{".png", pattern(13, 7, 1, 1)}, Written{".png", pattern(5, 9, 4, 2)},
                      Written{".png", cv::Mat(6, 11, CV_16UC3, cv::Scalar(9, 99, 999))},
                      Written{".jpg", pattern(13, 21, 3, 3)}, Written{".jpg", pattern(8, 3, 1, 4)},
                      Written{".bmp", pattern(7, 13, 3, 5)}, Written{".bmp", pattern(4, 6, 1, 6)},
                      Written{".tiff", pattern(9, 14, 3, 7)}, Written{".tiff", cv::Mat(5, 3, CV_16UC1, cv::Scalar(7))},
                      Written{".webp", pattern(17, 10, 3, 8)}, Written{".webp", pattern(6, 12, 4, 9)},
                      Written{".ppm", pattern(5, 8, 3, 10)}, Written{".pgm", pattern(8, 5, 1, 11)},
                      Written{".pbm", pattern(9, 9, 1, 12)}, Written{".pam", pattern(3, 7, 3, 13)},
                      Written{".ras", pattern(6, 10, 3, 14)}, Written{".jp2", pattern(64, 48, 3, 15)}),
    [](const ::testing::TestParamInfo<Written>& info) {
      return std::string(info.param.extension + 1) + std::to_string(info.index);
    });

std::uint32_t be32_at(const std::vector<std::uint8_t>& b, std::size_t at) {
  return (std::uint32_t{b[at]} << 24) | (std::uint32_t{b[at + 1]} << 16) | (std::uint32_t{b[at + 2]} << 8) | b[at + 3];
}
void put_be(std::vector<std::uint8_t>& b, std::size_t at, std::uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) b[at + i] = static_cast<std::uint8_t>(v >> (8 * (bytes - 1 - i)));
}
void put_le(std::vector<std::uint8_t>& b, std::size_t at, std::uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) b[at + i] = static_cast<std::uint8_t>(v >> (8 * i));
}
std::size_t find(const std::vector<std::uint8_t>& b, std::initializer_list<std::uint8_t> needle) {
  return std::search(b.begin(), b.end(), needle.begin(), needle.end()) - b.begin();
}

// A small valid file of `extension` whose header is edited to claim width x height.
std::vector<std::uint8_t> claiming(const char* extension, std::uint32_t width, std::uint32_t height) {
  std::vector<std::uint8_t> b = encode(pattern(64, 64, 3, 1), extension);  // OpenJPEG needs 64x64
  const std::string ext = extension;
  if (ext == ".jpg") {
    const std::size_t sof = find(b, {0xff, 0xc0});
    put_be(b, sof + 5, height, 2);
    put_be(b, sof + 7, width, 2);
  } else if (ext == ".bmp") {
    put_le(b, 18, width, 4);
    put_le(b, 22, height, 4);
  } else if (ext == ".tiff") {  // little-endian: ImageWidth/ImageLength entries of the first directory
    const std::size_t ifd = b[4] | (b[5] << 8) | (b[6] << 16) | (std::size_t{b[7]} << 24);
    const std::size_t entries = b[ifd] | (b[ifd + 1] << 8);
    for (std::size_t i = 0; i < entries; ++i) {
      const std::size_t at = ifd + 2 + 12 * i;
      const int tag = b[at] | (b[at + 1] << 8);
      if (tag != 256 && tag != 257) continue;
      put_le(b, at + 2, 4, 2);  // LONG
      put_le(b, at + 8, tag == 256 ? width : height, 4);
    }
  } else if (ext == ".webp" && b[15] == 'L') {  // lossless: 14-bit sizes - 1 after the VP8L signature
    const std::uint32_t bits = (b[21] | (b[22] << 8) | (b[23] << 16) | (std::uint32_t{b[24]} << 24)) & 0xf0000000u;
    put_le(b, 21, bits | ((height - 1) & 0x3fff) << 14 | ((width - 1) & 0x3fff), 4);
  } else if (ext == ".webp") {  // lossy: 14-bit sizes after the VP8 start code
    put_le(b, 26, width & 0x3fff, 2);
    put_le(b, 28, height & 0x3fff, 2);
  } else if (ext == ".ras") {
    put_be(b, 4, width, 4);
    put_be(b, 8, height, 4);
  } else if (ext == ".jp2") {
    const std::size_t siz = find(b, {0xff, 0x4f, 0xff, 0x51});
    put_be(b, siz + 8, width + be32_at(b, siz + 16), 4);
    put_be(b, siz + 12, height + be32_at(b, siz + 20), 4);
  }
  return b;
}

std::vector<std::uint8_t> bytes_of(const std::string& text) {
  return {text.begin(), text.end()};
}

struct Claim {
  const char* name;
  std::vector<std::uint8_t> bytes;
  const char* error;  // with the default budget, 89478485
};

class decode_refuses : public ::testing::TestWithParam<Claim> {};

// Each of these used to be decoded at its claimed size (the JPEG: 6.4 GB and 20 s, then a prediction).
TEST_P(decode_refuses, an_image_claiming_more_than_the_budget_before_decoding_it) {
  const Claim& c = GetParam();
  std::vector<std::uint8_t> out(3 * 8 * 8);
  const DecodeResult result = decode_into(c.bytes, {3, 8, 8}, out.data());
  EXPECT_FALSE(result.ok);
  EXPECT_EQ(result.error, c.error);
  std::string probe_error;
  EXPECT_FALSE(probe_image(c.bytes, &probe_error).has_value());
  EXPECT_EQ(probe_error, c.error);
}

INSTANTIATE_TEST_SUITE_P(
    formats, decode_refuses,
    ::testing::Values(
        Claim{"jpeg", claiming(".jpg", 32768, 32767), "JPEG claims 32768x32767, over max_image_pixels=89478485"},
        Claim{"bmp", claiming(".bmp", 100000, 1000), "BMP claims 100000x1000, over max_image_pixels=89478485"},
        Claim{"bmp_top_down", claiming(".bmp", 30000, static_cast<std::uint32_t>(-30000)),
              "BMP claims 30000x30000, over max_image_pixels=89478485"},
        Claim{"tiff", claiming(".tiff", 70000, 70000), "TIFF claims 70000x70000, over max_image_pixels=89478485"},
        Claim{"webp", claiming(".webp", 16383, 16383), "WebP claims 16383x16383, over max_image_pixels=89478485"},
        Claim{"sun_raster", claiming(".ras", 50000, 50000),
              "Sun raster claims 50000x50000, over max_image_pixels=89478485"},
        Claim{"jpeg2000", claiming(".jp2", 40000, 40000),
              "JPEG 2000 claims 40000x40000, over max_image_pixels=89478485"},
        Claim{"ppm", bytes_of("P6\n# a comment\n60000 60000\n255\n\x01\x02\x03"),
              "PNM claims 60000x60000, over max_image_pixels=89478485"},
        // Found by scripts/fuzz.sh: OpenCV drops the byte after each number, so this '#' starts no comment.
        Claim{"ppm_number_ended_by_a_hash", bytes_of("P3\n0999#0999000\n299<9"),
              "PNM claims 999x999000, over max_image_pixels=89478485"},
        Claim{"pam", bytes_of("P7\nWIDTH 60000\nHEIGHT 60000\nDEPTH 3\nMAXVAL 255\nTUPLTYPE RGB\nENDHDR\n\x01"),
              "PNM claims 60000x60000, over max_image_pixels=89478485"},
        Claim{"pfm", bytes_of("PF\n2 2\n-1.0\n"),
              "unsupported pixel depth (floating-point image; expected 8- or 16-bit integers)"}),
    [](const ::testing::TestParamInfo<Claim>& info) { return std::string(info.param.name); });

TEST(decode, png_claiming_more_than_the_budget_is_refused_on_every_path) {
  std::vector<std::uint8_t> png = encode(pattern(4, 4, 1, 1));
  put_be(png, 16, 60000, 4);
  put_be(png, 20, 60000, 4);  // the IHDR CRC is now wrong too: the size is refused first
  std::vector<std::uint8_t> out(16);
  EXPECT_EQ(decode_into(png, {1, 4, 4}, out.data()).error, "PNG claims 60000x60000, over max_image_pixels=89478485");
  EXPECT_EQ(decode_into(png, {1, 4, 4}, out.data(), 16'777'216).error,
            "PNG claims 60000x60000, over max_image_pixels=16777216");
}

TEST(decode, every_error_is_printable_utf8) {
  EXPECT_EQ(detail::printable_utf8("caf\xc3\xa9 \xe2\x9c\x93"), "caf\xc3\xa9 \xe2\x9c\x93");
  EXPECT_EQ(detail::printable_utf8("a\xff\xc3(\x01\tb\n"), "a\\xff\\xc3(\\x01\tb\\x0a");
  EXPECT_EQ(detail::printable_utf8("\xed\xa0\x80\xc0\xaf"), "\\xed\\xa0\\x80\\xc0\\xaf");  // surrogate, overlong
  EXPECT_EQ(detail::printable_utf8("two\nlines\xff", /*keep_newlines=*/true), "two\nlines\\xff");
}

// Found by scripts/fuzz.sh: a JPEG 2000 file with "DICM" at byte 128, which OpenCV handed to its DICOM reader
// (GDCM), which allocated 3.2 GB for its length fields. kiln refuses it unread.
TEST(decode, jpeg2000_carrying_a_dicom_signature_is_refused_unread) {
  const std::vector<std::uint8_t> file = {
      0x00, 0x00, 0x00, 0x0c, 0x6a, 0x50, 0x20, 0x20, 0x0d, 0x0a, 0x87, 0x0a, 0x00, 0x00, 0x00, 0x14,
      0x66, 0x74, 0x79, 0x70, 0x6a, 0x70, 0x34, 0x20, 0x00, 0x00, 0x00, 0x00, 0x6a, 0x70, 0x32, 0x20,
      0x00, 0x00, 0x00, 0x2d, 0x6a, 0x70, 0x32, 0x68, 0x00, 0x00, 0x00, 0x16, 0x69, 0x68, 0x64, 0x72,
      0x00, 0x00, 0x00, 0x28, 0x00, 0x00, 0x00, 0x30, 0x00, 0x01, 0x07, 0x07, 0x00, 0x00, 0x00, 0x00,
      0x00, 0x0f, 0x63, 0x6f, 0x6c, 0x72, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x11, 0x00, 0x00, 0x01,
      0x91, 0x6a, 0x70, 0x32, 0x63, 0xff, 0x4f, 0xff, 0x51, 0x00, 0x29, 0x00, 0x00, 0x00, 0x00, 0x00,
      0x30, 0x00, 0x00, 0x00, 0x28, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
      0x30, 0x00, 0x00, 0x00, 0x39, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x07,
      0x44, 0x49, 0x43, 0x4d, 0x01, 0x01, 0xff, 0x62, 0x4f, 0x42, 0x54, 0xe3, 0xc0, 0x63, 0x83, 0x1a,
      0x65, 0x98, 0xc2, 0x67, 0xf0, 0x34, 0xc5, 0x87, 0x61, 0xd9, 0x52, 0x8a, 0x79, 0xab, 0x98, 0x6f,
      0xf6, 0x86, 0x10, 0xee, 0xc5, 0x02, 0x5b, 0xdb, 0x63, 0x26, 0xec, 0xa6, 0xc3, 0x56, 0xa8, 0x83,
      0x08, 0xe1, 0xff, 0xd9,
  };
  std::vector<std::uint8_t> out(3 * 48 * 40);
  EXPECT_EQ(decode_into(file, {3, 48, 40}, out.data()).error,
            "JPEG 2000 file that also carries a DICOM signature (kiln reads no DICOM; not decoded)");
}

// Found in /tmp after fuzzing: OpenCV copies a Sun raster's bytes to a temporary file before reading its
// header, then throws on a side over 2^20 pixels and leaves the file behind (one per hostile request in a
// server). kiln refuses such a size before OpenCV sees the bytes.
TEST(decode, a_side_over_opencvs_limit_is_refused_before_opencv_writes_a_temporary_file) {
  const auto temp_dir = std::filesystem::temp_directory_path() / ("kiln-opencv-temp-" + std::to_string(::getpid()));
  std::filesystem::create_directories(temp_dir);
  ::setenv("OPENCV_TEMP_PATH", temp_dir.c_str(), 1);  // where OpenCV's imdecode writes its temporary files
  // magic, width 1, height 3,813,167, depth 24, length, type 1 (standard), no colour map
  const std::vector<std::uint8_t> file = {
      0x59, 0xa6, 0x6a, 0x95, 0, 0, 0, 1, 0, 0x3a, 0x2f, 0x2f, 0, 0, 0, 24, 0, 0, 0, 0x50,
      0,    0,    0,    1,    0, 0, 0, 0, 0, 0,    0,    0,    0, 0, 0, 0,  0, 0, 0, 0,
  };
  std::vector<std::uint8_t> out(3 * 8 * 8);
  const auto result = decode_into(file, {3, 8, 8}, out.data(), std::int64_t{1} << 40);
  ::unsetenv("OPENCV_TEMP_PATH");
  EXPECT_EQ(result.error, "Sun raster claims 1x3813167, over OpenCV's limits (1048576 pixels per side, 2^30 in all)");
  EXPECT_TRUE(std::filesystem::is_empty(temp_dir));
  std::filesystem::remove_all(temp_dir);
}

}  // namespace
}  // namespace kiln
