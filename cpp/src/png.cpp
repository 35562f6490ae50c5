#include "kiln/detail/png.hpp"

#include <libdeflate.h>

#include <cstdlib>
#include <memory>

#include "kiln/detail/image_header.hpp"
#include "kiln/detail/utf8.hpp"

namespace kiln::detail {
namespace {

std::uint32_t read_u32(const std::uint8_t* p) {
  return (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) | p[3];
}

bool is_type(const std::uint8_t* type, const char* name) {
  return type[0] == name[0] && type[1] == name[1] && type[2] == name[2] && type[3] == name[3];
}

// Critical chunks have an upper-case first letter (PNG spec, 5.4).
bool is_critical(const std::uint8_t* type) {
  return (type[0] & 0x20) == 0;
}

struct DecompressorDeleter {
  void operator()(libdeflate_decompressor* decompressor) const { libdeflate_free_decompressor(decompressor); }
};

libdeflate_decompressor& thread_decompressor() {
  thread_local std::unique_ptr<libdeflate_decompressor, DecompressorDeleter> decompressor(
      libdeflate_alloc_decompressor());
  if (!decompressor) throw std::bad_alloc();
  return *decompressor;
}

int paeth(int a, int b, int c) {
  const int p = a + b - c;
  const int pa = std::abs(p - a);
  const int pb = std::abs(p - b);
  const int pc = std::abs(p - c);
  if (pa <= pb && pa <= pc) return a;
  return pb <= pc ? b : c;
}

// Reverses the per-row filters (PNG spec, 9) of `raw` (rows of 1 filter byte + `stride` bytes) into
// `out` (rows of `stride` bytes).
bool unfilter(const std::uint8_t* raw, std::uint8_t* out, int height, std::size_t stride, int bpp, std::string& error) {
  const std::uint8_t* previous = nullptr;
  for (int y = 0; y < height; ++y) {
    const std::uint8_t filter = raw[0];
    const std::uint8_t* in = raw + 1;
    std::uint8_t* row = out + y * stride;
    switch (filter) {
      case 0:
        std::copy(in, in + stride, row);
        break;
      case 1:
        for (std::size_t x = 0; x < stride; ++x) row[x] = in[x] + (x >= std::size_t(bpp) ? row[x - bpp] : 0);
        break;
      case 2:
        for (std::size_t x = 0; x < stride; ++x) row[x] = in[x] + (previous ? previous[x] : 0);
        break;
      case 3:
        for (std::size_t x = 0; x < stride; ++x) {
          const int left = x >= std::size_t(bpp) ? row[x - bpp] : 0;
          const int up = previous ? previous[x] : 0;
          row[x] = static_cast<std::uint8_t>(in[x] + ((left + up) >> 1));
        }
        break;
      case 4:
        for (std::size_t x = 0; x < stride; ++x) {
          const int left = x >= std::size_t(bpp) ? row[x - bpp] : 0;
          const int up = previous ? previous[x] : 0;
          const int up_left = (previous && x >= std::size_t(bpp)) ? previous[x - bpp] : 0;
          row[x] = static_cast<std::uint8_t>(in[x] + paeth(left, up, up_left));
        }
        break;
      default:
        error = "corrupt PNG (unknown row filter " + std::to_string(filter) + ")";
        return false;
    }
    previous = row;
    raw += stride + 1;
  }
  return true;
}

}  // namespace

void release_if_large(std::vector<std::uint8_t>& buffer) {
  if (buffer.capacity() > kKeptBufferBytes) std::vector<std::uint8_t>().swap(buffer);
}

PngStatus decode_png(std::span<const std::uint8_t> data, PngImage& image, std::string& error,
                     std::int64_t max_image_pixels) {
  constexpr std::size_t kSignature = 8;
  std::size_t offset = kSignature;
  bool have_header = false;
  int bit_depth = 0;
  int colour_type = 0;
  int interlace = 0;
  thread_local std::vector<std::uint8_t> compressed;
  thread_local std::vector<std::uint8_t> filtered;
  compressed.clear();
  // One large image must not keep its buffers alive in every thread that ever decoded one.
  struct Trim {
    ~Trim() {
      release_if_large(compressed);
      release_if_large(filtered);
    }
  } trim;
  bool ended = false;

  while (!ended) {
    if (offset + 12 > data.size()) {
      error = "truncated PNG (chunk runs past the end of the file)";
      return PngStatus::corrupt;
    }
    const std::uint32_t length = read_u32(&data[offset]);
    const std::uint8_t* type = &data[offset + 4];
    if (length > data.size() - offset - 12) {
      error = "truncated PNG (chunk runs past the end of the file)";
      return PngStatus::corrupt;
    }
    const std::uint8_t* body = type + 4;
    if (is_critical(type)) {
      const std::uint32_t stored = read_u32(body + length);
      if (libdeflate_crc32(0, type, length + 4) != stored) {
        error = "corrupt PNG (CRC mismatch in " +
                printable_utf8(std::string_view(reinterpret_cast<const char*>(type), 4)) + " chunk)";
        return PngStatus::corrupt;
      }
    }
    if (!have_header) {
      if (!is_type(type, "IHDR") || length != 13) {
        error = "corrupt PNG (missing IHDR header)";
        return PngStatus::corrupt;
      }
      const std::uint32_t width = read_u32(body);
      const std::uint32_t height = read_u32(body + 4);
      bit_depth = body[8];
      colour_type = body[9];
      interlace = body[12];
      // The PNG spec's limit is 2^31 - 1 either way; the budget is checked before anything is allocated.
      if (width == 0 || height == 0 || width > 0x7fffffffu || height > 0x7fffffffu) {
        error = "corrupt PNG (image size " + std::to_string(width) + "x" + std::to_string(height) + " out of range)";
        return PngStatus::corrupt;
      }
      if (error = check_pixel_budget(ImageFormat::png, width, height, max_image_pixels); !error.empty()) {
        return PngStatus::corrupt;
      }
      image.width = static_cast<int>(width);
      image.height = static_cast<int>(height);
      have_header = true;
    } else if (is_type(type, "IDAT")) {
      compressed.insert(compressed.end(), body, body + length);
    } else if (is_type(type, "IEND")) {
      ended = true;
    } else if (is_type(type, "tRNS") || is_type(type, "PLTE")) {
      return PngStatus::unsupported;  // OpenCV turns transparency keys into alpha; keep its behaviour
    }
    offset += std::size_t{length} + 12;
  }

  switch (colour_type) {
    case 0:
      image.channels = 1;
      break;
    case 2:
      image.channels = 3;
      break;
    case 4:
      image.channels = 2;
      break;
    case 6:
      image.channels = 4;
      break;
    default:
      return PngStatus::unsupported;
  }
  if (bit_depth != 8 || interlace != 0) return PngStatus::unsupported;

  const std::size_t stride = static_cast<std::size_t>(image.width) * image.channels;
  const std::size_t filtered_size = (stride + 1) * image.height;
  filtered.resize(filtered_size);
  std::size_t produced = 0;
  // Inflation stops at the size the header claims: a stream that would produce more is refused
  // without producing it (libdeflate writes nothing past filtered_size).
  const libdeflate_result result = libdeflate_zlib_decompress(
      &thread_decompressor(), compressed.data(), compressed.size(), filtered.data(), filtered_size, &produced);
  if (result != LIBDEFLATE_SUCCESS || produced != filtered_size) {
    switch (result) {
      case LIBDEFLATE_SUCCESS:
      case LIBDEFLATE_SHORT_OUTPUT:
        error = "corrupt PNG (image data is shorter than its header says)";
        break;
      case LIBDEFLATE_INSUFFICIENT_SPACE:
        error = "corrupt PNG (image data is longer than its header says)";
        break;
      default:
        error = "corrupt PNG (image data does not decompress)";
    }
    return PngStatus::corrupt;
  }
  image.pixels.resize(stride * image.height);
  if (!unfilter(filtered.data(), image.pixels.data(), image.height, stride, image.channels, error)) {
    return PngStatus::corrupt;
  }
  return PngStatus::decoded;
}

}  // namespace kiln::detail
