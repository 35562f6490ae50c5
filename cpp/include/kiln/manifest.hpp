// manifest.json of a processed dataset (kiln/dataset.hpp): classes, image shape, per-split counts,
// normalisation, and the raw files that were skipped or converted and why.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "kiln/decode.hpp"

namespace kiln {

struct FileNote {
  std::string path;  // relative to the raw dir
  std::string reason;
  bool operator==(const FileNote&) const = default;
};

// How a processed dataset stores its images: `decoded`, uint8 pixels of the dataset's image shape (the
// fastest to train from), or `encoded`, each image's bytes (PNG/JPEG re-encoded at the image shape, or the
// raw file as it was), several times smaller and decoded by the loader's threads while training.
enum class Storage { decoded, encoded };
std::string to_string(Storage storage);

// One shard file of a split, in torch.save's zip format (torch.load(path, weights_only=True) reads it):
//   decoded: {"images": uint8 [count, C, H, W], "labels": int64 [count]}
//   encoded: {"data": uint8 [total bytes], "offsets": int64 [count + 1], "labels": int64 [count]}
//            (image i is data[offsets[i]:offsets[i + 1]])
struct ShardInfo {
  std::string file;  // relative to the processed dir
  std::int64_t count = 0;
  std::int64_t bytes = 0;  // size of `file`, checked when it is opened
  bool operator==(const ShardInfo&) const = default;
};

struct SplitInfo {
  std::string name;
  std::string file;  // format version 1 only: the split's one file (relative to the processed dir)
  std::int64_t count = 0;
  std::int64_t bytes = 0;  // total size of the split's files, checked when loading
  std::map<std::string, std::int64_t> class_counts;
  // Format version 2: the split's shards, in sample order (version 1's one file is read as one shard).
  std::vector<ShardInfo> shards;
};

struct Manifest {
  // 2: splits in shards, `storage`; 1: one <split>.pt per split, decoded (still read).
  static constexpr int kFormatVersion = 2;
  int format_version = kFormatVersion;
  Storage storage = Storage::decoded;
  // Encoded storage: "png", "jpeg" (re-encoded at the image shape) or "original" (the raw file's bytes,
  // any size; decoding brings them to the image shape).
  std::string encoding;
  std::string kiln_version;
  std::string source_dir;
  std::vector<std::string> classes;
  ImageSpec image;
  std::vector<double> mean;  // per channel, on the [0, 1] scale
  std::vector<double> std;
  std::string normalization_split;  // the split mean/std were computed on
  std::vector<SplitInfo> splits;
  std::vector<FileNote> skipped;
  std::vector<FileNote> converted;
  std::vector<std::string> warnings;

  const SplitInfo& split(const std::string& name) const;
};

// Reads <processed_dir>/manifest.json; throws kiln::NotFoundError when the dir or the file is missing
// and kiln::DataError naming the file when it is not a manifest this kiln reads.
Manifest read_manifest(const std::filesystem::path& processed_dir);
// Writes `manifest` as JSON to `path`, atomically.
void write_manifest(const Manifest& manifest, const std::filesystem::path& path);

}  // namespace kiln
