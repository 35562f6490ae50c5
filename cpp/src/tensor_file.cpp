#include "kiln/detail/tensor_file.hpp"

#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/csrc/jit/serialization/pickler.h>

#include <algorithm>
#include <string>
#include <string_view>

#include "kiln/detail/files.hpp"
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
  return {};
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
  if (text.find("failed finding central directory") != std::string::npos) {
    return "truncated or damaged (zip central directory not found)";
  }
  if (const auto located = text.find("failed locating file "); located != std::string::npos) {
    const auto name_end = text.find(": file not found", located);
    if (name_end != std::string::npos) {
      const auto start = located + std::string_view("failed locating file ").size();
      return "record '" + text.substr(start, name_end - start) + "' is missing from the zip archive";
    }
  }
  return text;
}

}  // namespace

c10::IValue load_ivalue(const std::filesystem::path& path, std::string_view kind) {
  const std::string where = std::string(kind) + " '" + path.string() + "'";
  std::vector<char> bytes;
  if (std::string error = read_file(path, bytes); !error.empty()) throw_data_error(where + ": " + error);
  if (std::string problem = zip_problem(bytes); !problem.empty()) throw_data_error(where + ": " + problem);
  try {
    return torch::jit::pickle_load(bytes);
  } catch (const std::exception& error) {
    throw_data_error(where + " is damaged: " + one_line(error));
  }
}

}  // namespace kiln::detail
