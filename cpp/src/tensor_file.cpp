#include "kiln/detail/tensor_file.hpp"

#include <caffe2/serialize/inline_container.h>
#include <caffe2/serialize/in_memory_adapter.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/csrc/jit/serialization/pickler.h>

#include <algorithm>
#include <memory>
#include <string>
#include <string_view>

#include "kiln/detail/files.hpp"
#include "kiln/detail/utf8.hpp"
#include "kiln/error.hpp"

namespace kiln::detail {

std::int64_t save_ivalue(const std::filesystem::path& path, const c10::IValue& value) {
  std::vector<char> pickled;
  std::vector<at::Tensor> tensors;
  torch::jit::Pickler pickler(
      [&pickled](const char* data, std::size_t size) { pickled.insert(pickled.end(), data, data + size); },
      /*tensor_table=*/nullptr, /*type_renamer=*/nullptr, /*memoized_class_types=*/nullptr,
      [&tensors](const at::Tensor& tensor) {
        tensors.push_back(tensor);
        return std::to_string(tensors.size() - 1);
      },
      /*tag_aggregates=*/false);
  pickler.protocol();
  pickler.pushIValue(value);
  pickler.stop();

  AtomicFile file(path);
  caffe2::serialize::PyTorchStreamWriter writer([&file](const void* data, std::size_t size) {
    file.write(data, size);
    return size;
  });
  // Same record layout as torch.save: archive/data.pkl plus one archive/data/<id> record per storage.
  writer.writeRecord("data.pkl", pickled.data(), pickled.size());
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].device().is_cpu(), "save_ivalue expects CPU tensors, got one on ", tensors[i].device());
    const auto& storage = tensors[i].storage();
    writer.writeRecord("data/" + std::to_string(i), storage.data(), storage.nbytes());
  }
  writer.writeEndOfFile();
  file.commit();
  return file.bytes_written();
}

namespace {

// Why `bytes` cannot be a zip archive as torch.save writes it, or empty if it may be one.
std::string zip_problem(const std::vector<char>& bytes) {
  constexpr std::string_view kLocalHeader("PK\x03\x04", 4);
  constexpr std::string_view kEndOfCentralDirectory("PK\x05\x06", 4);
  const std::string_view data(bytes.data(), bytes.size());
  if (data.substr(0, kLocalHeader.size()) != kLocalHeader) {
    if (!data.empty() && static_cast<unsigned char>(data[0]) == 0x80) {
      return "not a zip archive but a bare pickle (torch.save's legacy format, which kiln does not read)";
    }
    static const char* hex = "0123456789abcdef";
    std::string start;
    for (std::size_t i = 0; i < std::min<std::size_t>(data.size(), 8); ++i) {
      const auto byte = static_cast<unsigned char>(data[i]);
      start += std::string(i ? " " : "") + hex[byte >> 4] + hex[byte & 15];
    }
    return "not a zip archive as torch.save writes (it starts with bytes " + start + ")";
  }
  // The end-of-central-directory record closes every zip: within its 22 bytes plus a comment of at
  // most 64 KiB from the end.
  constexpr std::size_t kRecordSize = 22;
  const std::size_t tail = std::min<std::size_t>(data.size(), kRecordSize + 65535);
  const auto found = data.substr(data.size() - tail).rfind(kEndOfCentralDirectory);
  if (found == std::string_view::npos) return "truncated (zip central directory missing)";
  const std::size_t record = data.size() - tail + found;
  if (record + kRecordSize > data.size()) return "truncated (zip central directory cut short)";
  const std::size_t comment = static_cast<unsigned char>(data[record + 20]) |
                              static_cast<std::size_t>(static_cast<unsigned char>(data[record + 21])) << 8;
  if (record + kRecordSize + comment > data.size()) return "truncated (zip central directory cut short)";
  // torch.save stores every record uncompressed: a compressed one could inflate to any size.
  const auto u16 = [&data](std::size_t at) {
    return static_cast<std::size_t>(static_cast<unsigned char>(data[at])) |
           static_cast<std::size_t>(static_cast<unsigned char>(data[at + 1])) << 8;
  };
  const auto u32 = [&u16](std::size_t at) { return u16(at) | u16(at + 2) << 16; };
  const std::size_t entries = u16(record + 10);
  std::size_t entry = u32(record + 16);
  if (entry == 0xFFFFFFFF) return {};  // zip64 (over 4 GiB): left to the zip reader
  constexpr std::string_view kCentralHeader("PK\x01\x02", 4);
  constexpr std::size_t kHeaderSize = 46;
  for (std::size_t i = 0; i < entries; ++i) {
    if (entry + kHeaderSize > record || data.substr(entry, 4) != kCentralHeader) {
      return "damaged (zip central directory entry " + std::to_string(i) + " is not where the directory says)";
    }
    const std::size_t name_size = u16(entry + 28);
    if (u16(entry + 10) != 0) {
      const auto name = data.substr(entry + kHeaderSize, std::min(name_size, record - entry - kHeaderSize));
      return "record '" + printable_utf8(name) + "' is compressed; torch.save stores records uncompressed";
    }
    entry += kHeaderSize + name_size + u16(entry + 30) + u16(entry + 32);
  }
  return {};
}

// Why the pickle `data` is not one the unpickler can read within its bytes, or empty: every length
// it claims (strings, bytes, ints) must fit in what follows, every memo slot must be the next one or
// an earlier one, and it must end with STOP. Checked before unpickling because LibTorch's unpickler
// allocates (and zero-fills) a claimed length before it finds the data missing.
std::string pickle_problem(std::string_view data) {
  std::size_t at = 0;
  std::uint64_t memo = 0;
  const auto little_endian = [&data](std::size_t from, int bytes) {
    std::uint64_t value = 0;
    for (int i = bytes - 1; i >= 0; --i) value = value << 8 | static_cast<unsigned char>(data[from + i]);
    return value;
  };
  while (at < data.size()) {
    const std::size_t opcode_at = at;
    const auto opcode = static_cast<unsigned char>(data[at++]);
    int fixed = 0;         // bytes of argument
    int length_bytes = 0;  // bytes of a length, followed by that many bytes
    int lines = 0;         // newline-terminated arguments
    switch (opcode) {
      case '.':
        return {};
      case '(': case '0': case '1': case '2': case 'N': case 0x88: case 0x89: case ']': case 'a': case 'e':
      case 'l': case ')': case 't': case 0x85: case 0x86: case 0x87: case '}': case 'd': case 's': case 'u':
      case 0x8f: case 0x90: case 0x91: case 'b': case 'R': case 'Q': case 0x81: case 0x92: case 0x93: case 'o':
      case 0x97: case 0x98:
        break;
      case 0x94:  // MEMOIZE
        ++memo;
        break;
      case 'K': case 'h': case 'q': case 0x82: case 0x80:
        fixed = 1;
        break;
      case 'M': case 0x83:
        fixed = 2;
        break;
      case 'J': case 'j': case 'r': case 0x84:
        fixed = 4;
        break;
      case 'G': case 0x95:
        fixed = 8;
        break;
      case 'U': case 0x8c: case 'C': case 0x8a:
        length_bytes = 1;
        break;
      case 'T': case 'X': case 'B': case 0x8b:
        length_bytes = 4;
        break;
      case 0x8d: case 0x8e: case 0x96:
        length_bytes = 8;
        break;
      case 'I': case 'L': case 'F': case 'S': case 'V': case 'P': case 'g': case 'p':
        lines = 1;
        break;
      case 'c': case 'i':
        lines = 2;
        break;
      default:
        return "unknown pickle opcode " + std::to_string(opcode) + " at byte " + std::to_string(opcode_at) +
               " of data.pkl";
    }
    const std::size_t left = data.size() - at;
    const auto cut = [&] { return "data.pkl is cut short at byte " + std::to_string(opcode_at); };
    if (static_cast<std::size_t>(fixed + length_bytes) > left) return cut();
    if (opcode == 'q' || opcode == 'r') {
      const std::uint64_t slot = little_endian(at, fixed);
      if (slot > memo) return "data.pkl stores memo slot " + std::to_string(slot) + " out of order";
      memo = std::max(memo, slot + 1);
    }
    at += fixed;
    if (length_bytes) {
      const std::uint64_t length = little_endian(at, length_bytes);
      at += length_bytes;
      if (length > data.size() - at) {
        return "data.pkl claims " + std::to_string(length) + " bytes at byte " + std::to_string(opcode_at) + ", " +
               std::to_string(data.size() - at) + " are left";
      }
      at += length;
    }
    for (int line = 0; line < lines; ++line) {
      const auto end = data.find('\n', at);
      if (end == std::string_view::npos) return cut();
      at = end + 1;
    }
  }
  return "data.pkl ends without STOP";
}

// The first line of a LibTorch error, without its C++ backtrace, "INTERNAL ASSERT FAILED at <file>"
// preamble or miniz's advice paragraph.
std::string one_line(const std::exception& error) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&error);
  std::string text = c10_error ? c10_error->msg() : error.what();
  text = text.substr(0, text.find('\n'));
  if (const auto advice = text.find(" This is an internal miniz error"); advice != std::string::npos) {
    text.resize(advice);
  }
  if (const auto bug = text.find("please report a bug to PyTorch. "); bug != std::string::npos) {
    text.erase(0, bug + std::string_view("please report a bug to PyTorch. ").size());
  }
  for (const std::string_view noise : {"  (Could this error message be improved?", " (Could this error message"}) {
    if (const auto at = text.find(noise); at != std::string::npos) text.resize(at);
  }
  if (text.rfind("[enforce fail at ", 0) == 0) {
    if (const auto end = text.find("] . "); end != std::string::npos) text.erase(0, end + 4);
  }
  if (text.find("failed finding central directory") != std::string::npos) {
    return "truncated or damaged (zip central directory not found)";
  }
  if (const auto located = text.find("failed locating file "); located != std::string::npos) {
    const auto name_end = text.find(": file not found", located);
    if (name_end != std::string::npos) {
      const auto start = located + std::string_view("failed locating file ").size();
      return "record '" + printable_utf8(text.substr(start, name_end - start)) + "' is missing from the zip archive";
    }
  }
  return printable_utf8(text);
}

}  // namespace

c10::IValue load_ivalue(const std::filesystem::path& path, std::string_view kind) {
  const std::string where = std::string(kind) + " '" + path.string() + "'";
  std::vector<char> bytes;
  if (std::string error = read_file(path, bytes); !error.empty()) throw_data_error(where + ": " + error);
  if (std::string problem = zip_problem(bytes); !problem.empty()) throw_data_error(where + ": " + problem);
  try {
    using caffe2::serialize::MemoryReadAdapter;
    caffe2::serialize::PyTorchStreamReader archive(std::make_unique<MemoryReadAdapter>(bytes.data(), bytes.size()));
    const auto [pickle, pickle_size] = archive.getRecord("data.pkl");
    const std::string problem =
        pickle_problem(std::string_view(static_cast<const char*>(pickle.get()), pickle_size));
    if (!problem.empty()) throw_data_error(where + " is damaged: " + problem);
    return torch::jit::pickle_load(bytes);
  } catch (const DataError&) {
    throw;
  } catch (const std::exception& error) {
    throw_data_error(where + " is damaged: " + one_line(error));
  }
}

}  // namespace kiln::detail
