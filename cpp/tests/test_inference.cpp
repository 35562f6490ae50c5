#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "kiln/batch_inference.hpp"
#include "kiln/dataset.hpp"
#include "kiln/checkpoint.hpp"
#include "kiln/error.hpp"
#include "kiln/int8.hpp"
#include "kiln/model.hpp"
#include "kiln/predictor.hpp"
#include "kiln/trainer.hpp"
#include "test_helpers.hpp"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using testing::encode;
using testing::pattern;
using testing::TempDir;
using testing::write_bytes;
using testing::write_image;

std::vector<std::uint8_t> read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// A two-class grayscale 12x12 dataset with files that preparation has to convert (RGB, other sizes,
// JPEG), and an untrained model's checkpoint of it.
struct Fixture {
  TempDir dir;
  fs::path raw = dir.path() / "raw";
  fs::path processed = dir.path() / "processed";
  fs::path checkpoint = dir.path() / "model.pt";
  std::vector<fs::path> train_files;

  Fixture() {
    for (int i = 0; i < 12; ++i) {
      const std::string label = i % 2 ? "odd" : "even";
      cv::Mat image = pattern(12, 12, 1, i);
      std::string extension = ".png";
      if (i % 4 == 1) image = pattern(12, 12, 3, i);  // converted RGB -> gray
      if (i % 4 == 2) image = pattern(20, 16, 1, i);  // resized
      if (i % 4 == 3) extension = ".jpg";
      const fs::path file = raw / "train" / label / (std::to_string(i) + extension);
      write_image(file, image);
      write_image(raw / "test" / label / (std::to_string(i) + extension), image);
    }
    PrepareOptions options;
    options.raw_dir = raw;
    options.out_dir = processed;
    options.image_size = std::pair{12, 12};
    options.channels = 1;
    prepare_dataset(options);
    // The processed split's row order: classes in name order, files in name order within each.
    for (const char* label : {"even", "odd"}) {
      std::vector<fs::path> files;
      for (const auto& entry : fs::directory_iterator(raw / "train" / label)) files.push_back(entry.path());
      std::sort(files.begin(), files.end());
      train_files.insert(train_files.end(), files.begin(), files.end());
    }
    TrainerOptions trainer_options;
    trainer_options.data_dir = processed;
    Trainer(trainer_options).save_checkpoint(checkpoint);
  }
};

TEST(inference, serving_decodes_files_to_the_pixels_training_saw) {
  Fixture f;
  const SplitData train = load_split(f.processed, "train");
  std::vector<std::vector<std::uint8_t>> bytes;
  for (const auto& file : f.train_files) bytes.push_back(read_bytes(file));
  const std::vector<EncodedImage> encoded(bytes.begin(), bytes.end());

  const DecodedBatch batch = decode_batch(encoded, {1, 12, 12});
  EXPECT_EQ(batch.decoded(), 12);
  EXPECT_TRUE(at::equal(batch.images, train.images));

  const Predictor predictor(f.checkpoint);
  const auto served = predictor.predict_encoded(encoded);
  EXPECT_TRUE(at::equal(served.probabilities, predictor.predict(train.images)));
  EXPECT_NE(served.conversions[1], "");  // the RGB file was converted as preparation converted it
}

TEST(inference, channels_last_preparation_keeps_the_model_s_function) {
  at::manual_seed(3);
  const auto model = make_model({"mnist_cnn", 1, 10, 28, 28});
  model->eval();
  c10::NoGradGuard no_grad;
  const at::Tensor x = at::randn({4, 1, 28, 28});
  const at::Tensor before = model->forward(x);
  for (auto& param : model->parameters()) {
    if (param.dim() == 4) param.set_data(param.contiguous(at::MemoryFormat::ChannelsLast));
  }
  model->prepare_channels_last_inference();
  const at::Tensor after = model->forward(x.contiguous(at::MemoryFormat::ChannelsLast));
  EXPECT_TRUE(at::allclose(after, before, 1e-4, 1e-5)) << (after - before).abs().max().item<float>();
}

TEST(inference, bf16_predictor_agrees_with_fp32) {
  // The bf16 path casts the weights once, computes channels-last and reorders fc1's weights to the
  // activations' memory order: the same function up to bf16 rounding.
  Fixture f;
  const SplitData train = load_split(f.processed, "train");
  const at::Tensor fp32 = Predictor(f.checkpoint).predict(train.images);
  const at::Tensor bf16 = Predictor(f.checkpoint, "cpu", InferencePrecision::bf16).predict(train.images);
  EXPECT_TRUE(at::allclose(bf16, fp32, 0.0, 2e-2)) << (bf16 - fp32).abs().max().item<float>();
}

TEST(inference, int8_predictor_agrees_with_fp32) {
  // The evaluation of a trained epoch records the calibration; int8 then computes the same function
  // up to quantisation (normalisation folded into conv1, uint8 activations, fc1 reordered for the
  // channels-last pooled activations), on 12x12 images here (pooled 4x4, not the 28x28 case).
  Fixture f;
  TrainerOptions options;
  options.data_dir = f.processed;
  options.train_batch_size = 4;
  Trainer trainer(options);
  trainer.run_epoch();
  const fs::path trained = f.dir.path() / "trained.pt";
  trainer.save_checkpoint(trained);
  const CheckpointModel saved = checkpoint_model(read_checkpoint(trained), trained);
  ASSERT_EQ(saved.calibration.activation_max.size(), 3u);
  EXPECT_EQ(saved.calibration.images, 12);
  for (const double max : saved.calibration.activation_max) EXPECT_GT(max, 0.0);
  const std::string unavailable = int8_unavailable_reason(saved);
  if (!unavailable.empty()) GTEST_SKIP() << unavailable;

  const SplitData train = load_split(f.processed, "train");
  const at::Tensor fp32 = Predictor(trained).predict(train.images);
  const Predictor int8(trained, "cpu", InferencePrecision::int8);
  EXPECT_EQ(int8.precision(), InferencePrecision::int8);
  const at::Tensor probabilities = int8.predict(train.images);
  EXPECT_TRUE(at::allclose(probabilities, fp32, 0.0, 5e-2)) << (probabilities - fp32).abs().max().item<float>();
  // Integer arithmetic: one image alone gets exactly what it gets in a batch.
  EXPECT_TRUE(at::equal(int8.predict(train.images.slice(0, 5, 6)), probabilities.slice(0, 5, 6)));
}

TEST(inference, int8_without_calibration_names_why_or_falls_back) {
  Fixture f;  // an untrained model's checkpoint: never evaluated, so no calibration
  try {
    Predictor(f.checkpoint, "cpu", InferencePrecision::int8);
    FAIL() << "int8 without calibration must not load";
  } catch (const DataError& error) {
    EXPECT_NE(std::string(error.what()).find("no int8 calibration"), std::string::npos) << error.what();
  }
  const Predictor fallback(f.checkpoint, "cpu", InferencePrecision::int8, InferencePrecision::fp32);
  EXPECT_EQ(fallback.precision(), InferencePrecision::fp32);
  EXPECT_NE(fallback.int8_unavailable().find("no int8 calibration"), std::string::npos);
  EXPECT_EQ(fallback.predict(load_split(f.processed, "train").images).size(0), 12);
}

TEST(inference, undecodable_images_get_an_error_and_the_rest_a_prediction) {
  Fixture f;
  const Predictor predictor(f.checkpoint);
  const std::vector<std::uint8_t> good = read_bytes(f.train_files[0]);
  const std::vector<std::uint8_t> truncated(good.begin(), good.begin() + good.size() / 2);
  const std::string text = "not an image";
  const std::vector<EncodedImage> encoded = {
      good, truncated, EncodedImage(reinterpret_cast<const std::uint8_t*>(text.data()), text.size()), {}};
  const auto result = predictor.predict_encoded(encoded);
  EXPECT_EQ(result.errors[0], "");
  EXPECT_NE(result.errors[1], "");
  EXPECT_NE(result.errors[2], "");
  EXPECT_NE(result.errors[3], "");
  EXPECT_NEAR(result.probabilities[0].sum().item<float>(), 1.0f, 1e-5);
  EXPECT_EQ(result.probabilities.slice(0, 1).abs().sum().item<float>(), 0.0f);
  EXPECT_TRUE(at::equal(result.probabilities[0], predictor.predict_encoded({good}).probabilities[0]));
}

std::vector<nlohmann::json> read_lines(const fs::path& path) {
  std::vector<nlohmann::json> lines;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) lines.push_back(nlohmann::json::parse(line));
  return lines;
}

TEST(batch_inference, writes_one_line_per_file_and_errors_for_bad_ones) {
  Fixture f;
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
    const std::string path = line["image_filepath"];
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
  // Same predictions as the in-memory path for the same file.
  const auto direct = predictor.predict_encoded({read_bytes(input / "img3.png")});
  const double expected = direct.probabilities[0].max().item<float>();
  for (const auto& line : lines) {
    if (line["image_filepath"].get<std::string>().ends_with("img3.png")) {
      EXPECT_EQ(line["probability"].get<double>(), expected);
    }
  }
}

TEST(batch_inference, an_interrupted_run_leaves_no_partial_output) {
  Fixture f;
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
  Fixture f;
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
