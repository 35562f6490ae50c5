// Random access to a processed split on disk (kiln/manifest.hpp's shards), by sample index, with memory
// bounded by the split's labels and offsets (16 bytes per sample): each read is one pread of that
// sample's bytes from its shard. Training streams a split through this when it does not fit its memory
// budget; thread-safe, so the loader's worker threads share one reader.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "kiln/manifest.hpp"

namespace kiln {

class SplitReader {
 public:
  // Opens every shard of `split` and checks it against the manifest (size, record layout, counts,
  // labels in range, offsets increasing within the data). Throws kiln::DataError naming the shard file
  // and what is wrong, ending with "run process_data again".
  SplitReader(const std::filesystem::path& processed_dir, const Manifest& manifest, const std::string& split);
  ~SplitReader();
  SplitReader(const SplitReader&) = delete;
  SplitReader& operator=(const SplitReader&) = delete;

  std::int64_t size() const;
  Storage storage() const;
  const ImageSpec& image() const;
  // int64 [size()], every shard's labels in sample order.
  const at::Tensor& labels() const;
  // Bytes of sample `index` as stored: image().bytes() pixels (decoded) or the encoded image.
  std::int64_t sample_bytes(std::int64_t index) const;
  // Reads sample `index`'s stored bytes into `out` (sample_bytes(index) of them). Throws kiln::DataError
  // naming the shard and the sample when the read fails or comes up short.
  void read(std::int64_t index, std::uint8_t* out) const;
  // "shard '<path>' (sample k of n)": for error messages about sample `index`.
  std::string describe(std::int64_t index) const;
  // The stored bytes of every sample, on disk.
  std::int64_t stored_bytes() const;

 private:
  struct Shard;
  std::vector<std::unique_ptr<Shard>> shards_;
  std::vector<std::int64_t> first_index_;  // first sample index of each shard, plus size() at the end
  Storage storage_ = Storage::decoded;
  ImageSpec image_;
  at::Tensor labels_;
};

}  // namespace kiln
