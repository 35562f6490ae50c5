#include "kiln/manifest.hpp"

#include <gtest/gtest.h>

#include <string>

#include "kiln/error.hpp"
#include "test_helpers.hpp"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;
using testing::write_bytes;

Manifest sample_manifest() {
  Manifest manifest;
  manifest.kiln_version = "0.1.0";
  manifest.source_dir = "/data/raw";
  manifest.classes = {"cat", "dog"};
  manifest.image = {3, 20, 14};
  manifest.mean = {0.25, 0.5, 0.75};
  manifest.std = {0.1, 0.2, 0.3};
  manifest.normalization_split = "train";
  manifest.storage = Storage::encoded;
  manifest.encoding = "jpeg";
  manifest.splits = {
      {"train", "", 9, 1234, {{"cat", 4}, {"dog", 5}}, {{"train-00000.pt", 5, 700}, {"train-00001.pt", 4, 534}}},
      {"test", "", 2, 99, {{"cat", 2}}, {{"test-00000.pt", 2, 99}}}};
  manifest.skipped = {{"train/cat/empty.png", "empty file (0 bytes)"}};
  manifest.converted = {{"train/dog/big.png", "resized from 40x28 to 20x14"}};
  manifest.warnings = {"class folder 'test/dog' has no usable images"};
  return manifest;
}

TEST(manifest, reads_back_what_was_written) {
  TempDir dir;
  const Manifest written = sample_manifest();
  write_manifest(written, dir.path() / "manifest.json");
  const Manifest read = read_manifest(dir.path());
  EXPECT_EQ(read.format_version, Manifest::kFormatVersion);
  EXPECT_EQ(read.kiln_version, written.kiln_version);
  EXPECT_EQ(read.source_dir, written.source_dir);
  EXPECT_EQ(read.classes, written.classes);
  EXPECT_EQ(read.image, written.image);
  EXPECT_EQ(read.mean, written.mean);
  EXPECT_EQ(read.std, written.std);
  EXPECT_EQ(read.normalization_split, "train");
  EXPECT_EQ(read.split("train").count, 9);
  EXPECT_EQ(read.split("train").bytes, 1234);
  EXPECT_EQ(read.split("train").class_counts, written.split("train").class_counts);
  EXPECT_EQ(read.storage, Storage::encoded);
  EXPECT_EQ(read.encoding, "jpeg");
  EXPECT_EQ(read.split("train").shards, written.split("train").shards);
  EXPECT_EQ(read.split("test").shards, written.split("test").shards);
  EXPECT_EQ(read.skipped, written.skipped);
  EXPECT_EQ(read.converted, written.converted);
  EXPECT_EQ(read.warnings, written.warnings);
}

TEST(manifest, unknown_split_is_a_data_error_naming_the_known_ones) {
  const std::string message = testing::error_message<DataError>([] { sample_manifest().split("validation"); });
  EXPECT_NE(message.find("'validation' (it has: train, test)"), std::string::npos) << message;
}

TEST(manifest, missing_dir_or_file_is_not_found) {
  TempDir dir;
  EXPECT_THROW(read_manifest(dir.path() / "missing"), NotFoundError);
  EXPECT_THROW(read_manifest(dir.path()), NotFoundError);
}

TEST(manifest, other_json_and_newer_versions_are_refused) {
  TempDir dir;
  const std::string other = R"({"format": "something-else"})";
  write_bytes(dir.path() / "manifest.json", {other.begin(), other.end()});
  EXPECT_THROW(read_manifest(dir.path()), DataError);
  Manifest newer = sample_manifest();
  newer.format_version = Manifest::kFormatVersion + 1;
  write_manifest(newer, dir.path() / "manifest.json");
  const std::string message = testing::error_message<DataError>([&] { read_manifest(dir.path()); });
  EXPECT_NE(message.find("'" + (dir.path() / "manifest.json").string() + "' has format version 3"), std::string::npos)
      << message;
  EXPECT_NE(message.find("upgrade kiln"), std::string::npos) << message;
  Manifest older = sample_manifest();
  older.format_version = 0;
  write_manifest(older, dir.path() / "manifest.json");
  const std::string old_message = testing::error_message<DataError>([&] { read_manifest(dir.path()); });
  EXPECT_NE(old_message.find("has format version 0, which this kiln does not read (1 to 2); run process_data.py again"),
            std::string::npos)
      << old_message;
}

TEST(manifest, shards_that_do_not_add_up_to_the_split_are_refused) {
  TempDir dir;
  Manifest manifest = sample_manifest();
  manifest.splits[0].shards[1].count = 3;
  write_manifest(manifest, dir.path() / "manifest.json");
  const std::string message = testing::error_message<DataError>([&] { read_manifest(dir.path()); });
  EXPECT_NE(message.find("split 'train' has 9 samples in 1234 bytes, its shards add up to 8 in 1234"),
            std::string::npos)
      << message;
  manifest = sample_manifest();
  manifest.splits[1].shards[0].file = "../elsewhere.pt";
  write_manifest(manifest, dir.path() / "manifest.json");
  EXPECT_NE(
      testing::error_message<DataError>([&] { read_manifest(dir.path()); }).find("lists a shard '../elsewhere.pt'"),
      std::string::npos);
}

TEST(manifest, format_version_1_reads_each_split_file_as_one_decoded_shard) {
  TempDir dir;
  const std::string v1 = R"({"format": "kiln-processed-dataset", "format_version": 1, "kiln_version": "0.1.0",
    "source_dir": "/raw", "classes": ["a", "b"], "image_shape": [1, 28, 28],
    "normalization": {"mean": [0.3], "std": [0.4], "computed_on": "train"},
    "splits": {"train": {"file": "train.pt", "count": 5, "bytes": 4567, "class_counts": {"a": 2, "b": 3}}},
    "skipped_count": 0, "skipped": [], "converted_count": 0, "converted": [], "warnings": []})";
  write_bytes(dir.path() / "manifest.json", {v1.begin(), v1.end()});
  const Manifest manifest = read_manifest(dir.path());
  EXPECT_EQ(manifest.format_version, 1);
  EXPECT_EQ(manifest.storage, Storage::decoded);
  EXPECT_EQ(manifest.split("train").file, "train.pt");
  EXPECT_EQ(manifest.split("train").shards, (std::vector<ShardInfo>{{"train.pt", 5, 4567}}));
}

TEST(manifest, storage_names) {
  EXPECT_EQ(to_string(Storage::decoded), "decoded");
  EXPECT_EQ(to_string(Storage::encoded), "encoded");
}

}  // namespace
}  // namespace kiln
