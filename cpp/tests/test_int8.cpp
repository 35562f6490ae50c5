#include "kiln/int8.hpp"

#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include "fixtures.hpp"
#include "kiln/checkpoint.hpp"
#include "kiln/dataset.hpp"
#include "kiln/error.hpp"
#include "kiln/predictor.hpp"
#include "kiln/trainer.hpp"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using testing::CheckpointedDataset;

TEST(int8, predictions_agree_with_fp32) {
  // The evaluation of a trained epoch records the calibration; int8 then computes the same function
  // up to quantisation (normalisation folded into conv1, uint8 activations, fc1 reordered for the
  // channels-last pooled activations), on 12x12 images here (pooled 4x4, not the 28x28 case).
  CheckpointedDataset f;
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
  const Predictor int8(trained, "cpu", Precision::int8);
  EXPECT_EQ(int8.precision(), Precision::int8);
  const at::Tensor probabilities = int8.predict(train.images);
  EXPECT_TRUE(at::allclose(probabilities, fp32, 0.0, 5e-2)) << (probabilities - fp32).abs().max().item<float>();
  // Integer arithmetic: one image alone gets exactly what it gets in a batch.
  EXPECT_TRUE(at::equal(int8.predict(train.images.slice(0, 5, 6)), probabilities.slice(0, 5, 6)));
}

TEST(int8, without_calibration_names_why_or_falls_back) {
  CheckpointedDataset f;  // an untrained model's checkpoint: never evaluated, so no calibration
  try {
    Predictor(f.checkpoint, "cpu", Precision::int8);
    FAIL() << "int8 without calibration must not load";
  } catch (const DataError& error) {
    EXPECT_NE(std::string(error.what()).find("no int8 calibration"), std::string::npos) << error.what();
  }
  const Predictor fallback(f.checkpoint, "cpu", Precision::int8, Precision::fp32);
  EXPECT_EQ(fallback.precision(), Precision::fp32);
  EXPECT_NE(fallback.int8_unavailable().find("no int8 calibration"), std::string::npos);
  EXPECT_EQ(fallback.predict(load_split(f.processed, "train").images).size(0), 12);
}

}  // namespace
}  // namespace kiln
