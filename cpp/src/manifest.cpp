// manifest.json of a processed dataset: written by prepare_dataset, read by training and by tools.
#include "kiln/manifest.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <string_view>

#include "kiln/detail/files.hpp"
#include "kiln/error.hpp"

namespace kiln {
namespace fs = std::filesystem;
using nlohmann::ordered_json;

namespace {

constexpr const char* kFormatName = "kiln-processed-dataset";

ordered_json notes_to_json(const std::vector<FileNote>& notes) {
  ordered_json array = ordered_json::array();
  for (const auto& note : notes) array.push_back({{"path", note.path}, {"reason", note.reason}});
  return array;
}

std::vector<FileNote> notes_from_json(const ordered_json& array) {
  std::vector<FileNote> notes;
  for (const auto& item : array)
    notes.push_back({item.at("path").get<std::string>(), item.at("reason").get<std::string>()});
  return notes;
}

// Shard file names come from the manifest and are opened under the processed dir: only plain names
// inside it are taken, so an edited manifest cannot point kiln at other files.
bool is_plain_file_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\0') == std::string::npos;
}

constexpr std::array<std::string_view, 3> kEncodings = {"png", "jpeg", "original"};

}  // namespace

std::string to_string(Storage storage) {
  return storage == Storage::decoded ? "decoded" : "encoded";
}

const SplitInfo& Manifest::split(const std::string& name) const {
  for (const auto& info : splits) {
    if (info.name == name) return info;
  }
  std::string known;
  for (const auto& info : splits) known += (known.empty() ? "" : ", ") + info.name;
  throw_data_error("processed dataset has no split '" + name + "' (it has: " + known + ")");
}

void write_manifest(const Manifest& manifest, const fs::path& path) {
  ordered_json splits = ordered_json::object();
  for (const auto& split : manifest.splits) {
    if (manifest.format_version == 1) {
      splits[split.name] = {
          {"file", split.file}, {"count", split.count}, {"bytes", split.bytes}, {"class_counts", split.class_counts}};
      continue;
    }
    ordered_json shards = ordered_json::array();
    for (const auto& shard : split.shards) {
      shards.push_back({{"file", shard.file}, {"count", shard.count}, {"bytes", shard.bytes}});
    }
    splits[split.name] = {{"count", split.count},
                          {"bytes", split.bytes},
                          {"class_counts", split.class_counts},
                          {"shards", std::move(shards)}};
  }
  ordered_json json = {
      {"format", kFormatName},
      {"format_version", manifest.format_version},
      {"kiln_version", manifest.kiln_version},
      {"source_dir", manifest.source_dir},
      {"classes", manifest.classes},
      {"image_shape", {manifest.image.channels, manifest.image.height, manifest.image.width}},
  };
  if (manifest.format_version != 1) {
    json["storage"] = to_string(manifest.storage);
    if (manifest.storage == Storage::encoded) json["encoding"] = manifest.encoding;
  }
  json["normalization"] = {
      {"mean", manifest.mean}, {"std", manifest.std}, {"computed_on", manifest.normalization_split}};
  json["splits"] = std::move(splits);
  json["skipped_count"] = manifest.skipped.size();
  json["skipped"] = notes_to_json(manifest.skipped);
  json["converted_count"] = manifest.converted.size();
  json["converted"] = notes_to_json(manifest.converted);
  json["warnings"] = manifest.warnings;
  // File names need not be valid UTF-8; undecodable bytes become U+FFFD instead of failing the run.
  detail::write_file_atomic(path, json.dump(2, ' ', false, ordered_json::error_handler_t::replace) + "\n");
}

Manifest read_manifest(const fs::path& processed_dir) {
  const fs::path path = processed_dir / "manifest.json";
  if (!fs::exists(processed_dir)) {
    throw NotFoundError("processed data dir '" + processed_dir.string() + "' does not exist; run process_data first");
  }
  if (!fs::exists(path)) {
    throw NotFoundError("processed data dir '" + processed_dir.string() +
                        "' holds no manifest.json; it is not a complete kiln dataset. Run process_data first");
  }
  std::vector<char> text;
  if (std::string error = detail::read_file(path, text); !error.empty()) {
    throw_data_error("cannot read '" + path.string() + "': " + error);
  }
  Manifest manifest;
  try {
    const ordered_json json = ordered_json::parse(text.begin(), text.end());
    if (json.value("format", "") != kFormatName)
      throw_data_error("'" + path.string() + "' is not a kiln dataset manifest");
    manifest.format_version = json.at("format_version").get<int>();
    const std::string version = std::to_string(manifest.format_version);
    if (manifest.format_version > Manifest::kFormatVersion) {
      throw_data_error("'" + path.string() + "' has format version " + version + ", newer than this kiln reads (1 to " +
                       std::to_string(Manifest::kFormatVersion) +
                       "); upgrade kiln, or run process_data.py again with this one");
    }
    if (manifest.format_version < 1) {
      throw_data_error("'" + path.string() + "' has format version " + version +
                       ", which this kiln does not read (1 to " + std::to_string(Manifest::kFormatVersion) +
                       "); run process_data.py again");
    }
    manifest.kiln_version = json.at("kiln_version").get<std::string>();
    manifest.source_dir = json.at("source_dir").get<std::string>();
    manifest.classes = json.at("classes").get<std::vector<std::string>>();
    const auto shape = json.at("image_shape").get<std::vector<int>>();
    if (shape.size() != 3) throw_data_error("'" + path.string() + "': image_shape must be [channels, height, width]");
    manifest.image = {shape[0], shape[1], shape[2]};
    const auto& normalization = json.at("normalization");
    manifest.mean = normalization.at("mean").get<std::vector<double>>();
    manifest.std = normalization.at("std").get<std::vector<double>>();
    manifest.normalization_split = normalization.at("computed_on").get<std::string>();
    if (manifest.format_version >= 2) {
      const auto storage = json.at("storage").get<std::string>();
      if (storage != "decoded" && storage != "encoded") {
        throw_data_error("'" + path.string() + "': storage '" + storage +
                         "' is not one kiln knows (decoded, encoded); run process_data.py again");
      }
      manifest.storage = storage == "decoded" ? Storage::decoded : Storage::encoded;
      if (manifest.storage == Storage::encoded) {
        manifest.encoding = json.at("encoding").get<std::string>();
        if (std::find(kEncodings.begin(), kEncodings.end(), manifest.encoding) == kEncodings.end()) {
          throw_data_error("'" + path.string() + "': encoding '" + manifest.encoding +
                           "' is not one kiln knows (png, jpeg, original); run process_data.py again");
        }
      }
    }
    for (const auto& [name, split] : json.at("splits").items()) {
      SplitInfo info{name,
                     {},
                     split.at("count").get<std::int64_t>(),
                     split.at("bytes").get<std::int64_t>(),
                     split.at("class_counts").get<std::map<std::string, std::int64_t>>(),
                     {}};
      if (manifest.format_version == 1) {
        info.file = split.at("file").get<std::string>();
        info.shards.push_back({info.file, info.count, info.bytes});
      } else {
        for (const auto& shard : split.at("shards")) {
          info.shards.push_back({shard.at("file").get<std::string>(), shard.at("count").get<std::int64_t>(),
                                 shard.at("bytes").get<std::int64_t>()});
        }
      }
      std::int64_t count = 0;
      std::int64_t bytes = 0;
      for (const auto& shard : info.shards) {
        if (!is_plain_file_name(shard.file) || shard.count < 0 || shard.bytes < 0) {
          throw_data_error("'" + path.string() + "': split '" + name + "' lists a shard '" + shard.file +
                           "' that is not a file of the processed dir with a count and size; run process_data.py "
                           "again");
        }
        count += shard.count;
        bytes += shard.bytes;
      }
      if (count != info.count || bytes != info.bytes) {
        throw_data_error("'" + path.string() + "': split '" + name + "' has " + std::to_string(info.count) +
                         " samples in " + std::to_string(info.bytes) + " bytes, its shards add up to " +
                         std::to_string(count) + " in " + std::to_string(bytes) + "; run process_data.py again");
      }
      manifest.splits.push_back(std::move(info));
    }
    manifest.skipped = notes_from_json(json.at("skipped"));
    manifest.converted = notes_from_json(json.at("converted"));
    manifest.warnings = json.at("warnings").get<std::vector<std::string>>();
  } catch (const nlohmann::json::exception& error) {
    throw_data_error("'" + path.string() + "' is not a valid kiln manifest: " + error.what());
  }
  return manifest;
}

}  // namespace kiln
