#include "kiln/trainer.hpp"

#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

#include "fixtures.hpp"
#include "kiln/error.hpp"
#include "kiln/predictor.hpp"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using testing::small_options;
using testing::TempDir;
using testing::write_halves_dataset;

TEST(trainer, learns_an_easy_task_and_reports_metrics) {
  TempDir dir;
  const fs::path data = write_halves_dataset(dir.path(), 48);
  Trainer trainer(small_options(data));
  EXPECT_EQ(trainer.train_size(), 96);
  std::int64_t reported_total = 0;
  EpochMetrics last;
  for (int epoch = 0; epoch < 3; ++epoch) {
    last = trainer.run_epoch([&](std::int64_t, std::int64_t total) {
      reported_total = total;
      return true;
    });
  }
  EXPECT_EQ(last.epoch, 3);
  EXPECT_EQ(reported_total, 6);  // 96 images in batches of 16
  EXPECT_GT(last.test_accuracy, 0.9);
  EXPECT_LT(last.test_loss, trainer.history().front().test_loss);
  EXPECT_DOUBLE_EQ(last.learning_rate, 1.0 * 0.7 * 0.7);
  EXPECT_EQ(trainer.confusion_matrix().sum().item<std::int64_t>(), 96);
}

TEST(trainer, float32_resnet_with_contiguous_late_layers_trains_as_all_contiguous) {
  // Channels-last float32 training runs resnet18's late layers contiguous (at 12 px from layer1 on);
  // the step is the same computation as a wholly contiguous model's, summed in another order.
  TempDir dir;
  const fs::path data = write_halves_dataset(dir.path(), 16);
  TrainerOptions options = small_options(data);
  options.model = "resnet18";
  options.train_limit = 16;  // one step
  options.channels_last = true;
  Trainer split(options);
  options.channels_last = false;
  Trainer contiguous(options);
  const EpochMetrics a = split.run_epoch();
  const EpochMetrics b = contiguous.run_epoch();
  EXPECT_NEAR(a.train_loss, b.train_loss, 1e-5 * b.train_loss);
  EXPECT_NEAR(a.test_loss, b.test_loss, 1e-3 * b.test_loss);
  EXPECT_EQ(a.test_accuracy, b.test_accuracy);
}

TEST(trainer, same_seed_gives_same_metrics) {
  TempDir dir;
  const fs::path data = write_halves_dataset(dir.path(), 24);
  Trainer a(small_options(data));
  Trainer b(small_options(data));
  const EpochMetrics first = a.run_epoch();
  const EpochMetrics second = b.run_epoch();
  EXPECT_EQ(first.train_loss, second.train_loss);
  EXPECT_EQ(first.test_loss, second.test_loss);
}

TEST(trainer, resuming_from_a_checkpoint_continues_exactly) {
  TempDir dir;
  const fs::path data = write_halves_dataset(dir.path(), 24);
  Trainer straight(small_options(data));
  straight.run_epoch();
  straight.save_checkpoint(dir.path() / "epoch1.pt");
  const EpochMetrics expected = straight.run_epoch();

  Trainer resumed(small_options(data));
  resumed.load_checkpoint(dir.path() / "epoch1.pt");
  EXPECT_EQ(resumed.epoch(), 1);
  ASSERT_EQ(resumed.history().size(), 1u);
  const EpochMetrics actual = resumed.run_epoch();
  EXPECT_EQ(actual.epoch, 2);
  EXPECT_EQ(actual.train_loss, expected.train_loss);
  EXPECT_EQ(actual.test_loss, expected.test_loss);
  EXPECT_DOUBLE_EQ(actual.learning_rate, expected.learning_rate);
}

TEST(trainer, step_metrics_cover_every_nth_batch_and_continue_across_epochs) {
  TempDir dir;
  Trainer trainer(small_options(write_halves_dataset(dir.path(), 48)));  // 6 batches of 16 per epoch
  std::vector<StepMetrics> reports;
  auto record = [&](const StepMetrics& m) { reports.push_back(m); };
  const EpochMetrics first = trainer.run_epoch({}, record, 3);
  trainer.run_epoch({}, record, 3);
  ASSERT_EQ(reports.size(), 4u);
  for (std::size_t i = 0; i < reports.size(); ++i) {
    EXPECT_EQ(reports[i].step, static_cast<std::int64_t>(3 * (i + 1)));
    EXPECT_TRUE(std::isfinite(reports[i].loss) && reports[i].loss > 0);
    EXPECT_GT(reports[i].images_per_second, 0);
  }
  // Each epoch's two windows hold its six batches of 16: their mean is the epoch's training loss.
  EXPECT_NEAR((reports[0].loss + reports[1].loss) / 2, first.train_loss, 1e-6);
  EXPECT_DOUBLE_EQ(reports[1].learning_rate, 1.0);
  EXPECT_DOUBLE_EQ(reports[2].learning_rate, 0.7);
  EXPECT_THROW(trainer.run_epoch({}, record, 0), DataError);
  EXPECT_EQ(trainer.epoch(), 2);
}

TEST(trainer, progress_returning_false_cancels_and_keeps_the_epoch_counter) {
  TempDir dir;
  Trainer trainer(small_options(write_halves_dataset(dir.path(), 24)));
  std::int64_t reports = 0;
  EXPECT_THROW(trainer.run_epoch([&](std::int64_t, std::int64_t) { return ++reports < 1; }), Cancelled);
  EXPECT_EQ(reports, 1);
  EXPECT_EQ(trainer.epoch(), 0);
  EXPECT_TRUE(trainer.history().empty());
  EXPECT_EQ(trainer.run_epoch().epoch, 1);
}

TEST(trainer, diverging_loss_stops_with_a_clear_error) {
  TempDir dir;
  TrainerOptions options = small_options(write_halves_dataset(dir.path(), 24));
  options.lr = 1e30;
  Trainer trainer(options);
  const std::string message = testing::error_message<TrainingError>([&] {
    for (int epoch = 0; epoch < 3; ++epoch) trainer.run_epoch();
  });
  EXPECT_NE(message.find("NaN or inf"), std::string::npos) << message;
}

TEST(trainer, refuses_bad_options) {
  TempDir dir;
  const fs::path data = write_halves_dataset(dir.path(), 8);
  TrainerOptions options = small_options(data);
  options.model = "no_such_model";
  EXPECT_THROW(Trainer{options}, DataError);
  options = small_options(data);
  options.train_batch_size = 0;
  EXPECT_THROW(Trainer{options}, DataError);
  options = small_options(data);
  options.precision = Precision::int8;
  const std::string message = testing::error_message<DataError>([&] { Trainer{options}; });
  EXPECT_NE(message.find("training runs in fp32 or bf16"), std::string::npos) << message;
}

TEST(trainer, bf16_evaluation_matches_the_bf16_predictor_and_leaves_torch_s_generator_alone) {
  TempDir dir;
  const fs::path data = write_halves_dataset(dir.path(), 32);
  TrainerOptions options = small_options(data);
  options.precision = Precision::bf16;
  Trainer trainer(options);
  trainer.run_epoch();
  at::manual_seed(11);
  const at::Tensor expected_draw = at::randn({3});
  at::manual_seed(11);
  const EpochMetrics metrics = trainer.run_epoch();  // evaluates on an inference copy of the model
  EXPECT_TRUE(at::equal(at::randn({3}), expected_draw));
  trainer.save_checkpoint(dir.path() / "model.pt");

  const Predictor predictor(dir.path() / "model.pt", "cpu", Precision::bf16);
  const SplitData test = load_split(data, "test");
  const double accuracy =
      predictor.predict(test.images).argmax(1).eq(test.labels).to(at::kDouble).mean().item<double>();
  EXPECT_DOUBLE_EQ(accuracy, metrics.test_accuracy);
}

TEST(trainer, streamed_training_over_the_memory_budget_gives_the_resident_metrics) {
  TempDir dir;
  const fs::path data = write_halves_dataset(dir.path(), 24);
  for (const std::int64_t limit : {std::int64_t{0}, std::int64_t{30}}) {
    TrainerOptions options = small_options(data);
    options.train_limit = limit;
    options.test_limit = limit;
    Trainer resident(options);
    options.data_memory_budget = 1;  // one byte: nothing fits, every split streams from its shards
    options.num_workers = 2;
    Trainer streamed(options);
    EXPECT_FALSE(resident.streams_data());
    EXPECT_TRUE(streamed.streams_data());
    EXPECT_EQ(streamed.train_size(), resident.train_size());
    for (int epoch = 0; epoch < 2; ++epoch) {
      const EpochMetrics a = resident.run_epoch();
      const EpochMetrics b = streamed.run_epoch();
      EXPECT_EQ(a.train_loss, b.train_loss) << "limit " << limit;
      EXPECT_EQ(a.train_accuracy, b.train_accuracy);
      EXPECT_EQ(a.test_loss, b.test_loss);
      EXPECT_EQ(a.test_accuracy, b.test_accuracy);
      EXPECT_EQ(a.data_wait_seconds, 0.0);
      EXPECT_GE(b.data_wait_seconds, 0.0);
    }
  }
}

TEST(trainer, trains_on_augmented_images_at_the_transforms_output_size) {
  TempDir dir;
  const fs::path data = write_halves_dataset(dir.path(), 24);
  TrainerOptions options = small_options(data);
  options.train_transform.random_resized_crop = RandomResizedCropOptions{10, 10, 0.6, 1.0};
  options.train_transform.horizontal_flip = 0.5;
  options.eval_transform.center_crop = std::pair{10, 10};
  Trainer trainer(options);
  EXPECT_EQ(trainer.model_spec().height, 10);
  EXPECT_EQ(trainer.model_spec().width, 10);
  EpochMetrics last;
  for (int epoch = 0; epoch < 3; ++epoch) last = trainer.run_epoch();
  EXPECT_GT(last.test_accuracy, 0.8);
  // Augmentation draws follow the seed: a second trainer gives the same metrics.
  Trainer again(options);
  for (int epoch = 0; epoch < 3; ++epoch) again.run_epoch();
  EXPECT_EQ(again.history().back().train_loss, last.train_loss);

  options.eval_transform.center_crop = std::pair{8, 8};
  EXPECT_THROW(Trainer{options}, DataError);  // 10x10 training images, 8x8 evaluation images
}

TEST(trainer, resuming_streamed_augmented_training_continues_exactly) {
  TempDir dir;
  const fs::path data = write_halves_dataset(dir.path(), 24);
  TrainerOptions options = small_options(data);
  options.data_memory_budget = 1;
  options.num_workers = 2;
  options.train_transform.random_resized_crop = RandomResizedCropOptions{10, 10, 0.6, 1.0};
  options.train_transform.color_jitter = ColorJitterOptions{0.3, 0.3, 0.0};
  options.eval_transform.resize = std::pair{10, 0};
  Trainer straight(options);
  straight.run_epoch();
  straight.save_checkpoint(dir.path() / "epoch1.pt");
  const EpochMetrics expected = straight.run_epoch();

  options.num_workers = 1;  // another worker count: the same batches
  Trainer resumed(options);
  resumed.load_checkpoint(dir.path() / "epoch1.pt");
  const EpochMetrics actual = resumed.run_epoch();
  EXPECT_EQ(actual.train_loss, expected.train_loss);
  EXPECT_EQ(actual.test_loss, expected.test_loss);
}

TEST(trainer, resuming_under_another_evaluation_transform_is_refused) {
  TempDir dir;
  const fs::path data = write_halves_dataset(dir.path(), 8);
  TrainerOptions options = small_options(data);
  options.eval_transform.center_crop = std::pair{10, 10};
  Trainer cropped(options);
  cropped.save_checkpoint(dir.path() / "cropped.pt");
  options.eval_transform.center_crop.reset();
  options.eval_transform.resize = std::pair{10, 10};
  Trainer resized(options);
  try {
    resized.load_checkpoint(dir.path() / "cropped.pt");
    FAIL() << "expected a DataError";
  } catch (const DataError& error) {
    EXPECT_NE(std::string(error.what()).find("another evaluation transform (transforms.eval)"), std::string::npos);
  }
}

}  // namespace
}  // namespace kiln
