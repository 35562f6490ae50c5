// Tensor files in torch.save's zip format, written and read without Python: datasets and
// checkpoints that LibTorch and Python's torch.load(path, weights_only=True) both read.
#pragma once

#include <ATen/core/ivalue.h>

#include <filesystem>

namespace kiln::detail {

// Saves dicts, lists, tuples, strings, numbers and CPU tensors. Containers are pickled untagged
// (LibTorch's pickle_save tags them with a JIT helper that weights_only loading rejects). Written
// atomically; returns the file's size in bytes.
std::int64_t save_ivalue(const std::filesystem::path& path, const c10::IValue& value);

// Loads a file written by save_ivalue or torch.save; throws kiln::DataError naming the file if it
// cannot be read or parsed.
c10::IValue load_ivalue(const std::filesystem::path& path);

}  // namespace kiln::detail
