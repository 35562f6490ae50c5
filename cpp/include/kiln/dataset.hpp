// The processed dataset: what `python src/process_data.py` writes and training reads.
//
// Layout of a processed dir (format version 2; kiln/manifest.hpp documents the files):
//   manifest.json        classes, image shape, storage, per-split counts and shards, normalisation,
//                        skipped/converted files
//   <split>-00000.pt ... the split's shards in sample order, each at most shard_bytes of samples, in
//                        torch.save's format (Python's torch.load(path, weights_only=True) reads them)
// Preparation holds a few shards in memory whatever the dataset's size, and the dir is committed
// atomically: it is built next to its destination and swapped in whole.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kiln/decode.hpp"
#include "kiln/manifest.hpp"
#include "kiln/progress.hpp"

namespace kiln {

struct PrepareOptions {
  // The raw tree <raw_dir>/<split>/<class>/<image>.
  std::filesystem::path raw_dir;
  // Several raw trees combined into one dataset, used instead of raw_dir when not empty: splits of the same
  // name are joined, classes merged by folder name. The manifest then lists files by absolute path, so the
  // same <split>/<class>/<name> in two trees stays two entries, and its source_dir holds the trees'
  // absolute paths joined by ':'.
  std::vector<std::filesystem::path> raw_dirs;
  std::filesystem::path out_dir;
  // (height, width) every image is brought to; default: the size of the first image.
  std::optional<std::pair<int, int>> image_size;
  // 1 or 3; default: the channel count of the first image.
  std::optional<int> channels;
  // Decoding threads; 0 means one per core.
  int num_workers = 0;
  // An image whose header claims more pixels (width x height) is skipped before it is decoded.
  std::int64_t max_image_pixels = kDefaultMaxImagePixels;
  // How the images are stored; nullopt (auto): decoded when every candidate image decoded takes at most
  // auto_decoded_max_bytes, else encoded.
  std::optional<Storage> storage;
  // Encoded storage: "png" (lossless) or "jpeg" (jpeg_quality, 1..100) re-encoded at the image shape, or
  // "original" (each raw file's bytes as they are).
  std::string encoding = "png";
  int jpeg_quality = 90;
  // The most sample bytes in one shard (at least one image's bytes); an encoded image larger than this
  // gets a shard of its own.
  std::int64_t shard_bytes = std::int64_t{256} << 20;
  std::int64_t auto_decoded_max_bytes = std::int64_t{4} << 30;
};

struct SplitData {
  at::Tensor images;  // uint8 [N, C, H, W]
  at::Tensor labels;  // int64 [N]
};

// Decodes the tree <raw_dir>/<split>/<class>/<image> (or the trees of raw_dirs) on all cores and commits
// the processed dataset to out_dir. Unusable files are skipped and listed in the manifest; a missing raw
// dir or one with no images throws. Same input and options give byte-identical output.
Manifest prepare_dataset(const PrepareOptions& options, const ProgressFn& progress = {});

// Loads one split whole into memory (uint8 [N, C, H, W] at the manifest's image shape), checking every
// shard against the manifest; encoded samples are decoded on all cores. A missing, incomplete or
// damaged shard, or a sample that does not decode, throws kiln::DataError naming the shard.
SplitData load_split(const std::filesystem::path& processed_dir, const std::string& split);

}  // namespace kiln
