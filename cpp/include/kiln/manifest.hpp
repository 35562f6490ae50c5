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

struct SplitInfo {
  std::string name;
  std::string file;  // relative to the processed dir
  std::int64_t count = 0;
  std::int64_t bytes = 0;  // size of `file`, checked when loading
  std::map<std::string, std::int64_t> class_counts;
};

struct Manifest {
  static constexpr int kFormatVersion = 1;
  int format_version = kFormatVersion;
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
