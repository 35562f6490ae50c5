// A fast path for the PNGs image datasets are made of: 8-bit grayscale, RGB, gray+alpha or RGBA,
// not interlaced. libdeflate inflates the image data with no per-image set-up cost, which for small
// images (28x28 Fashion-MNIST) is most of libpng's time. Everything else goes to OpenCV.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "kiln/decode.hpp"

namespace kiln::detail {

enum class PngStatus {
  decoded,      // `pixels` holds height x width x channels bytes, RGB(A) order, rows packed
  unsupported,  // a valid PNG outside the fast path (palette, 16-bit, interlaced, tRNS, ...)
  corrupt,      // `error` says what is wrong
};

struct PngImage {
  int height = 0;
  int width = 0;
  int channels = 0;  // 1, 2 (gray+alpha), 3 or 4 (RGBA), as stored
  std::vector<std::uint8_t> pixels;
};

// Per-thread decode buffers larger than this are released after the image that grew them, so a
// worker's memory returns near its baseline after a large or hostile image (4 MiB: a 1024x1024 RGBA image).
inline constexpr std::size_t kKeptBufferBytes = std::size_t{4} << 20;
void release_if_large(std::vector<std::uint8_t>& buffer);

// `data` must start with the PNG signature. Chunk CRCs of critical chunks and the zlib checksum are
// verified, so corrupt files are reported rather than decoded to garbage. An image whose header
// claims more than `max_image_pixels` pixels is `corrupt` ("PNG claims WxH, over max_image_pixels=N")
// before anything is allocated for it, and image data is never inflated past the claimed size.
PngStatus decode_png(std::span<const std::uint8_t> data, PngImage& image, std::string& error,
                     std::int64_t max_image_pixels = kDefaultMaxImagePixels);

}  // namespace kiln::detail
