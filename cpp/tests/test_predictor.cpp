#include "kiln/predictor.hpp"

#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <torch/nn/modules/batchnorm.h>

#include <string>
#include <utility>

#include "fixtures.hpp"
#include "kiln/augment.hpp"
#include "kiln/checkpoint.hpp"
#include "kiln/dataset.hpp"
#include "kiln/error.hpp"
#include "kiln/normalize.hpp"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using testing::CheckpointedDataset;
using testing::read_bytes;

TEST(predictor, gives_the_trained_model_s_predictions) {
  testing::TempDir dir;
  const fs::path data = testing::write_halves_dataset(dir.path(), 32);
  Trainer trainer(testing::small_options(data));
  trainer.run_epoch();
  const EpochMetrics metrics = trainer.run_epoch();
  trainer.save_checkpoint(dir.path() / "model.pt");

  const Predictor predictor(dir.path() / "model.pt");
  EXPECT_EQ(predictor.classes(), (std::vector<std::string>{"down", "up"}));
  const SplitData test = load_split(data, "test");
  const at::Tensor probabilities = predictor.predict(test.images);
  ASSERT_EQ(probabilities.sizes(), (std::vector<std::int64_t>{64, 2}));
  EXPECT_TRUE(at::allclose(probabilities.sum(1), at::ones({64})));
  const double accuracy = probabilities.argmax(1).eq(test.labels).to(at::kDouble).mean().item<double>();
  EXPECT_DOUBLE_EQ(accuracy, metrics.test_accuracy);
  EXPECT_THROW(predictor.predict(at::zeros({2, 3, 12, 12}, at::kByte)), DataError);
  EXPECT_THROW(predictor.predict(at::zeros({2, 1, 12, 12}, at::kFloat)), DataError);
}

TEST(predictor, serving_decodes_files_to_the_pixels_training_saw) {
  CheckpointedDataset f;
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
  // A checkpoint without an evaluation transform: the model sees the processed pixels as they are.
  EXPECT_EQ(predictor.input_spec(), predictor.image_spec());
  EXPECT_TRUE(at::equal(predictor.preprocess(encoded).images, train.images));
}

// f's (untrained) 12x12 model, as if trained on 16x16 processed images through an evaluation transform
// of Resize(14) and CenterCrop(12).
fs::path transformed_checkpoint(const CheckpointedDataset& f) {
  TrainingState state = read_training_state(read_checkpoint(f.checkpoint), f.checkpoint);
  state.model.stored_image = {1, 16, 16};
  state.model.eval_transform.resize = {{14, 14}};
  state.model.eval_transform.center_crop = {{12, 12}};
  const fs::path path = f.dir.path() / "transformed.pt";
  write_checkpoint(path, std::move(state));
  return path;
}

TEST(predictor, every_input_goes_through_the_checkpoint_s_evaluation_transform) {
  CheckpointedDataset f;
  const Predictor predictor(transformed_checkpoint(f));
  EXPECT_EQ(predictor.image_spec(), (ImageSpec{1, 16, 16}));
  EXPECT_EQ(predictor.input_spec(), (ImageSpec{1, 12, 12}));
  std::vector<std::vector<std::uint8_t>> bytes;
  for (const auto& file : f.train_files) bytes.push_back(read_bytes(file));
  const std::vector<EncodedImage> encoded(bytes.begin(), bytes.end());

  // What the model sees: the files decoded to the stored 16x16 as preparation decodes them, then
  // evaluation's transform, byte for byte.
  const ImageTransform transform = ImageTransform::evaluation(predictor.eval_transform(), 1);
  at::Tensor expected = at::empty({12, 1, 12, 12}, at::kByte);
  std::vector<std::uint8_t> stored(16 * 16);
  SampleRandom unused(0);
  for (std::size_t i = 0; i < encoded.size(); ++i) {
    ASSERT_TRUE(decode_into(encoded[i], {1, 16, 16}, stored.data()).ok) << i;
    transform.apply(stored.data(), 16, 16, expected[static_cast<std::int64_t>(i)].data_ptr<std::uint8_t>(), unused);
  }
  const DecodedBatch seen = predictor.preprocess(encoded);
  EXPECT_EQ(seen.decoded(), 12);
  EXPECT_TRUE(at::equal(seen.images, expected));
  EXPECT_FALSE(at::equal(seen.images, decode_batch(encoded, {1, 12, 12}).images));  // not a decode to 12x12

  // predict() takes the stored images (a processed split's rows) and transforms them itself: the same
  // answers as the encoded files, which are the model's answers on the transformed pixels.
  const at::Tensor rows = decode_batch(encoded, predictor.image_spec()).images;
  const at::Tensor probabilities = predictor.predict(rows);
  EXPECT_TRUE(at::equal(predictor.predict_encoded(encoded).probabilities, probabilities));
  EXPECT_TRUE(at::equal(Predictor(f.checkpoint).predict(seen.images), probabilities));
  // One image alone: oneDNN's channels-last kernels for another batch size round differently.
  const at::Tensor alone = predictor.predict(rows[3]);
  EXPECT_TRUE(at::allclose(alone, probabilities.slice(0, 3, 4), 0.0, 1e-6)) << alone - probabilities.slice(0, 3, 4);

  const std::string message =
      testing::error_message<DataError>([&] { predictor.predict(at::zeros({2, 1, 12, 12}, at::kByte)); });
  EXPECT_EQ(message,
            "expected uint8 images of shape [N, 1, 16, 16] (the processed images the model was trained on; "
            "its evaluation transform brings them to the model's 12x12 grayscale), got Byte [2, 1, 12, 12]");
}

TEST(predictor, in_bf16_agrees_with_fp32) {
  // The bf16 path casts the weights once, computes channels-last and reorders fc1's weights to the
  // activations' memory order: the same function up to bf16 rounding.
  CheckpointedDataset f;
  const SplitData train = load_split(f.processed, "train");
  const at::Tensor fp32 = Predictor(f.checkpoint).predict(train.images);
  const at::Tensor bf16 = Predictor(f.checkpoint, "cpu", Precision::bf16).predict(train.images);
  EXPECT_TRUE(at::allclose(bf16, fp32, 0.0, 2e-2)) << (bf16 - fp32).abs().max().item<float>();
}

// Every model predicts fp32 on the CPU on channels-last tensors, laid out for them (prepare_for_inference):
// the probabilities of the model computing in NCHW, as torchvision runs it.
class predictor_in_fp32 : public ::testing::TestWithParam<std::string> {};

TEST_P(predictor_in_fp32, gives_the_probabilities_the_model_computes_in_nchw) {
  CheckpointedDataset f;
  PrepareOptions rgb;
  rgb.raw_dir = f.raw;
  rgb.out_dir = f.dir.path() / "rgb32";
  rgb.image_size = std::pair{32, 32};
  rgb.channels = 3;
  prepare_dataset(rgb);
  TrainerOptions options = testing::small_options(rgb.out_dir);
  options.model = GetParam();
  options.mean = {0.5, 0.5, 0.5};
  options.std = {0.25, 0.25, 0.25};
  Trainer trainer(options);
  const auto model = make_model(trainer.model_spec());
  at::manual_seed(4);
  const at::Tensor images = at::randint(0, 256, {12, 3, 32, 32}, at::kByte);
  const at::Tensor x = Normalizer(options.mean, options.std, at::kCPU)(images);
  c10::NoGradGuard no_grad;
  // Initial batch-norm statistics (mean 0, variance 1) make the deeper networks answer every image alike,
  // which any comparison passes: the images' own statistics instead (momentum none: one batch's), as
  // training gathers them.
  for (const auto& module : model->modules()) {
    if (auto* norm = module->as<torch::nn::BatchNorm2dImpl>()) norm->options.momentum(std::nullopt);
  }
  model->train();
  model->forward(x);
  model->eval();
  trainer.load_pretrained(module_state_dict(*model), "the model with the images' statistics");
  const fs::path checkpoint = f.dir.path() / "model.pt";
  trainer.save_checkpoint(checkpoint);

  const at::Tensor actual = Predictor(checkpoint).predict(images);
  const at::Tensor expected = at::softmax(model->forward(x), 1);
  // Channels-last vs NCHW kernels round differently; efficientnet_b0's 16 blocks measured up to 1.04e-4 apart
  // in one CI run (ctest's parallel jobs change the kernels' thread split).
  EXPECT_TRUE(at::allclose(actual, expected, 0.0, 2e-4)) << (actual - expected).abs().max().item<float>();
  EXPECT_TRUE(at::equal(actual.argmax(1), expected.argmax(1)));
  // Not a model that answers the same for every image, which would make the equalities above hollow.
  EXPECT_GT(expected.std(0).max().item<double>(), 1e-3);
}

INSTANTIATE_TEST_SUITE_P(models, predictor_in_fp32, ::testing::ValuesIn(model_names()));

TEST(predictor, undecodable_images_get_an_error_and_the_rest_a_prediction) {
  CheckpointedDataset f;
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

}  // namespace
}  // namespace kiln
