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
  manifest.splits = {{"train", "train.pt", 9, 1234, {{"cat", 4}, {"dog", 5}}}, {"test", "test.pt", 2, 99, {{"cat", 2}}}};
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
  EXPECT_EQ(read.split("test").file, "test.pt");
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
  EXPECT_NE(message.find("upgrade kiln"), std::string::npos) << message;
}

}  // namespace
}  // namespace kiln
