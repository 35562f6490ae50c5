#include "kiln/dataset.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <thread>

#include "kiln/error.hpp"
#include "test_helpers.hpp"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using testing::pattern;
using testing::TempDir;
using testing::write_bytes;
using testing::write_image;

// raw/{train,test}/{cat,dog}/NN.png with 28x28 grayscale images.
void write_clean_tree(const fs::path& raw, int per_class = 3) {
  int seed = 0;
  for (const char* split : {"train", "test"}) {
    for (const char* label : {"dog", "cat"}) {
      for (int i = 0; i < per_class; ++i) {
        write_image(raw / split / label / (std::to_string(i) + ".png"), pattern(28, 28, 1, seed++));
      }
    }
  }
}

PrepareOptions options(const fs::path& raw, const fs::path& out,
                       const std::function<void(PrepareOptions&)>& adjust = {}) {
  PrepareOptions result;
  result.raw_dir = raw;
  result.out_dir = out;
  if (adjust) adjust(result);
  return result;
}

std::vector<char> file_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

TEST(dataset, labels_follow_sorted_class_folders_and_pixels_survive) {
  TempDir dir;
  write_clean_tree(dir.path() / "raw");
  const Manifest manifest = prepare_dataset(options(dir.path() / "raw", dir.path() / "out"));
  EXPECT_EQ(manifest.classes, (std::vector<std::string>{"cat", "dog"}));
  EXPECT_EQ(manifest.image, (ImageSpec{1, 28, 28}));
  EXPECT_EQ(manifest.split("train").count, 6);
  EXPECT_EQ(manifest.split("train").class_counts.at("cat"), 3);

  const SplitData train = load_split(dir.path() / "out", "train");
  ASSERT_EQ(train.images.sizes(), (std::vector<std::int64_t>{6, 1, 28, 28}));
  EXPECT_EQ(train.labels[0].item<std::int64_t>(), 0);  // cat, the first sorted class
  EXPECT_EQ(train.labels[5].item<std::int64_t>(), 1);
  // train/cat/0.png was written with seed 3 (train/dog came first when writing).
  const cv::Mat expected = pattern(28, 28, 1, 3);
  EXPECT_EQ(0, std::memcmp(train.images[0].data_ptr<std::uint8_t>(), expected.data, 28 * 28));
}

TEST(dataset, normalisation_comes_from_the_train_split) {
  TempDir dir;
  write_image(dir.path() / "raw/train/a/0.png", cv::Mat(2, 2, CV_8UC1, cv::Scalar(0)));
  write_image(dir.path() / "raw/train/a/1.png", cv::Mat(2, 2, CV_8UC1, cv::Scalar(255)));
  write_image(dir.path() / "raw/test/a/0.png", cv::Mat(2, 2, CV_8UC1, cv::Scalar(255)));
  const Manifest manifest = prepare_dataset(options(dir.path() / "raw", dir.path() / "out"));
  ASSERT_EQ(manifest.mean.size(), 1u);
  EXPECT_DOUBLE_EQ(manifest.mean[0], 0.5);
  EXPECT_DOUBLE_EQ(manifest.std[0], 0.5);
  EXPECT_EQ(manifest.normalization_split, "train");
}

TEST(dataset, bad_files_are_skipped_listed_and_the_rest_kept) {
  TempDir dir;
  const fs::path raw = dir.path() / "raw";
  write_clean_tree(raw);
  write_bytes(raw / "train/cat/empty.png", {});
  write_bytes(raw / "train/cat/text.png", {'h', 'e', 'l', 'l', 'o'});
  auto truncated = testing::encode(pattern(28, 28, 1, 50));
  truncated.resize(truncated.size() / 2);
  write_bytes(raw / "train/dog/truncated.png", truncated);
  fs::create_symlink(raw / "does-not-exist.png", raw / "train/dog/broken-link.png");
  write_image(raw / "train/dog/big.png", pattern(56, 56, 1, 51));
  write_image(raw / "train/dog/colour.png", pattern(28, 28, 3, 52));
  write_image(raw / "train/dog/ünïcödé-名前.png", pattern(28, 28, 1, 53));
  write_bytes(raw / "train/dog/notes.txt", {'x'});

  const Manifest manifest = prepare_dataset(options(raw, dir.path() / "out"));
  std::map<std::string, std::string> skipped;
  for (const auto& note : manifest.skipped) skipped[note.path] = note.reason;
  EXPECT_EQ(skipped.size(), 5u);
  EXPECT_EQ(skipped.at("train/cat/empty.png"), "empty file (0 bytes)");
  EXPECT_EQ(skipped.at("train/cat/text.png"), "not an image (unrecognised file contents)");
  EXPECT_NE(skipped.at("train/dog/truncated.png").find("truncated PNG"), std::string::npos);
  EXPECT_NE(skipped.at("train/dog/broken-link.png").find("cannot open file"), std::string::npos);
  EXPECT_NE(skipped.at("train/dog/notes.txt").find("unsupported file type"), std::string::npos);
  EXPECT_EQ(manifest.converted.size(), 2u);
  EXPECT_EQ(manifest.split("train").count, 6 + 3);  // clean + resized + converted + non-ASCII name

  const Manifest reread = read_manifest(dir.path() / "out");
  EXPECT_EQ(reread.skipped, manifest.skipped);
  EXPECT_EQ(reread.converted, manifest.converted);
  EXPECT_EQ(load_split(dir.path() / "out", "train").images.size(0), 9);
}

TEST(dataset, class_folder_without_usable_images_gives_a_warning) {
  TempDir dir;
  write_clean_tree(dir.path() / "raw");
  write_bytes(dir.path() / "raw/train/zebra/broken.png", {'n', 'o'});
  const Manifest manifest = prepare_dataset(options(dir.path() / "raw", dir.path() / "out"));
  ASSERT_FALSE(manifest.warnings.empty());
  EXPECT_NE(
      std::find(manifest.warnings.begin(), manifest.warnings.end(), "class folder 'train/zebra' has no usable images"),
      manifest.warnings.end());
}

TEST(dataset, missing_raw_dir_names_the_path) {
  TempDir dir;
  try {
    prepare_dataset(options(dir.path() / "nope", dir.path() / "out"));
    FAIL() << "expected NotFoundError";
  } catch (const NotFoundError& error) {
    EXPECT_NE(std::string(error.what()).find((dir.path() / "nope").string()), std::string::npos);
  }
  EXPECT_FALSE(fs::exists(dir.path() / "out"));
}

TEST(dataset, raw_dir_without_images_is_an_error) {
  TempDir dir;
  fs::create_directories(dir.path() / "raw/train/cat");
  EXPECT_THROW(prepare_dataset(options(dir.path() / "raw", dir.path() / "out")), DataError);
  write_bytes(dir.path() / "raw/train/cat/a.png", {'x'});
  EXPECT_THROW(prepare_dataset(options(dir.path() / "raw", dir.path() / "out")), DataError);  // nothing usable
  EXPECT_FALSE(fs::exists(dir.path() / "out"));
}

TEST(dataset, same_input_gives_byte_identical_output) {
  TempDir dir;
  write_clean_tree(dir.path() / "raw", 40);
  prepare_dataset(options(dir.path() / "raw", dir.path() / "a", [](PrepareOptions& o) { o.num_workers = 1; }));
  prepare_dataset(options(dir.path() / "raw", dir.path() / "b", [](PrepareOptions& o) { o.num_workers = 4; }));
  for (const char* file : {"train-00000.pt", "test-00000.pt", "manifest.json"}) {
    EXPECT_EQ(file_bytes(dir.path() / "a" / file), file_bytes(dir.path() / "b" / file)) << file;
  }
  const Manifest a = read_manifest(dir.path() / "a");
  const Manifest b = read_manifest(dir.path() / "b");
  EXPECT_EQ(a.mean, b.mean);
  EXPECT_EQ(a.std, b.std);
}

TEST(dataset, several_raw_dirs_combine_into_one_dataset_with_classes_merged) {
  TempDir dir;
  const fs::path first = dir.path() / "set1";
  const fs::path second = dir.path() / "set2";
  write_image(first / "train/cat/0.png", pattern(28, 28, 1, 1));
  write_image(first / "train/dog/0.png", pattern(28, 28, 1, 2));
  write_image(first / "test/cat/0.png", pattern(28, 28, 1, 3));
  write_image(second / "train/cat/0.png", pattern(28, 28, 1, 4));  // same relative name as in set1
  write_image(second / "train/bird/0.png", pattern(28, 28, 1, 5));
  write_bytes(first / "train/cat/bad.png", {'x'});
  write_bytes(second / "train/cat/bad.png", {'x'});

  const Manifest manifest =
      prepare_dataset(options({}, dir.path() / "out", [&](PrepareOptions& o) { o.raw_dirs = {first, second}; }));
  EXPECT_EQ(manifest.classes, (std::vector<std::string>{"bird", "cat", "dog"}));
  EXPECT_EQ(manifest.split("train").count, 4);
  EXPECT_EQ(manifest.split("train").class_counts.at("cat"), 2);  // both 0.png, neither lost to the clash
  EXPECT_EQ(manifest.split("test").count, 1);
  EXPECT_EQ(manifest.source_dir, fs::canonical(first).string() + ":" + fs::canonical(second).string());
  // Listed by absolute path: the same <split>/<class>/<name> in two trees stays two entries.
  ASSERT_EQ(manifest.skipped.size(), 2u);
  EXPECT_EQ(manifest.skipped[0].path, (fs::canonical(first) / "train/cat/bad.png").string());
  EXPECT_EQ(manifest.skipped[1].path, (fs::canonical(second) / "train/cat/bad.png").string());

  // Rows: class by class, each class's trees in the given order.
  const SplitData train = load_split(dir.path() / "out", "train");
  const std::vector<std::pair<int, std::int64_t>> rows = {{5, 0}, {1, 1}, {4, 1}, {2, 2}};  // seed, label
  ASSERT_EQ(train.images.size(0), 4);
  for (std::size_t row = 0; row < rows.size(); ++row) {
    const cv::Mat expected = pattern(28, 28, 1, rows[row].first);
    EXPECT_EQ(0, std::memcmp(train.images[row].data_ptr<std::uint8_t>(), expected.data, 28 * 28)) << row;
    EXPECT_EQ(train.labels[row].item<std::int64_t>(), rows[row].second) << row;
  }
}

TEST(dataset, one_raw_dir_in_a_list_gives_the_single_dir_output_byte_for_byte) {
  TempDir dir;
  write_clean_tree(dir.path() / "raw");
  write_bytes(dir.path() / "raw/train/cat/bad.png", {'x'});
  prepare_dataset(options(dir.path() / "raw", dir.path() / "single"));
  prepare_dataset(options({}, dir.path() / "list", [&](PrepareOptions& o) { o.raw_dirs = {dir.path() / "raw"}; }));
  for (const char* file : {"train-00000.pt", "test-00000.pt", "manifest.json"}) {
    EXPECT_EQ(file_bytes(dir.path() / "single" / file), file_bytes(dir.path() / "list" / file)) << file;
  }
  EXPECT_EQ(read_manifest(dir.path() / "list").skipped[0].path, "train/cat/bad.png");
}

TEST(dataset, several_raw_dirs_refuse_a_missing_or_repeated_dir) {
  TempDir dir;
  write_clean_tree(dir.path() / "raw");
  auto with_dirs = [&](std::vector<fs::path> dirs) {
    return options({}, dir.path() / "out", [&](PrepareOptions& o) { o.raw_dirs = dirs; });
  };
  try {
    prepare_dataset(with_dirs({dir.path() / "raw", dir.path() / "nope"}));
    FAIL() << "expected NotFoundError";
  } catch (const NotFoundError& error) {
    EXPECT_NE(std::string(error.what()).find((dir.path() / "nope").string()), std::string::npos);
  }
  try {
    prepare_dataset(with_dirs({dir.path() / "raw", dir.path() / "raw/../raw"}));
    FAIL() << "expected DataError";
  } catch (const DataError& error) {
    EXPECT_NE(std::string(error.what()).find("is given twice"), std::string::npos);
  }
  EXPECT_FALSE(fs::exists(dir.path() / "out"));
}

TEST(dataset, options_set_size_and_channels) {
  TempDir dir;
  write_clean_tree(dir.path() / "raw");
  const Manifest manifest = prepare_dataset(options(dir.path() / "raw", dir.path() / "out", [](PrepareOptions& o) {
    o.image_size = std::pair{14, 20};
    o.channels = 3;
  }));
  EXPECT_EQ(manifest.image, (ImageSpec{3, 14, 20}));
  EXPECT_EQ(load_split(dir.path() / "out", "test").images.sizes(), (std::vector<std::int64_t>{6, 3, 14, 20}));
  EXPECT_THROW(
      prepare_dataset(options(dir.path() / "raw", dir.path() / "x", [](PrepareOptions& o) { o.channels = 2; })),
      DataError);
}

TEST(dataset, rerun_replaces_previous_dataset_whole) {
  TempDir dir;
  write_clean_tree(dir.path() / "raw");
  prepare_dataset(options(dir.path() / "raw", dir.path() / "out"));
  detail::remove_tree(dir.path() / "raw/test");
  const Manifest manifest = prepare_dataset(options(dir.path() / "raw", dir.path() / "out"));
  EXPECT_EQ(manifest.splits.size(), 1u);
  EXPECT_FALSE(fs::exists(dir.path() / "out/test-00000.pt"));
  for (const auto& entry : fs::directory_iterator(dir.path())) {
    EXPECT_EQ(entry.path().filename().string().find(".staging-"), std::string::npos) << entry.path();
  }
}

TEST(dataset, refuses_to_replace_a_dir_that_is_not_a_dataset) {
  TempDir dir;
  write_clean_tree(dir.path() / "raw");
  write_bytes(dir.path() / "out/precious.txt", {'x'});
  EXPECT_THROW(prepare_dataset(options(dir.path() / "raw", dir.path() / "out")), DataError);
  EXPECT_TRUE(fs::exists(dir.path() / "out/precious.txt"));
  EXPECT_THROW(prepare_dataset(options(dir.path() / "raw", dir.path() / "raw/processed")), DataError);
}

TEST(dataset, cancelled_run_leaves_previous_dataset_untouched) {
  TempDir dir;
  write_clean_tree(dir.path() / "raw", 200);
  prepare_dataset(options(dir.path() / "raw", dir.path() / "out"));
  const auto before = file_bytes(dir.path() / "out/train-00000.pt");
  write_image(dir.path() / "raw/train/cat/new.png", pattern(28, 28, 1, 99));
  const ProgressFn cancel = [](std::int64_t, std::int64_t) { return false; };
  EXPECT_THROW(prepare_dataset(options(dir.path() / "raw", dir.path() / "out"), cancel), Cancelled);
  EXPECT_EQ(file_bytes(dir.path() / "out/train-00000.pt"), before);
  EXPECT_EQ(read_manifest(dir.path() / "out").split("train").count, 400);
}

TEST(dataset, progress_reaches_the_total) {
  TempDir dir;
  write_clean_tree(dir.path() / "raw", 50);
  std::int64_t last_done = -1;
  std::int64_t last_total = -1;
  const auto caller = std::this_thread::get_id();
  const ProgressFn record = [&](std::int64_t done, std::int64_t total) {
    EXPECT_EQ(std::this_thread::get_id(), caller) << "progress must be reported on the calling thread";
    last_done = done;
    last_total = total;
    return true;
  };
  prepare_dataset(options(dir.path() / "raw", dir.path() / "out"), record);
  EXPECT_EQ(last_total, 200);
  EXPECT_EQ(last_done, 200);
}

TEST(dataset, truncated_split_file_is_refused_on_load) {
  TempDir dir;
  write_clean_tree(dir.path() / "raw");
  prepare_dataset(options(dir.path() / "raw", dir.path() / "out"));
  const fs::path shard = dir.path() / "out/train-00000.pt";
  fs::resize_file(shard, fs::file_size(shard) / 2);
  const std::string message = testing::error_message<DataError>([&] { load_split(dir.path() / "out", "train"); });
  EXPECT_NE(message.find("shard '" + shard.string() + "': has"), std::string::npos) << message;
  EXPECT_THROW(load_split(dir.path() / "out", "validation"), DataError);
}

}  // namespace
}  // namespace kiln
