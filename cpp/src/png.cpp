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

// Samples per pixel of a valid colour type / bit depth pair (PNG spec, 11.2.2), else 0.
int channels_of(int colour_type, int bit_depth) {
  const bool eight_or_sixteen = bit_depth == 8 || bit_depth == 16;
  const bool up_to_eight = bit_depth == 1 || bit_depth == 2 || bit_depth == 4 || bit_depth == 8;
  switch (colour_type) {
    case 0:
      return up_to_eight || bit_depth == 16 ? 1 : 0;
    case 2:
      return eight_or_sixteen ? 3 : 0;
    case 3:
      return up_to_eight ? 1 : 0;
    case 4:
      return eight_or_sixteen ? 2 : 0;
    case 6:
      return eight_or_sixteen ? 4 : 0;
    default:
      return 0;
  }
}

// Bytes of the filtered image data: each row one filter byte and its packed pixels; an interlaced
// image is the rows of its seven Adam7 passes (PNG spec, 8.2).
std::size_t filtered_bytes(std::uint32_t width, std::uint32_t height, int bits_per_pixel, bool interlaced) {
  const auto rows = [&](std::uint64_t w, std::uint64_t h) -> std::size_t {
    return w == 0 || h == 0 ? 0 : h * ((w * bits_per_pixel + 7) / 8 + 1);
  };
  if (!interlaced) return rows(width, height);
  static constexpr int kPasses[7][4] = {{0, 0, 8, 8}, {4, 0, 8, 8}, {0, 4, 4, 8}, {2, 0, 4, 4},
                                        {0, 2, 2, 4}, {1, 0, 2, 2}, {0, 1, 1, 2}};
  std::size_t total = 0;
  for (const auto& [x0, y0, dx, dy] : kPasses) {
    const std::uint64_t w = width > std::uint32_t(x0) ? (width - x0 + dx - 1) / dx : 0;
    const std::uint64_t h = height > std::uint32_t(y0) ? (height - y0 + dy - 1) / dy : 0;
    total += rows(w, h);
  }
  return total;
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
  bool for_opencv = false;

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
      for_opencv = true;  // OpenCV turns transparency keys into alpha; keep its behaviour
    }
    offset += std::size_t{length} + 12;
  }

  const int channels = channels_of(colour_type, bit_depth);
  if (channels == 0 || interlace > 1) {
    error = "corrupt PNG (colour type " + std::to_string(colour_type) + ", bit depth " + std::to_string(bit_depth) +
            ", interlace " + std::to_string(interlace) + " is not a PNG layout)";
    return PngStatus::corrupt;
  }
  // Every PNG's image data is inflated here, also those OpenCV decodes after (libpng would inflate
  // any amount of excess data, 1 GB from a 1 MB file, before noticing): the output buffer holds
  // exactly the rows the header claims, and a stream that would produce more is refused unread.
  const std::size_t filtered_size =
      filtered_bytes(static_cast<std::uint32_t>(image.width), static_cast<std::uint32_t>(image.height),
                     channels * bit_depth, interlace == 1);
  filtered.resize(filtered_size);
  std::size_t produced = 0;
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
  if (for_opencv || colour_type == 3 || bit_depth != 8 || interlace != 0) return PngStatus::unsupported;

  image.channels = channels;
  const std::size_t stride = static_cast<std::size_t>(image.width) * image.channels;
  image.pixels.resize(stride * image.height);
  if (!unfilter(filtered.data(), image.pixels.data(), image.height, stride, image.channels, error)) {
    return PngStatus::corrupt;
  }
  return PngStatus::decoded;
}

}  // namespace kiln::detail
