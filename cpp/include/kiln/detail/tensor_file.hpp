// Tensor files in torch.save's zip format, written and read without Python: datasets and
// checkpoints that LibTorch and Python's torch.load(path, weights_only=True) both read.
#pragma once

#include <ATen/core/ivalue.h>

#include <filesystem>
#include <string_view>

namespace kiln::detail {

// A list pickled as a plain Python list. Typed lists (c10::List<double>) are pickled through JIT
// helpers (torch.jit._pickle.build_doublelist) that weights_only loading rejects; use this instead.
template <typename T>
c10::impl::GenericList plain_list(const std::vector<T>& values) {
  c10::impl::GenericList list(c10::AnyType::get());
  for (const auto& value : values) list.push_back(value);
  return list;
}

// Saves dicts, lists, tuples, strings, numbers and CPU tensors. Containers are pickled untagged
// (LibTorch's pickle_save tags them with a JIT helper that weights_only loading rejects). Written
// atomically; returns the file's size in bytes.
std::int64_t save_ivalue(const std::filesystem::path& path, const c10::IValue& value);

// Loads a file written by save_ivalue or torch.save; throws kiln::DataError, in one line, naming the
// file as "<kind> '<path>'" and what is wrong with it (empty, not a zip archive, truncated, a
// missing record) if it cannot be read or parsed.
c10::IValue load_ivalue(const std::filesystem::path& path, std::string_view kind = "tensor file");

}  // namespace kiln::detail
