// Image decoding shared by data preparation, batch inference and serving, so that every stage
// sees exactly the same pixels for the same file.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>

namespace kiln {

// The layout every image of a dataset is brought to: uint8, channels x height x width (CHW).
struct ImageSpec {
  int channels = 1;  // 1 (grayscale) or 3 (RGB)
  int height = 0;
  int width = 0;

  std::int64_t bytes() const { return std::int64_t{channels} * height * width; }
  bool operator==(const ImageSpec&) const = default;
};

std::string to_string(const ImageSpec& spec);

// The default pixel budget of an encoded image (Pillow's MAX_IMAGE_PIXELS): about 256 MiB as 8-bit RGB.
inline constexpr std::int64_t kDefaultMaxImagePixels = 89'478'485;

struct DecodeResult {
  bool ok = false;
  // Why the image could not be used (ok == false), e.g. "truncated PNG".
  std::string error;
  // What was done to fit the spec (ok == true), e.g. "resized from 32x32 to 28x28"; empty if nothing.
  std::string conversion;
};

// Reads the native layout of an encoded image (channels after kiln's rules: alpha dropped,
// 16-bit reduced to 8-bit). Returns nullopt with `error` filled if it cannot be decoded.
std::optional<ImageSpec> probe_image(std::span<const std::uint8_t> encoded, std::string* error = nullptr,
                                     std::int64_t max_image_pixels = kDefaultMaxImagePixels);

// Decodes PNG/JPEG/BMP/... bytes and writes them as `spec` (CHW, RGB order) into `out`, which must
// hold spec.bytes() bytes. Images of another size are resized (area filter when shrinking, linear
// when enlarging) and other channel counts converted; both are reported in `conversion`.
// Corrupt, truncated, empty or non-image input returns ok == false; `out` is then unspecified.
// The image's header is read first: one that claims more than `max_image_pixels` pixels (width x
// height) is refused before any pixel memory is allocated, with the error
// "<format> claims WxH, over max_image_pixels=N". Formats: PNG, JPEG, BMP, TIFF, WebP, PBM/PGM/PPM/PAM,
// Sun raster and JPEG 2000; anything else is "not an image". Every error is printable UTF-8.
DecodeResult decode_into(std::span<const std::uint8_t> encoded, const ImageSpec& spec, std::uint8_t* out,
                         std::int64_t max_image_pixels = kDefaultMaxImagePixels);

}  // namespace kiln
