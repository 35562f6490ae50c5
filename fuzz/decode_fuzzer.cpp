// libFuzzer target over every entry point kiln decodes untrusted bytes with: the header reader, the
// PNG fast path, and decode_into/probe_image (which hand other formats to OpenCV). Beyond ASan/UBSan
// findings it fails on a broken promise of the decoders: an error that is not printable UTF-8, an
// image decoded although its header claims more than the budget, a decode that reports nothing, a
// temporary file OpenCV's imdecode left behind (it copies the bytes of some formats to one).
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include "kiln/decode.hpp"
#include "kiln/detail/image_header.hpp"
#include "kiln/detail/png.hpp"
#include "kiln/detail/utf8.hpp"

namespace {

// Small enough that libFuzzer's 2 GB RSS limit is never reached by a legitimate decode.
constexpr std::int64_t kBudget = 4'000'000;

void require(bool condition, const char* what, const std::string& detail) {
  if (condition) return;
  std::fprintf(stderr, "kiln decode fuzzer: %s: %s\n", what, detail.c_str());
  std::abort();
}

void require_printable(const std::string& text, const char* where) {
  require(kiln::detail::printable_utf8(text) == text, where, text);
}

// OpenCV's imdecode writes its temporary files here (OPENCV_TEMP_PATH), where none may remain.
std::filesystem::path opencv_temp_dir;

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  opencv_temp_dir = std::filesystem::temp_directory_path() / ("kiln-fuzz-opencv-" + std::to_string(::getpid()));
  std::filesystem::create_directories(opencv_temp_dir);
  ::setenv("OPENCV_TEMP_PATH", opencv_temp_dir.c_str(), 1);
  std::atexit([] { std::filesystem::remove_all(opencv_temp_dir); });  // an abort keeps it, as evidence
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::uint8_t> bytes(data, size);

  const kiln::detail::ImageHeader header = kiln::detail::read_image_header(bytes);
  require_printable(header.error, "header error");
  const bool over_budget =
      header.error.empty() &&
      !kiln::detail::check_pixel_budget(header.format, header.width, header.height, kBudget).empty();

  if (header.format == kiln::detail::ImageFormat::png) {  // decode_png's contract: a PNG signature first
    kiln::detail::PngImage png;
    std::string png_error;
    const kiln::detail::PngStatus status = kiln::detail::decode_png(bytes, png, png_error, kBudget);
    require_printable(png_error, "PNG fast-path error");
    if (status == kiln::detail::PngStatus::decoded) {
      require(std::int64_t{png.width} * png.height <= kBudget, "PNG decoded over budget", std::to_string(png.width));
      require(png.pixels.size() == std::size_t(png.width) * png.height * png.channels, "PNG size mismatch", "");
    }
  }

  for (const kiln::ImageSpec spec : {kiln::ImageSpec{1, 28, 28}, kiln::ImageSpec{3, 17, 9}}) {
    std::vector<std::uint8_t> out(static_cast<std::size_t>(spec.bytes()));
    const kiln::DecodeResult result = kiln::decode_into(bytes, spec, out.data(), kBudget);
    require_printable(result.error, "decode error");
    require_printable(result.conversion, "conversion note");
    require(result.ok != !result.error.empty(), "decode neither ok nor failed with a reason", result.error);
    require(!(result.ok && over_budget), "decoded an image whose header is over budget", result.conversion);
  }
  std::string probe_error;
  const auto probed = kiln::probe_image(bytes, &probe_error, kBudget);
  require_printable(probe_error, "probe error");
  if (probed) require(std::int64_t{probed->height} * probed->width <= kBudget, "probed over budget", "");
  require(std::filesystem::is_empty(opencv_temp_dir), "OpenCV left a temporary file", opencv_temp_dir.string());
  return 0;
}
