#include "kiln/trainer.hpp"

#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <random>

#include "kiln/checkpoint.hpp"
#include "kiln/error.hpp"
#include "kiln/optimizer.hpp"
#include "kiln/predictor.hpp"
#include "test_helpers.hpp"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;
using testing::write_image;

// Two easy classes: the bright half of the image is the top ("up") or the bottom ("down").
fs::path write_halves_dataset(const fs::path& root, int per_class) {
  std::mt19937 noise(7);
  for (const char* split : {"train", "test"}) {
    for (int label = 0; label < 2; ++label) {
      for (int i = 0; i < per_class; ++i) {
        cv::Mat image(12, 12, CV_8UC1);
        for (int y = 0; y < 12; ++y) {
          for (int x = 0; x < 12; ++x) {
            const bool bright = (y < 6) == (label == 0);
            image.at<std::uint8_t>(y, x) = static_cast<std::uint8_t>((bright ? 180 : 40) + noise() % 60);
          }
        }
        write_image(root / "raw" / split / (label == 0 ? "up" : "down") / (std::to_string(i) + ".png"), image);
      }
    }
  }
  PrepareOptions options;
  options.raw_dir = root / "raw";
  options.out_dir = root / "processed";
  prepare_dataset(options);
  return options.out_dir;
}

TrainerOptions small_options(const fs::path& data) {
  TrainerOptions options;
  options.data_dir = data;
  options.lr = 1.0;
  options.train_batch_size = 16;
  options.test_batch_size = 10;
  options.seed = 3;
  return options;
}

TEST(adadelta, fused_cpu_step_matches_the_tensor_op_update) {
  at::manual_seed(0);
  at::Tensor fused = at::randn({1000}).set_requires_grad(true);
  at::Tensor reference = fused.detach().clone().to(at::kDouble).set_requires_grad(true);  // takes the op path
  Adadelta fused_optimizer({fused}, {1.3, 0.9, 1e-6, 0.01});
  Adadelta reference_optimizer({reference}, {1.3, 0.9, 1e-6, 0.01});
  for (int step = 0; step < 20; ++step) {
    const at::Tensor grad = at::randn({1000});
    fused.mutable_grad() = grad.clone();
    reference.mutable_grad() = grad.to(at::kDouble);
    fused_optimizer.step();
    reference_optimizer.step();
  }
  EXPECT_TRUE(at::allclose(fused.detach().to(at::kDouble), reference.detach(), 1e-5, 1e-6));
  const auto state = fused_optimizer.state_dict().toGenericDict().at("state").toGenericDict();
  EXPECT_EQ(state.at(0).toGenericDict().at("step").toTensor().item<double>(), 20.0);
}

TEST(adadelta, bf16_working_copy_is_the_float32_update_rounded) {
  // Mixed precision as the trainer sets it up: the parameter's data swapped for a bf16 copy, its
  // float32 storage kept as the master. The master takes exactly the float32 update of the (bf16)
  // gradient, in the fused kernel, and the bf16 tensor is what casting the master gives.
  at::manual_seed(1);
  const at::Tensor initial = at::randn({64, 300}).t();  // transposed strides, as fc1 stores its weight
  at::Tensor plain = initial.clone().set_requires_grad(true);
  at::Tensor working = initial.clone().set_requires_grad(true);
  Adadelta plain_optimizer({plain}, {1.3});
  Adadelta mixed_optimizer({working}, {1.3});
  const at::Tensor master = working.detach();
  working.set_data(master.to(at::kBFloat16));
  mixed_optimizer.set_master(0, master);
  ASSERT_EQ(working.strides(), master.strides());
  for (int step = 0; step < 10; ++step) {
    const at::Tensor grad = at::randn({64, 300}).t().to(at::kBFloat16);  // the layout backward gives
    plain.mutable_grad() = grad.to(at::kFloat);
    working.mutable_grad() = grad;
    plain_optimizer.step();
    mixed_optimizer.step();
  }
  EXPECT_TRUE(at::equal(master, plain.detach())) << (master - plain.detach()).abs().max().item<float>();
  EXPECT_TRUE(at::equal(working.detach(), plain.detach().to(at::kBFloat16)));
  mixed_optimizer.set_master(0, at::Tensor());
  working.set_data(master);  // as the trainer ends an epoch
  EXPECT_EQ(working.scalar_type(), at::kFloat);
}

TEST(model, fused_relu_max_pool_matches_torch_forward_and_backward) {
  at::manual_seed(2);
  for (const auto dtype : {at::kFloat, at::kBFloat16}) {
    for (const auto& size : std::vector<std::vector<std::int64_t>>{{3, 16, 8, 8}, {2, 8, 7, 9}}) {
      // Rounded values make ties (between positives and among negatives) common.
      const at::Tensor values = (at::randn(size) * 3).round().to(dtype).contiguous(at::MemoryFormat::ChannelsLast);
      at::Tensor ours = values.clone().set_requires_grad(true);
      at::Tensor theirs = values.clone().set_requires_grad(true);
      const at::Tensor out = relu_max_pool2x2(ours);
      const at::Tensor expected = at::max_pool2d(at::relu(theirs), {2, 2});
      ASSERT_TRUE(at::equal(out, expected)) << size;
      const at::Tensor grad = at::randn(expected.sizes()).to(dtype);
      out.backward(grad);
      expected.backward(grad);
      EXPECT_TRUE(at::equal(ours.grad(), theirs.grad())) << size;
      c10::NoGradGuard no_grad;  // evaluation takes the no-record path: same values
      EXPECT_TRUE(at::equal(relu_max_pool2x2(values), expected.detach())) << size;
    }
  }
}

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

TEST(trainer, diverging_loss_stops_with_a_clear_error) {
  TempDir dir;
  TrainerOptions options = small_options(write_halves_dataset(dir.path(), 24));
  options.lr = 1e30;
  Trainer trainer(options);
  try {
    for (int epoch = 0; epoch < 3; ++epoch) trainer.run_epoch();
    FAIL() << "expected TrainingError";
  } catch (const TrainingError& error) {
    EXPECT_NE(std::string(error.what()).find("NaN or inf"), std::string::npos) << error.what();
  }
}

TEST(trainer, bad_options_and_checkpoints_are_refused) {
  TempDir dir;
  const fs::path data = write_halves_dataset(dir.path(), 8);
  TrainerOptions options = small_options(data);
  options.model = "no_such_model";
  EXPECT_THROW(Trainer{options}, DataError);
  options = small_options(data);
  options.train_batch_size = 0;
  EXPECT_THROW(Trainer{options}, DataError);
  Trainer trainer(small_options(data));
  EXPECT_THROW(trainer.load_checkpoint(dir.path() / "missing.pt"), NotFoundError);
  EXPECT_THROW(trainer.load_checkpoint(data / "train.pt"), DataError);  // a tensor file, not a checkpoint
  options = small_options(data);
  options.model = "resnet8";
  Trainer other(options);
  other.save_checkpoint(dir.path() / "resnet.pt");
  EXPECT_THROW(trainer.load_checkpoint(dir.path() / "resnet.pt"), DataError);
}

TEST(predictor, gives_the_trained_model_s_predictions) {
  TempDir dir;
  const fs::path data = write_halves_dataset(dir.path(), 32);
  Trainer trainer(small_options(data));
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

  const Predictor predictor(dir.path() / "model.pt", "cpu", InferencePrecision::bf16);
  const SplitData test = load_split(data, "test");
  const double accuracy =
      predictor.predict(test.images).argmax(1).eq(test.labels).to(at::kDouble).mean().item<double>();
  EXPECT_DOUBLE_EQ(accuracy, metrics.test_accuracy);
}

TEST(model, both_architectures_produce_class_logits) {
  for (const auto& name : model_names()) {
    const auto model = make_model({name, 3, 5, 20, 16});
    EXPECT_EQ(model->forward(at::randn({2, 3, 20, 16})).sizes(), (std::vector<std::int64_t>{2, 5})) << name;
  }
  EXPECT_THROW(make_model({"mnist_cnn", 1, 10, 4, 4}), DataError);
}

}  // namespace
}  // namespace kiln
