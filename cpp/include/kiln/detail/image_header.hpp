// What an encoded image claims about itself, read from its header before anything is decoded, so
// that an image claiming more pixels than the caller allows is refused before any memory is
// reserved for it. Every format kiln hands to a decoder is recognised here, by the same signature
// the decoder (kiln's PNG fast path or OpenCV's) recognises it by; anything else is refused unread.
#pragma once

#include <cstdint>
#include <span>
#include <string>

namespace kiln::detail {

enum class ImageFormat {
  png,
  jpeg,
  bmp,
  tiff,
  webp,
  pnm,  // PBM/PGM/PPM (P1-P6) and PAM (P7)
  sun_raster,
  jpeg2000,  // a JP2 file or a raw J2K codestream
  floating,  // Radiance HDR, PFM, OpenEXR: floating-point pixels, which kiln does not take
  unknown,
};

const char* format_name(ImageFormat format);

// The format `data` is in, from its first bytes alone.
ImageFormat sniff_format(std::span<const std::uint8_t> data);

struct ImageHeader {
  ImageFormat format = ImageFormat::unknown;
  // The size the image's decoder would allocate for (the largest one the header states, where a
  // format can state it twice). Valid when `error` is empty.
  std::uint64_t width = 0;
  std::uint64_t height = 0;
  // Why the header cannot be used: the file is not an image, is cut short, or states no size.
  std::string error;
};

// Reads the format and the claimed size of `data`. Never reads past `data`, never allocates more
// than the error text.
ImageHeader read_image_header(std::span<const std::uint8_t> data);

// Empty if width x height fits in `max_image_pixels` and in OpenCV's own limits (2^20 pixels per
// side, at most 2^30 in all), else the per-image error "<format> claims WxH, over ...".
std::string check_pixel_budget(ImageFormat format, std::uint64_t width, std::uint64_t height,
                               std::int64_t max_image_pixels);

}  // namespace kiln::detail
