#include "kiln/decode.hpp"

#include <opencv2/core.hpp>
#include <opencv2/core/utils/logger.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <algorithm>
#include <array>
#include <cstring>

#include "kiln/detail/image_header.hpp"
#include "kiln/detail/png.hpp"
#include "kiln/detail/utf8.hpp"

namespace kiln {
namespace {

using detail::ImageFormat;

// libpng and libjpeg both return a partly grey image for some truncated files instead of failing,
// so completeness is checked on the bytes: a PNG ends with its IEND chunk, a JPEG with EOI.
std::string check_complete(std::span<const std::uint8_t> data, ImageFormat format) {
  if (format == ImageFormat::png) {
    static constexpr std::array<std::uint8_t, 4> kIend = {'I', 'E', 'N', 'D'};
    const auto tail = data.subspan(data.size() - std::min<std::size_t>(data.size(), 64));
    if (std::search(tail.begin(), tail.end(), kIend.begin(), kIend.end()) == tail.end()) {
      return "truncated PNG (no IEND chunk at the end)";
    }
  } else if (format == ImageFormat::jpeg) {
    std::size_t end = data.size();
    while (end > 0 && (data[end - 1] == 0x00 || data[end - 1] == '\n' || data[end - 1] == '\r')) --end;
    if (end < 2 || data[end - 2] != 0xff || data[end - 1] != 0xd9) return "truncated JPEG (no end-of-image marker)";
  }
  return {};
}

// Everything that can be known before decoding: the file is a format kiln takes, complete, and
// claims no more pixels than `max_image_pixels`. Returns the format, or fills `error`.
ImageFormat check_before_decoding(std::span<const std::uint8_t> data, std::int64_t max_image_pixels,
                                  std::string& error) {
  if (data.empty()) {
    error = "empty file (0 bytes)";
    return ImageFormat::unknown;
  }
  const detail::ImageHeader header = detail::read_image_header(data);
  if (!header.error.empty()) {
    error = header.error;
  } else if (error = check_complete(data, header.format); error.empty()) {
    error = detail::check_pixel_budget(header.format, header.width, header.height, max_image_pixels);
  }
  return header.format;
}

const char* channels_name(int channels) {
  return channels == 1 ? "grayscale" : "RGB";
}

// Decodes to 8-bit grayscale or BGR, appending what it changed (alpha, bit depth) to `conversion`.
// `data` has passed check_before_decoding.
cv::Mat decode_native(std::span<const std::uint8_t> data, ImageFormat format, std::string& error,
                      std::string& conversion) {
  // OpenCV would print every corrupt file to stderr; kiln reports them itself.
  static const bool silenced = [] {
    cv::utils::logging::setLogLevel(cv::utils::logging::LOG_LEVEL_SILENT);
    return true;
  }();
  (void)silenced;

  // OpenCV picks its decoder by signature, trying its DICOM reader (GDCM) before JPEG 2000's: a JPEG 2000
  // file with "DICM" at byte 128 goes to GDCM, which allocates whatever its length fields claim (3.2 GB
  // for a 180-byte file the fuzzer made). kiln reads no DICOM, so such a file is refused unread.
  constexpr std::size_t kDicomSignatureAt = 128;
  if (format == ImageFormat::jpeg2000 && data.size() >= kDicomSignatureAt + 4 &&
      std::memcmp(data.data() + kDicomSignatureAt, "DICM", 4) == 0) {
    error = "JPEG 2000 file that also carries a DICOM signature (kiln reads no DICOM; not decoded)";
    return {};
  }
  cv::Mat image;
  try {
    const cv::Mat encoded(1, static_cast<int>(data.size()), CV_8U, const_cast<std::uint8_t*>(data.data()));
    image = cv::imdecode(encoded, cv::IMREAD_UNCHANGED);
  } catch (const cv::Exception& exception) {
    error = std::string("corrupt ") + detail::format_name(format) + " (" + detail::printable_utf8(exception.msg) + ")";
    return {};
  }
  if (image.empty()) {
    error = std::string("corrupt ") + detail::format_name(format) + " (decoder failed)";
    return {};
  }

  if (image.depth() == CV_16U) {
    image.convertTo(image, CV_8U, 1.0 / 257.0);
    conversion = "reduced 16-bit to 8-bit";
  } else if (image.depth() != CV_8U) {
    error = "unsupported pixel depth (expected 8- or 16-bit integers)";
    return {};
  }
  auto note = [&conversion](const char* what) { conversion += (conversion.empty() ? "" : "; ") + std::string(what); };
  switch (image.channels()) {
    case 1:
    case 3:
      break;
    case 4:
      cv::cvtColor(image, image, cv::COLOR_BGRA2BGR);
      note("dropped alpha channel");
      break;
    case 2: {
      cv::Mat gray;
      cv::extractChannel(image, gray, 0);
      image = gray;
      note("dropped alpha channel");
      break;
    }
    default:
      error = "unsupported channel count " + std::to_string(image.channels());
      return {};
  }
  return image;
}

// The common case without OpenCV: a PNG that already has the dataset's layout. Returns false when
// OpenCV must decide (a layout to convert, or a PNG variant outside the fast path).
// The thread's PNG fast-path image, its pixels released after the call if one image made them large.
struct ThreadPng {
  ThreadPng() : image(instance()) {}
  ~ThreadPng() { detail::release_if_large(image.pixels); }
  detail::PngImage& image;

 private:
  static detail::PngImage& instance() {
    thread_local detail::PngImage png;
    return png;
  }
};

bool decode_png_fast(std::span<const std::uint8_t> data, const ImageSpec& spec, std::int64_t max_image_pixels,
                     std::uint8_t* out, DecodeResult& result) {
  ThreadPng thread_png;
  detail::PngImage& png = thread_png.image;
  switch (detail::decode_png(data, png, result.error, max_image_pixels)) {
    case detail::PngStatus::corrupt:
      return true;
    case detail::PngStatus::unsupported:
      return false;
    case detail::PngStatus::decoded:
      break;
  }
  const bool has_alpha = png.channels == 2 || png.channels == 4;
  const int colour_channels = has_alpha ? png.channels - 1 : png.channels;
  if (colour_channels != spec.channels || png.height != spec.height || png.width != spec.width) return false;

  const std::size_t plane = static_cast<std::size_t>(spec.height) * spec.width;
  const std::uint8_t* pixels = png.pixels.data();
  if (png.channels == 1) {
    std::memcpy(out, pixels, plane);
  } else {
    for (std::size_t i = 0; i < plane; ++i) {
      for (int c = 0; c < colour_channels; ++c) out[c * plane + i] = pixels[i * png.channels + c];
    }
  }
  if (has_alpha) result.conversion = "dropped alpha channel";
  result.ok = true;
  return true;
}

}  // namespace

std::string to_string(const ImageSpec& spec) {
  return std::to_string(spec.height) + "x" + std::to_string(spec.width) + " " + channels_name(spec.channels);
}

std::optional<ImageSpec> probe_image(std::span<const std::uint8_t> encoded, std::string* error,
                                     std::int64_t max_image_pixels) {
  std::string why;
  std::string conversion;
  const ImageFormat format = check_before_decoding(encoded, max_image_pixels, why);
  if (why.empty() && format == ImageFormat::png) {  // also bounds the inflation of PNGs OpenCV decodes
    ThreadPng thread_png;
    const detail::PngImage& png = thread_png.image;
    switch (detail::decode_png(encoded, thread_png.image, why, max_image_pixels)) {
      case detail::PngStatus::decoded:
        return ImageSpec{png.channels <= 2 ? 1 : 3, png.height, png.width};
      case detail::PngStatus::unsupported:
      case detail::PngStatus::corrupt:
        break;
    }
  }
  cv::Mat image;
  if (why.empty()) image = decode_native(encoded, format, why, conversion);
  if (image.empty()) {
    if (error != nullptr) *error = why;
    return std::nullopt;
  }
  return ImageSpec{image.channels(), image.rows, image.cols};
}

DecodeResult decode_into(std::span<const std::uint8_t> encoded, const ImageSpec& spec, std::uint8_t* out,
                         std::int64_t max_image_pixels) {
  DecodeResult result;
  const ImageFormat format = check_before_decoding(encoded, max_image_pixels, result.error);
  if (!result.error.empty()) return result;
  if (format == ImageFormat::png && decode_png_fast(encoded, spec, max_image_pixels, out, result)) return result;
  cv::Mat image = decode_native(encoded, format, result.error, result.conversion);
  if (image.empty()) return result;
  auto note = [&result](const std::string& what) {
    result.conversion += (result.conversion.empty() ? "" : "; ") + what;
  };

  if (image.channels() != spec.channels) {
    note(std::string("converted ") + channels_name(image.channels()) + " to " + channels_name(spec.channels));
    cv::cvtColor(image, image, spec.channels == 1 ? cv::COLOR_BGR2GRAY : cv::COLOR_GRAY2BGR);
  }
  if (image.rows != spec.height || image.cols != spec.width) {
    note("resized from " + std::to_string(image.rows) + "x" + std::to_string(image.cols) + " to " +
         std::to_string(spec.height) + "x" + std::to_string(spec.width));
    const bool shrinking = image.rows * image.cols > spec.height * spec.width;
    cv::resize(image, image, cv::Size(spec.width, spec.height), 0, 0, shrinking ? cv::INTER_AREA : cv::INTER_LINEAR);
  }

  const std::size_t plane = static_cast<std::size_t>(spec.height) * spec.width;
  if (spec.channels == 1) {
    cv::Mat destination(spec.height, spec.width, CV_8U, out);
    image.copyTo(destination);
  } else {
    // BGR interleaved -> RGB planes, written straight into the caller's buffer.
    std::array<cv::Mat, 3> planes = {cv::Mat(spec.height, spec.width, CV_8U, out + 2 * plane),
                                     cv::Mat(spec.height, spec.width, CV_8U, out + plane),
                                     cv::Mat(spec.height, spec.width, CV_8U, out)};
    cv::split(image, planes.data());
  }
  result.ok = true;
  return result;
}

}  // namespace kiln
