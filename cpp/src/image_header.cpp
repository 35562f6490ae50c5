#include "kiln/detail/image_header.hpp"

#include <algorithm>
#include <array>
#include <cctype>
#include <optional>
#include <string_view>

namespace kiln::detail {
namespace {

using Bytes = std::span<const std::uint8_t>;

bool starts_with(Bytes data, std::string_view prefix, std::size_t at = 0) {
  if (data.size() < at + prefix.size()) return false;
  for (std::size_t i = 0; i < prefix.size(); ++i) {
    if (data[at + i] != static_cast<std::uint8_t>(prefix[i])) return false;
  }
  return true;
}

std::uint32_t be16(Bytes d, std::size_t at) {
  return (std::uint32_t{d[at]} << 8) | d[at + 1];
}
std::uint32_t be32(Bytes d, std::size_t at) {
  return (std::uint32_t{d[at]} << 24) | (std::uint32_t{d[at + 1]} << 16) | (std::uint32_t{d[at + 2]} << 8) | d[at + 3];
}
std::uint64_t be64(Bytes d, std::size_t at) {
  return (std::uint64_t{be32(d, at)} << 32) | be32(d, at + 4);
}
std::uint32_t le16(Bytes d, std::size_t at) {
  return std::uint32_t{d[at]} | (std::uint32_t{d[at + 1]} << 8);
}
std::uint32_t le24(Bytes d, std::size_t at) {
  return le16(d, at) | (std::uint32_t{d[at + 2]} << 16);
}
std::uint32_t le32(Bytes d, std::size_t at) {
  return le16(d, at) | (le16(d, at + 2) << 16);
}

ImageHeader sized(ImageFormat format, std::uint64_t width, std::uint64_t height) {
  ImageHeader header;
  header.format = format;
  header.width = width;
  header.height = height;
  if (width == 0 || height == 0) header.error = std::string("corrupt ") + format_name(format) + " (image size is zero)";
  return header;
}

ImageHeader failed(ImageFormat format, const std::string& what) {
  ImageHeader header;
  header.format = format;
  header.error = what;
  return header;
}

ImageHeader truncated(ImageFormat format) {
  return failed(format, std::string("truncated ") + format_name(format) + " (header cut short)");
}

ImageHeader corrupt(ImageFormat format, const std::string& what) {
  return failed(format, std::string("corrupt ") + format_name(format) + " (" + what + ")");
}

// PNG: the IHDR chunk, which must come first (libpng and kiln's fast path both insist on it).
ImageHeader png_header(Bytes d) {
  if (d.size() < 8 + 8 + 13) return truncated(ImageFormat::png);
  if (!starts_with(d, "IHDR", 12) || be32(d, 8) != 13) return corrupt(ImageFormat::png, "missing IHDR header");
  return sized(ImageFormat::png, be32(d, 16), be32(d, 20));
}

// JPEG: the first SOFn frame header, found by walking the markers the way libjpeg does (bytes
// before a marker's 0xFF are skipped, 0xFF fill bytes swallowed, FF00 ignored); libjpeg refuses a
// second frame header, so the first one is the size it decodes.
ImageHeader jpeg_header(Bytes d) {
  constexpr auto format = ImageFormat::jpeg;
  std::size_t at = 2;  // after SOI
  while (true) {
    while (at < d.size() && d[at] != 0xff) ++at;
    while (at < d.size() && d[at] == 0xff) ++at;
    if (at >= d.size()) return truncated(format);
    const std::uint8_t marker = d[at++];
    if (marker == 0x00 || marker == 0x01 || (marker >= 0xd0 && marker <= 0xd7)) continue;  // no length
    if (marker == 0xd8) return corrupt(format, "second start-of-image marker");
    if (marker == 0xd9 || marker == 0xda) return corrupt(format, "no frame header before the image data");
    if (at + 2 > d.size()) return truncated(format);
    const std::size_t length = be16(d, at);
    if (length < 2) return corrupt(format, "marker segment shorter than its length field");
    const bool frame = marker >= 0xc0 && marker <= 0xcf && marker != 0xc4 && marker != 0xc8 && marker != 0xcc;
    if (!frame) {
      at += length;
      continue;
    }
    if (at + 8 > d.size()) return truncated(format);
    const std::uint32_t components = d[at + 7];
    if (components != 1 && components != 3 && components != 4) {
      return corrupt(format, std::to_string(components) + " colour components; expected 1, 3 or 4");
    }
    return sized(format, be16(d, at + 5), be16(d, at + 3));
  }
}

// BMP: the width and height of the DIB header after the 14-byte file header, as OpenCV reads them
// (a 12-byte OS/2 header holds 16-bit sizes; a negative height means rows stored top-down).
ImageHeader bmp_header(Bytes d) {
  constexpr auto format = ImageFormat::bmp;
  if (d.size() < 18) return truncated(format);
  const std::uint32_t size = le32(d, 14);
  if (size == 12) {
    if (d.size() < 22) return truncated(format);
    return sized(format, le16(d, 18), le16(d, 20));
  }
  if (size < 36) return corrupt(format, "unknown header size " + std::to_string(size));
  if (d.size() < 26) return truncated(format);
  const auto width = static_cast<std::int32_t>(le32(d, 18));
  const auto height = static_cast<std::int32_t>(le32(d, 22));
  if (width < 0) return corrupt(format, "negative width");
  const std::int64_t rows = height < 0 ? -std::int64_t{height} : std::int64_t{height};
  return sized(format, static_cast<std::uint64_t>(width), static_cast<std::uint64_t>(rows));
}

// TIFF and BigTIFF: ImageWidth (256) and ImageLength (257) of the first directory, the page
// OpenCV decodes. Where a tag is repeated, the largest value counts.
ImageHeader tiff_header(Bytes d) {
  constexpr auto format = ImageFormat::tiff;
  if (d.size() < 8) return truncated(format);
  const bool little = d[0] == 'I';
  const bool big_tiff = (little ? le16(d, 2) : be16(d, 2)) == 43;
  auto u16 = [&](std::size_t at) { return little ? le16(d, at) : be16(d, at); };
  auto u32 = [&](std::size_t at) { return little ? le32(d, at) : be32(d, at); };
  auto u64 = [&](std::size_t at) {
    return little ? (std::uint64_t{le32(d, at + 4)} << 32) | le32(d, at) : be64(d, at);
  };
  std::uint64_t directory = 0;
  if (big_tiff) {
    if (d.size() < 16) return truncated(format);
    directory = u64(8);
  } else {
    directory = u32(4);
  }
  const std::size_t count_size = big_tiff ? 8 : 2;
  const std::size_t entry_size = big_tiff ? 20 : 12;
  if (directory > d.size() || d.size() - directory < count_size) return truncated(format);
  const std::uint64_t entries = big_tiff ? u64(directory) : u16(directory);
  std::optional<std::uint64_t> width;
  std::optional<std::uint64_t> height;
  for (std::uint64_t i = 0; i < entries; ++i) {
    const std::uint64_t at = directory + count_size + i * entry_size;
    if (at > d.size() || d.size() - at < entry_size) return truncated(format);
    const std::uint32_t tag = u16(at);
    if (tag != 256 && tag != 257) continue;
    const std::uint32_t type = u16(at + 2);
    const std::uint64_t count = big_tiff ? u64(at + 4) : u32(at + 4);
    const std::size_t value = at + (big_tiff ? 12 : 8);
    std::uint64_t size = 0;
    switch (type) {
      case 1:  // BYTE
      case 6:  // SBYTE
        size = d[value];
        break;
      case 3:  // SHORT
      case 8:  // SSHORT
        size = u16(value);
        break;
      case 4:   // LONG
      case 9:   // SLONG
      case 13:  // IFD
        size = u32(value);
        break;
      case 16:  // LONG8
      case 17:  // SLONG8
      case 18:  // IFD8
        if (!big_tiff) return corrupt(format, "image size of a 64-bit type in a classic TIFF");
        size = u64(value);
        break;
      default:
        return corrupt(format, "image size of type " + std::to_string(type));
    }
    if (count != 1) return corrupt(format, "image size with " + std::to_string(count) + " values");
    auto& slot = tag == 256 ? width : height;
    slot = std::max(slot.value_or(0), size);
  }
  if (!width || !height) return corrupt(format, "no image width or length in the first directory");
  return sized(format, *width, *height);
}

// WebP: the canvas of an extended (VP8X) file, else the frame size of its lossy (VP8) or lossless
// (VP8L) bitstream, as libwebp's WebPGetFeatures reports it to OpenCV.
ImageHeader webp_header(Bytes d) {
  constexpr auto format = ImageFormat::webp;
  if (d.size() < 30) return truncated(format);
  if (starts_with(d, "VP8X", 12)) return sized(format, std::uint64_t{le24(d, 24)} + 1, std::uint64_t{le24(d, 27)} + 1);
  if (starts_with(d, "VP8L", 12)) {
    if (d[20] != 0x2f) return corrupt(format, "bad lossless signature");
    const std::uint32_t bits = le32(d, 21);
    return sized(format, (bits & 0x3fff) + 1, ((bits >> 14) & 0x3fff) + 1);
  }
  if (starts_with(d, "VP8 ", 12)) {
    if (d[23] != 0x9d || d[24] != 0x01 || d[25] != 0x2a) return corrupt(format, "bad lossy start code");
    return sized(format, le16(d, 26) & 0x3fff, le16(d, 28) & 0x3fff);
  }
  return corrupt(format, "no VP8, VP8L or VP8X chunk first");
}

// PBM/PGM/PPM: width and height as decimal numbers after the magic, with whitespace and # comments
// between them, read as OpenCV's PxM reader reads them.
ImageHeader pnm_header(Bytes d) {
  constexpr auto format = ImageFormat::pnm;
  std::size_t at = 2;
  auto number = [&]() -> std::optional<std::uint64_t> {
    while (at < d.size() && !std::isdigit(d[at])) {
      if (d[at] == '#') {
        while (at < d.size() && d[at] != '\n' && d[at] != '\r') ++at;
      } else if (std::isspace(d[at])) {
        ++at;
      } else {
        return std::nullopt;
      }
    }
    if (at >= d.size()) return std::nullopt;
    std::uint64_t value = 0;
    while (at < d.size() && std::isdigit(d[at])) {
      value = std::min<std::uint64_t>(value * 10 + (d[at] - '0'), std::uint64_t{1} << 40);
      ++at;
    }
    // OpenCV's ReadNumber reads one byte past the digits and drops it, whatever it is: in "999#1000\n..." the '#'
    // starts no comment and the next number is 1000 (found by scripts/fuzz.sh: "P3\n0999#0999000\n299" is
    // 999x999000 to OpenCV, which tried to allocate it, and was 999x299 here).
    if (at < d.size()) ++at;
    return value;
  };
  const auto width = number();
  const auto height = number();
  if (!width || !height) return corrupt(format, "no width and height in the header");
  return sized(format, *width, *height);
}

// PAM: "KEY value" lines up to ENDHDR; the largest WIDTH and HEIGHT given count, and more than 4
// channels (DEPTH) are refused before OpenCV reserves a plane for each.
ImageHeader pam_header(Bytes d) {
  constexpr auto format = ImageFormat::pnm;
  std::uint64_t width = 0;
  std::uint64_t height = 0;
  std::size_t at = 3;
  while (at < d.size()) {
    std::size_t end = at;
    while (end < d.size() && d[end] != '\n') ++end;
    std::string_view line(reinterpret_cast<const char*>(d.data() + at), end - at);
    at = end + 1;
    while (!line.empty() && std::isspace(static_cast<unsigned char>(line.front()))) line.remove_prefix(1);
    if (line.starts_with("ENDHDR")) {
      if (width == 0 || height == 0) return corrupt(format, "PAM header without WIDTH and HEIGHT");
      return sized(format, width, height);
    }
    const std::size_t key_end = std::min(line.find_first_of(" \t\r"), line.size());
    const std::string_view key = line.substr(0, key_end);
    std::string_view rest = line.substr(key_end);
    while (!rest.empty() && std::isspace(static_cast<unsigned char>(rest.front()))) rest.remove_prefix(1);
    if (!rest.empty() && (rest.front() == '+' || rest.front() == '-')) rest.remove_prefix(1);
    std::uint64_t value = 0;
    for (const char c : rest) {
      if (!std::isdigit(static_cast<unsigned char>(c))) break;
      value = std::min<std::uint64_t>(value * 10 + (c - '0'), std::uint64_t{1} << 40);
    }
    if (key == "WIDTH") width = std::max(width, value);
    if (key == "HEIGHT") height = std::max(height, value);
    if (key == "DEPTH" && value > 4) return corrupt(format, "PAM DEPTH " + std::to_string(value) + "; expected 1 to 4");
  }
  return truncated(format);
}

ImageHeader sun_raster_header(Bytes d) {
  if (d.size() < 12) return truncated(ImageFormat::sun_raster);
  return sized(ImageFormat::sun_raster, be32(d, 4), be32(d, 8));
}

// A J2K codestream's SIZ segment (right after SOC): the image area is Xsiz-XOsiz by Ysiz-YOsiz;
// OpenJPEG allocates a plane per component, so more than 4 are refused.
ImageHeader j2k_codestream_header(Bytes d) {
  constexpr auto format = ImageFormat::jpeg2000;
  if (d.size() < 42) return truncated(format);
  if (d[0] != 0xff || d[1] != 0x4f || d[2] != 0xff || d[3] != 0x51) return corrupt(format, "no SIZ segment");
  const std::uint32_t x = be32(d, 8), y = be32(d, 12), x0 = be32(d, 16), y0 = be32(d, 20);
  if (x0 >= x || y0 >= y) return corrupt(format, "image area is empty");
  const std::uint32_t components = be16(d, 40);
  if (components < 1 || components > 4) {
    return corrupt(format, std::to_string(components) + " components; expected 1 to 4");
  }
  return sized(format, x - x0, y - y0);
}

// A JP2 file: the codestream box (jp2c) among the top-level boxes; its SIZ is what OpenJPEG decodes.
ImageHeader jp2_header(Bytes d) {
  constexpr auto format = ImageFormat::jpeg2000;
  std::uint64_t at = 0;
  while (at < d.size()) {
    if (d.size() - at < 8) return truncated(format);
    std::uint64_t length = be32(d, at);
    std::uint64_t header = 8;
    if (length == 1) {
      if (d.size() - at < 16) return truncated(format);
      length = be64(d, at + 8);
      header = 16;
    } else if (length == 0) {
      length = d.size() - at;
    }
    if (length < header) return corrupt(format, "box shorter than its header");
    if (starts_with(d, "jp2c", at + 4)) return j2k_codestream_header(d.subspan(at + header));
    if (length > d.size() - at) return truncated(format);
    at += length;
  }
  return corrupt(format, "no codestream box");
}

bool is_space(std::uint8_t byte) {
  return std::isspace(byte) != 0;
}

}  // namespace

const char* format_name(ImageFormat format) {
  switch (format) {
    case ImageFormat::png:
      return "PNG";
    case ImageFormat::jpeg:
      return "JPEG";
    case ImageFormat::bmp:
      return "BMP";
    case ImageFormat::tiff:
      return "TIFF";
    case ImageFormat::webp:
      return "WebP";
    case ImageFormat::pnm:
      return "PNM";
    case ImageFormat::sun_raster:
      return "Sun raster";
    case ImageFormat::jpeg2000:
      return "JPEG 2000";
    case ImageFormat::floating:
      return "floating-point image";
    case ImageFormat::unknown:
      break;
  }
  return "image";
}

ImageFormat sniff_format(std::span<const std::uint8_t> d) {
  static constexpr std::string_view kPng("\x89PNG\r\n\x1a\n", 8);
  static constexpr std::string_view kJp2("\x00\x00\x00\x0cjP  \r\n\x87\n", 12);
  if (starts_with(d, kPng)) return ImageFormat::png;
  if (starts_with(d, "\xff\xd8\xff")) return ImageFormat::jpeg;
  if (starts_with(d, "BM")) return ImageFormat::bmp;
  if (starts_with(d, "II") || starts_with(d, "MM")) {
    if (d.size() >= 4) {
      const std::uint32_t version = d[0] == 'I' ? le16(d, 2) : be16(d, 2);
      if (version == 42 || version == 43) return ImageFormat::tiff;
    }
  }
  if (starts_with(d, "RIFF") && starts_with(d, "WEBP", 8)) return ImageFormat::webp;
  if (d.size() >= 3 && d[0] == 'P' && d[1] >= '1' && d[1] <= '7' && is_space(d[2])) return ImageFormat::pnm;
  if (starts_with(d, "\x59\xa6\x6a\x95")) return ImageFormat::sun_raster;
  if (starts_with(d, kJp2) || starts_with(d, "\xff\x4f\xff\x51")) return ImageFormat::jpeg2000;
  if (starts_with(d, "#?") || starts_with(d, "\x76\x2f\x31\x01") ||
      (d.size() >= 3 && d[0] == 'P' && (d[1] == 'F' || d[1] == 'f') && is_space(d[2]))) {
    return ImageFormat::floating;
  }
  return ImageFormat::unknown;
}

ImageHeader read_image_header(std::span<const std::uint8_t> data) {
  const ImageFormat format = sniff_format(data);
  switch (format) {
    case ImageFormat::png:
      return png_header(data);
    case ImageFormat::jpeg:
      return jpeg_header(data);
    case ImageFormat::bmp:
      return bmp_header(data);
    case ImageFormat::tiff:
      return tiff_header(data);
    case ImageFormat::webp:
      return webp_header(data);
    case ImageFormat::pnm:
      return data[1] == '7' ? pam_header(data) : pnm_header(data);
    case ImageFormat::sun_raster:
      return sun_raster_header(data);
    case ImageFormat::jpeg2000:
      return data[0] == 0xff ? j2k_codestream_header(data) : jp2_header(data);
    case ImageFormat::floating:
      return failed(format, "unsupported pixel depth (floating-point image; expected 8- or 16-bit integers)");
    case ImageFormat::unknown:
      break;
  }
  return failed(format, "not an image (unrecognised file contents)");
}

std::string check_pixel_budget(ImageFormat format, std::uint64_t width, std::uint64_t height,
                               std::int64_t max_image_pixels) {
  const auto budget = static_cast<std::uint64_t>(std::max<std::int64_t>(max_image_pixels, 0));
  // width * height would overflow only far above any budget; the division form cannot overflow.
  if (width != 0 && height > budget / width) {
    return std::string(format_name(format)) + " claims " + std::to_string(width) + "x" + std::to_string(height) +
           ", over max_image_pixels=" + std::to_string(max_image_pixels);
  }
  // OpenCV refuses a side over 2^20 pixels or 2^30 pixels in all (CV_IO_MAX_IMAGE_WIDTH/HEIGHT/PIXELS)
  // only after it has copied the bytes to a temporary file for the decoders that read files (Sun
  // raster among them), and its exception then leaves that file behind in /tmp: one per hostile
  // request in a server. kiln refuses such sizes first, whatever max_image_pixels allows.
  constexpr std::uint64_t kMaxSide = std::uint64_t{1} << 20;
  constexpr std::uint64_t kMaxPixels = std::uint64_t{1} << 30;
  if (width > kMaxSide || height > kMaxSide || width * height > kMaxPixels) {  // both <= 2^20: no overflow
    return std::string(format_name(format)) + " claims " + std::to_string(width) + "x" + std::to_string(height) +
           ", over OpenCV's limits (1048576 pixels per side, 2^30 in all)";
  }
  return {};
}

}  // namespace kiln::detail
