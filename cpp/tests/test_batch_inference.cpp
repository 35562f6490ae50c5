#include "kiln/batch_inference.hpp"

#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "fixtures.hpp"
#include "kiln/checkpoint.hpp"
#include "kiln/error.hpp"
#include "kiln/predictor.hpp"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using testing::CheckpointedDataset;
using testing::encode;
using testing::pattern;
using testing::read_bytes;
using testing::TempDir;
using testing::write_bytes;
using testing::write_image;

std::vector<nlohmann::json> read_lines(const fs::path& path) {
  std::vector<nlohmann::json> lines;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) lines.push_back(nlohmann::json::parse(line));
  return lines;
}

TEST(batch_inference, writes_one_line_per_file_and_errors_for_bad_ones) {
  CheckpointedDataset f;
  const Predictor predictor(f.checkpoint);
  const fs::path input = f.dir.path() / "input";
  for (int i = 0; i < 7; ++i) write_image(input / ("img" + std::to_string(i) + ".png"), pattern(12, 12, 1, i));
  const std::vector<std::uint8_t> good = encode(pattern(12, 12, 1, 0));
  write_bytes(input / "truncated.png", std::vector<std::uint8_t>(good.begin(), good.begin() + 40));
  write_bytes(input / "notes.png", {'h', 'i'});
  write_bytes(input / "other.txt", {'h', 'i'});  // not matched by the glob
  fs::create_symlink(input / "missing.png", input / "broken.png");

  BatchInferenceOptions options{input, "*.png", f.dir.path() / "out" / "res.jsonl", 3};
  fs::create_directories(options.output_path.parent_path());
  std::vector<std::int64_t> reports;
  const auto summary = classify_directory(predictor, options, [&](std::int64_t done, std::int64_t total) {
    reports.push_back(done);
    return true;
  });
  EXPECT_EQ(summary.files, 10);
  EXPECT_EQ(summary.classified, 7);
  EXPECT_EQ(summary.failed, 3);
  EXPECT_EQ(reports.back(), 10);

  const auto lines = read_lines(options.output_path);
  ASSERT_EQ(lines.size(), 10u);
  for (const auto& line : lines) {
    const std::string path = line["filepath"];
    EXPECT_EQ(line["image_filepath"], path);  // kiln's earlier name for the guide's "filepath", same value
    EXPECT_TRUE(fs::path(path).is_absolute());
    EXPECT_EQ(line["time"].get<std::string>().size(), 24u);  // 2026-11-25T19:40:27+0000
    const bool bad = path.ends_with("truncated.png") || path.ends_with("notes.png") || path.ends_with("broken.png");
    EXPECT_EQ(line.contains("error"), bad) << path;
    if (bad) {
      EXPECT_TRUE(line["prediction"].is_null());
    } else {
      EXPECT_TRUE(line["prediction"] == "even" || line["prediction"] == "odd");
      EXPECT_GT(line["probability"].get<double>(), 0.49);
    }
  }
  // Same predictions as the in-memory path for the same file, up to float rounding: a batch of three
  // and a batch of one go through differently blocked GEMMs, which can differ in the last bit.
  for (const auto& line : lines) {
    if (line.contains("error")) continue;
    const auto direct = predictor.predict_encoded({read_bytes(line["filepath"].get<std::string>())});
    EXPECT_FLOAT_EQ(line["probability"].get<double>(), direct.probabilities[0].max().item<float>());
  }
}

TEST(batch_inference, classifies_through_the_checkpoint_s_evaluation_transform) {
  // A 12x12 model trained on 16x16 processed images center-cropped to 12x12: each file is decoded to
  // 16x16 and cropped, as Predictor::preprocess shows, not decoded to the model's 12x12.
  CheckpointedDataset f;
  TrainingState state = read_training_state(read_checkpoint(f.checkpoint), f.checkpoint);
  state.model.stored_image = {1, 16, 16};
  state.model.eval_transform.center_crop = {{12, 12}};
  write_checkpoint(f.dir.path() / "cropped.pt", std::move(state));
  const Predictor predictor(f.dir.path() / "cropped.pt");
  const Predictor untransformed(f.checkpoint);

  BatchInferenceOptions options{f.raw / "train", "*/*", f.dir.path() / "res.jsonl", 64};
  EXPECT_EQ(classify_directory(predictor, options).classified, 12);
  const auto lines = read_lines(options.output_path);
  std::vector<std::vector<std::uint8_t>> bytes;
  for (const auto& line : lines) bytes.push_back(read_bytes(line["filepath"].get<std::string>()));
  const std::vector<EncodedImage> encoded(bytes.begin(), bytes.end());
  const at::Tensor top = std::get<0>(untransformed.predict(predictor.preprocess(encoded).images).max(1));
  for (std::size_t i = 0; i < lines.size(); ++i) {
    EXPECT_EQ(lines[i]["probability"].get<double>(), top[static_cast<std::int64_t>(i)].item<float>()) << i;
  }
}

TEST(batch_inference, an_interrupted_run_leaves_no_partial_output) {
  CheckpointedDataset f;
  const Predictor predictor(f.checkpoint);
  const fs::path output = f.dir.path() / "res.jsonl";
  BatchInferenceOptions options{f.raw / "train" / "even", "*", output, 2};
  auto entries = [&] { return std::distance(fs::directory_iterator(f.dir.path()), fs::directory_iterator()); };
  const auto before = entries();
  EXPECT_THROW(classify_directory(predictor, options, [](std::int64_t done, std::int64_t) { return done < 4; }),
               Cancelled);
  EXPECT_FALSE(fs::exists(output));
  EXPECT_EQ(entries(), before);  // no temp file left behind
}

TEST(batch_inference, missing_dirs_and_globs_matching_nothing_are_clear_errors) {
  CheckpointedDataset f;
  const Predictor predictor(f.checkpoint);
  const fs::path output = f.dir.path() / "res.jsonl";
  EXPECT_THROW(classify_directory(predictor, {f.dir.path() / "nowhere", "*.png", output}), NotFoundError);
  try {
    classify_directory(predictor, {f.raw / "train" / "odd", "*.tiff", output});
    FAIL() << "expected a DataError";
  } catch (const DataError& error) {
    EXPECT_NE(std::string(error.what()).find("*.tiff"), std::string::npos);
    EXPECT_NE(std::string(error.what()).find("odd"), std::string::npos);
  }
}

TEST(batch_inference, double_star_globs_span_folders_and_skip_hidden_ones) {
  TempDir dir;
  for (const char* name : {"a.png", "sub/b.png", "sub/deeper/c.png", ".hidden/d.png", "sub/e.jpg", ".f.png"}) {
    write_bytes(dir.path() / name, {1});
  }
  auto names = [&](std::string_view glob) {
    std::vector<std::string> relative;
    for (const auto& file : find_matching_files(dir.path(), glob)) {
      relative.push_back(file.lexically_relative(dir.path()).string());
    }
    return relative;
  };
  EXPECT_EQ(names("*.png"), (std::vector<std::string>{"a.png"}));
  EXPECT_EQ(names("**/*.png"), (std::vector<std::string>{"a.png", "sub/b.png", "sub/deeper/c.png"}));
  EXPECT_EQ(names("sub/*"), (std::vector<std::string>{"sub/b.png", "sub/e.jpg"}));
}

}  // namespace
}  // namespace kiln
