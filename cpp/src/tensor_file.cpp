#include "kiln/detail/tensor_file.hpp"

#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/csrc/jit/serialization/pickler.h>

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

c10::IValue load_ivalue(const std::filesystem::path& path) {
  std::vector<char> bytes;
  if (std::string error = read_file(path, bytes); !error.empty()) {
    throw_data_error("cannot read '" + path.string() + "': " + error);
  }
  try {
    return torch::jit::pickle_load(bytes);
  } catch (const std::exception& error) {
    throw_data_error("'" + path.string() + "' is not a readable tensor file: " + error.what());
  }
}

}  // namespace kiln::detail
