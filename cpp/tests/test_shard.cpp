#include "kiln/shard.hpp"

#include <ATen/ops/arange.h>
#include <ATen/ops/zeros.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <fstream>

#include "fixtures.hpp"
#include "kiln/dataset.hpp"
#include "kiln/detail/tensor_file.hpp"
#include "kiln/error.hpp"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using testing::error_message;
using testing::pattern;
using testing::TempDir;
using testing::write_image;

constexpr std::int64_t kImageBytes = 3 * 16 * 12;

// raw/train/{a,b}/NN.png: `per_class` 16x12 RGB images per class, and 2 per class in test.
fs::path write_tree(const fs::path& root, int per_class) {
  for (const char* label : {"a", "b"}) {
    for (int i = 0; i < per_class; ++i) {
      write_image(root / "raw/train" / label / (std::to_string(100 + i) + ".png"),
                  pattern(16, 12, 3, i + (label[0] == 'b' ? 50 : 0)));
    }
    for (int i = 0; i < 2; ++i)
      write_image(root / "raw/test" / label / (std::to_string(i) + ".png"), pattern(16, 12, 3, i));
  }
  return root / "raw";
}

Manifest prepare(const fs::path& raw, const fs::path& out, std::optional<Storage> storage, std::string encoding,
                 std::int64_t shard_bytes, int num_workers = 0) {
  PrepareOptions options;
  options.raw_dir = raw;
  options.out_dir = out;
  options.storage = storage;
  options.encoding = std::move(encoding);
  options.shard_bytes = shard_bytes;
  options.num_workers = num_workers;
  return prepare_dataset(options);
}

std::vector<char> file_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::vector<std::uint8_t> sample(const SplitReader& reader, std::int64_t index) {
  std::vector<std::uint8_t> bytes(static_cast<std::size_t>(reader.sample_bytes(index)));
  reader.read(index, bytes.data());
  return bytes;
}

// Saves `content` as shard `file` of the train split and makes the manifest agree with its size, so only
// what is inside the shard is wrong.
void replace_shard(const fs::path& processed, const std::string& file,
                   const c10::Dict<std::string, at::Tensor>& content) {
  const std::int64_t bytes = detail::save_ivalue(processed / file, c10::IValue(content));
  Manifest manifest = read_manifest(processed);
  for (auto& split : manifest.splits) {
    split.bytes = 0;
    for (auto& shard : split.shards) {
      if (shard.file == file) shard.bytes = bytes;
      split.bytes += shard.bytes;
    }
  }
  write_manifest(manifest, processed / "manifest.json");
}

TEST(shard, decoded_split_is_cut_into_shards_of_whole_images_in_sample_order) {
  TempDir dir;
  const fs::path raw = write_tree(dir.path(), 10);
  const Manifest manifest = prepare(raw, dir.path() / "out", Storage::decoded, "png", kImageBytes * 6 + 5);
  EXPECT_EQ(manifest.storage, Storage::decoded);
  const SplitInfo& train = manifest.split("train");
  ASSERT_EQ(train.shards.size(), 4u);
  std::int64_t bytes = 0;
  for (std::size_t s = 0; s < 4; ++s) {
    EXPECT_EQ(train.shards[s].file, "train-0000" + std::to_string(s) + ".pt");
    EXPECT_EQ(train.shards[s].count, s < 3 ? 6 : 2);
    EXPECT_EQ(train.shards[s].bytes,
              static_cast<std::int64_t>(fs::file_size(dir.path() / "out" / train.shards[s].file)));
    bytes += train.shards[s].bytes;
  }
  EXPECT_EQ(train.bytes, bytes);
  EXPECT_EQ(manifest.split("test").shards.size(), 1u);
  EXPECT_EQ(read_manifest(dir.path() / "out").split("train").shards, train.shards);

  const SplitReader reader(dir.path() / "out", manifest, "train");
  ASSERT_EQ(reader.size(), 20);
  EXPECT_EQ(reader.stored_bytes(), 20 * kImageBytes);
  const SplitData loaded = load_split(dir.path() / "out", "train");
  EXPECT_TRUE(loaded.labels.equal(reader.labels()));
  for (std::int64_t i = 0; i < 20; ++i) {
    // Class b's image 100 + k was written with seed k + 50; its RGB pixels are stored CHW.
    const cv::Mat expected = pattern(16, 12, 3, static_cast<int>(i % 10) + (i >= 10 ? 50 : 0));
    const auto bytes_read = sample(reader, i);
    ASSERT_EQ(bytes_read.size(), static_cast<std::size_t>(kImageBytes));
    EXPECT_EQ(0, std::memcmp(bytes_read.data(), loaded.images[i].data_ptr<std::uint8_t>(), kImageBytes)) << i;
    EXPECT_EQ(bytes_read[0], expected.at<cv::Vec3b>(0, 0)[2]) << i;  // R, first in CHW; OpenCV's last
    EXPECT_EQ(reader.labels()[i].item<std::int64_t>(), i >= 10 ? 1 : 0);
  }
  EXPECT_EQ(reader.describe(13), "shard '" + (dir.path() / "out/train-00002.pt").string() + "' (sample 1 of 6)");
}

TEST(shard, a_shard_is_the_dict_of_tensors_the_manifest_documents) {
  TempDir dir;
  const fs::path raw = write_tree(dir.path(), 3);
  prepare(raw, dir.path() / "decoded", Storage::decoded, "png", 1 << 20);
  const auto decoded = detail::load_ivalue(dir.path() / "decoded/train-00000.pt").toGenericDict();
  EXPECT_EQ(decoded.at("images").toTensor().sizes(), (std::vector<std::int64_t>{6, 3, 16, 12}));
  EXPECT_EQ(decoded.at("labels").toTensor().scalar_type(), at::kLong);

  prepare(raw, dir.path() / "encoded", Storage::encoded, "png", 1 << 20);
  const auto encoded = detail::load_ivalue(dir.path() / "encoded/train-00000.pt").toGenericDict();
  const at::Tensor data = encoded.at("data").toTensor();
  const at::Tensor offsets = encoded.at("offsets").toTensor();
  ASSERT_EQ(offsets.size(0), 7);
  EXPECT_EQ(offsets[0].item<std::int64_t>(), 0);
  EXPECT_EQ(offsets[6].item<std::int64_t>(), data.size(0));
  // Image i is data[offsets[i]:offsets[i + 1]], a PNG.
  const std::int64_t second = offsets[1].item<std::int64_t>();
  EXPECT_EQ(std::memcmp(data.data_ptr<std::uint8_t>() + second, "\x89PNG", 4), 0);
}

TEST(shard, encoded_shards_are_cut_before_a_sample_would_pass_the_shard_size) {
  TempDir dir;
  const fs::path raw = write_tree(dir.path(), 30);
  const std::int64_t shard_bytes = 2000;
  const Manifest manifest = prepare(raw, dir.path() / "out", Storage::encoded, "png", shard_bytes);
  EXPECT_EQ(manifest.encoding, "png");
  const SplitInfo& train = manifest.split("train");
  ASSERT_GT(train.shards.size(), 2u);
  const SplitReader reader(dir.path() / "out", manifest, "train");
  std::int64_t index = 0;
  for (const auto& shard : train.shards) {
    std::int64_t stored = 0;
    for (std::int64_t k = 0; k < shard.count; ++k) stored += reader.sample_bytes(index++);
    EXPECT_LE(stored, shard_bytes) << shard.file;
    if (index < reader.size()) EXPECT_GT(stored + reader.sample_bytes(index), shard_bytes) << shard.file;
  }
  EXPECT_EQ(index, 60);
}

TEST(shard, png_storage_gives_the_decoded_pixels_exactly) {
  TempDir dir;
  const fs::path raw = write_tree(dir.path(), 5);
  prepare(raw, dir.path() / "decoded", Storage::decoded, "png", 1 << 20);
  prepare(raw, dir.path() / "png", Storage::encoded, "png", 1500);
  const SplitData decoded = load_split(dir.path() / "decoded", "train");
  const SplitData png = load_split(dir.path() / "png", "train");
  EXPECT_TRUE(png.images.equal(decoded.images));
  EXPECT_TRUE(png.labels.equal(decoded.labels));
  // Through the reader too: each sample decodes to the same pixels.
  const Manifest manifest = read_manifest(dir.path() / "png");
  const SplitReader reader(dir.path() / "png", manifest, "train");
  EXPECT_EQ(reader.storage(), Storage::encoded);
  std::vector<std::uint8_t> pixels(kImageBytes);
  for (std::int64_t i = 0; i < reader.size(); ++i) {
    ASSERT_TRUE(decode_into(sample(reader, i), manifest.image, pixels.data()).ok);
    EXPECT_EQ(0, std::memcmp(pixels.data(), decoded.images[i].data_ptr<std::uint8_t>(), kImageBytes)) << i;
  }
}

TEST(shard, jpeg_storage_is_close_to_the_decoded_pixels_and_smaller) {
  TempDir dir;
  for (int i = 0; i < 6; ++i) {
    // Smooth photo-like images: JPEG's worst case, stripes, would say little about its use on photos.
    cv::Mat image(48, 48, CV_8UC3);
    for (int y = 0; y < 48; ++y) {
      for (int x = 0; x < 48; ++x) image.at<cv::Vec3b>(y, x) = cv::Vec3b(4 * x + i, 4 * y, 2 * (x + y));
    }
    write_image(dir.path() / "raw/train/a" / (std::to_string(i) + ".png"), image);
  }
  prepare(dir.path() / "raw", dir.path() / "decoded", Storage::decoded, "png", 1 << 20);
  const Manifest jpeg = prepare(dir.path() / "raw", dir.path() / "jpeg", Storage::encoded, "jpeg", 1 << 20);
  EXPECT_EQ(jpeg.encoding, "jpeg");
  const at::Tensor decoded = load_split(dir.path() / "decoded", "train").images.to(at::kFloat);
  const at::Tensor lossy = load_split(dir.path() / "jpeg", "train").images.to(at::kFloat);
  EXPECT_LT((decoded - lossy).abs().mean().item<float>(), 2.0f);
  EXPECT_LT(jpeg.split("train").bytes, static_cast<std::int64_t>(fs::file_size(dir.path() / "decoded/train-00000.pt")));
}

TEST(shard, original_storage_keeps_the_raw_files_bytes) {
  TempDir dir;
  const fs::path raw = write_tree(dir.path(), 3);
  write_image(raw / "train/a/200.jpg", pattern(32, 24, 3, 9));  // another size and format: decoded to 16x12
  const Manifest manifest = prepare(raw, dir.path() / "out", Storage::encoded, "original", 1 << 20);
  const SplitReader reader(dir.path() / "out", manifest, "train");
  EXPECT_EQ(sample(reader, 0), testing::read_bytes(raw / "train/a/100.png"));
  EXPECT_EQ(sample(reader, 3), testing::read_bytes(raw / "train/a/200.jpg"));
  const SplitData loaded = load_split(dir.path() / "out", "train");
  EXPECT_EQ(loaded.images.sizes(), (std::vector<std::int64_t>{7, 3, 16, 12}));
  const SplitData decoded = [&] {
    prepare(raw, dir.path() / "decoded", Storage::decoded, "png", 1 << 20);
    return load_split(dir.path() / "decoded", "train");
  }();
  EXPECT_TRUE(loaded.images.equal(decoded.images));
}

TEST(shard, same_input_gives_byte_identical_shards_whatever_the_threads) {
  TempDir dir;
  const fs::path raw = write_tree(dir.path(), 40);
  for (const auto& [storage, encoding] :
       {std::pair{Storage::decoded, "png"}, std::pair{Storage::encoded, "png"}, std::pair{Storage::encoded, "jpeg"}}) {
    const std::string name = to_string(storage) + "-" + encoding;
    const Manifest one = prepare(raw, dir.path() / (name + "1"), storage, encoding, 4000, 1);
    prepare(raw, dir.path() / (name + "4"), storage, encoding, 4000, 4);
    ASSERT_GT(one.split("train").shards.size(), 2u) << name;
    for (const auto& entry : fs::directory_iterator(dir.path() / (name + "1"))) {
      const fs::path file = entry.path().filename();
      EXPECT_EQ(file_bytes(entry.path()), file_bytes(dir.path() / (name + "4") / file)) << name << " " << file;
    }
  }
}

TEST(shard, auto_storage_is_decoded_up_to_the_limit_and_encoded_above_it) {
  TempDir dir;
  const fs::path raw = write_tree(dir.path(), 3);  // 10 candidates, 10 * 576 bytes decoded
  PrepareOptions options;
  options.raw_dir = raw;
  options.out_dir = dir.path() / "out";
  options.auto_decoded_max_bytes = 10 * kImageBytes;
  EXPECT_EQ(prepare_dataset(options).storage, Storage::decoded);
  options.auto_decoded_max_bytes = 10 * kImageBytes - 1;
  const Manifest encoded = prepare_dataset(options);
  EXPECT_EQ(encoded.storage, Storage::encoded);
  EXPECT_EQ(encoded.encoding, "png");
  EXPECT_EQ(read_manifest(options.out_dir).storage, Storage::encoded);
}

TEST(shard, bad_storage_options_are_refused_by_name) {
  TempDir dir;
  const fs::path raw = write_tree(dir.path(), 1);
  auto refused = [&](const std::function<void(PrepareOptions&)>& adjust) {
    PrepareOptions options;
    options.raw_dir = raw;
    options.out_dir = dir.path() / "out";
    adjust(options);
    return error_message<DataError>([&] { prepare_dataset(options); });
  };
  EXPECT_NE(refused([](auto& o) { o.encoding = "webp"; }).find("encoding must be png, jpeg or original, got 'webp'"),
            std::string::npos);
  EXPECT_NE(refused([](auto& o) { o.jpeg_quality = 0; }).find("jpeg_quality must be in 1..100, got 0"),
            std::string::npos);
  EXPECT_NE(refused([](auto& o) { o.shard_bytes = kImageBytes - 1; }).find("smaller than one image of"),
            std::string::npos);
  EXPECT_FALSE(fs::exists(dir.path() / "out"));
}

TEST(shard, format_version_1_dir_reads_as_one_decoded_shard_per_split) {
  TempDir dir;
  const fs::path processed = dir.path() / "v1";
  fs::create_directories(processed);
  c10::Dict<std::string, at::Tensor> content;
  const at::Tensor images = at::arange(3 * 2 * 4 * 5, at::kByte).reshape({3, 2, 4, 5});
  content.insert("images", images);
  content.insert("labels", at::arange(3, at::kLong));
  Manifest manifest;
  manifest.format_version = 1;
  manifest.classes = {"x", "y", "z"};
  manifest.image = {2, 4, 5};
  manifest.mean = {0.5, 0.5};
  manifest.std = {0.2, 0.2};
  manifest.normalization_split = "train";
  manifest.splits = {{"train",
                      "train.pt",
                      3,
                      detail::save_ivalue(processed / "train.pt", c10::IValue(content)),
                      {{"x", 1}, {"y", 1}, {"z", 1}},
                      {}}};
  write_manifest(manifest, processed / "manifest.json");

  const Manifest read = read_manifest(processed);
  EXPECT_EQ(read.format_version, 1);
  EXPECT_EQ(read.storage, Storage::decoded);
  ASSERT_EQ(read.split("train").shards.size(), 1u);
  EXPECT_EQ(read.split("train").shards[0], (ShardInfo{"train.pt", 3, manifest.splits[0].bytes}));
  const SplitData loaded = load_split(processed, "train");
  EXPECT_TRUE(loaded.images.equal(images));
  EXPECT_EQ(loaded.labels[2].item<std::int64_t>(), 2);
  const SplitReader reader(processed, read, "train");
  EXPECT_EQ(sample(reader, 1)[0], 40);
}

TEST(shard, truncated_shard_is_refused_naming_it) {
  TempDir dir;
  const fs::path raw = write_tree(dir.path(), 10);
  prepare(raw, dir.path() / "out", Storage::decoded, "png", kImageBytes * 8);
  const fs::path shard = dir.path() / "out/train-00001.pt";
  fs::resize_file(shard, fs::file_size(shard) - 100);
  const std::string message = error_message<DataError>([&] { load_split(dir.path() / "out", "train"); });
  EXPECT_NE(message.find("shard '" + shard.string() + "'"), std::string::npos) << message;
  EXPECT_NE(message.find("run process_data again"), std::string::npos) << message;
  // Cut short after the reader checked it: the read fails naming the shard and the sample.
  const Manifest manifest = prepare(raw, dir.path() / "again", Storage::decoded, "png", kImageBytes * 8);
  const fs::path last = dir.path() / "again/train-00002.pt";
  const SplitReader reader(dir.path() / "again", manifest, "train");
  fs::resize_file(last, 200);
  const std::string torn = error_message<DataError>([&] { sample(reader, 19); });
  EXPECT_NE(torn.find("shard '" + last.string() + "' (sample 3 of 4)"), std::string::npos) << torn;
}

TEST(shard, shard_with_other_tensors_is_refused_naming_the_record) {
  TempDir dir;
  const fs::path raw = write_tree(dir.path(), 3);
  prepare(raw, dir.path() / "out", Storage::decoded, "png", 1 << 20);
  c10::Dict<std::string, at::Tensor> content;
  content.insert("images", at::zeros({6, 3, 16, 11}, at::kByte));  // one column short
  content.insert("labels", at::zeros({6}, at::kLong));
  replace_shard(dir.path() / "out", "train-00000.pt", content);
  const std::string message = error_message<DataError>([&] { load_split(dir.path() / "out", "train"); });
  EXPECT_NE(message.find("train-00000.pt': record 'data/0' has 3168 bytes, expected 3456"), std::string::npos)
      << message;
}

TEST(shard, labels_outside_the_classes_are_refused) {
  TempDir dir;
  const fs::path raw = write_tree(dir.path(), 3);
  prepare(raw, dir.path() / "out", Storage::decoded, "png", 1 << 20);
  c10::Dict<std::string, at::Tensor> content;
  content.insert("images", at::zeros({6, 3, 16, 12}, at::kByte));
  at::Tensor labels = at::zeros({6}, at::kLong);
  labels[4] = 2;
  content.insert("labels", labels);
  replace_shard(dir.path() / "out", "train-00000.pt", content);
  const std::string message = error_message<DataError>([&] { load_split(dir.path() / "out", "train"); });
  EXPECT_NE(message.find("train-00000.pt': sample 4 has label 2, outside the dataset's 2 classes"), std::string::npos)
      << message;
}

TEST(shard, encoded_shard_with_bad_offsets_is_refused) {
  TempDir dir;
  const fs::path raw = write_tree(dir.path(), 3);
  prepare(raw, dir.path() / "out", Storage::encoded, "png", 1 << 20);
  auto content = detail::load_ivalue(dir.path() / "out/train-00000.pt").toGenericDict();
  c10::Dict<std::string, at::Tensor> edited;
  edited.insert("data", content.at("data").toTensor());
  at::Tensor offsets = content.at("offsets").toTensor().clone();
  offsets[2] = offsets[3].item<std::int64_t>() + 1;
  edited.insert("offsets", offsets);
  edited.insert("labels", content.at("labels").toTensor());
  replace_shard(dir.path() / "out", "train-00000.pt", edited);
  const std::string message = error_message<DataError>([&] { load_split(dir.path() / "out", "train"); });
  EXPECT_NE(message.find("train-00000.pt': its offsets decrease at sample 2"), std::string::npos) << message;
}

TEST(shard, encoded_sample_that_does_not_decode_names_the_shard_and_sample) {
  TempDir dir;
  const fs::path raw = write_tree(dir.path(), 3);
  const Manifest manifest = prepare(raw, dir.path() / "out", Storage::encoded, "png", 1 << 20);
  const SplitReader reader(dir.path() / "out", manifest, "train");
  const auto first = sample(reader, 1);
  // Overwrite sample 1's bytes in place (same file size, so only decoding can tell).
  std::vector<std::uint8_t> bytes = testing::read_bytes(dir.path() / "out/train-00000.pt");
  const auto at = std::search(bytes.begin(), bytes.end(), first.begin(), first.end());
  ASSERT_NE(at, bytes.end());
  std::fill(at, at + static_cast<std::ptrdiff_t>(first.size()), 'x');
  testing::write_bytes(dir.path() / "out/train-00000.pt", bytes);
  const std::string message = error_message<DataError>([&] { load_split(dir.path() / "out", "train"); });
  EXPECT_NE(message.find("cannot decode shard '" + (dir.path() / "out/train-00000.pt").string() + "' (sample 1 of 6)"),
            std::string::npos)
      << message;
}

}  // namespace
}  // namespace kiln
