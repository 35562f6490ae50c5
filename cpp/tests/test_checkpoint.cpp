#include "kiln/checkpoint.hpp"

#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "fixtures.hpp"
#include "kiln/error.hpp"
#include "kiln/trainer.hpp"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

TEST(checkpoint, holds_the_documented_entries_in_their_order) {
  // The order is part of the file's bytes: checkpoints of this and earlier versions stay alike.
  TempDir dir;
  Trainer trainer(testing::small_options(testing::write_halves_dataset(dir.path(), 8)));
  trainer.run_epoch();
  trainer.save_checkpoint(dir.path() / "model.pt");
  const c10::impl::GenericDict checkpoint = read_checkpoint(dir.path() / "model.pt");
  std::vector<std::string> keys;
  for (const auto& entry : checkpoint) keys.push_back(entry.key().toStringRef());
  EXPECT_EQ(keys, (std::vector<std::string>{"format", "format_version", "kiln_version", "model", "classes",
                                            "normalization", "optimizer", "scheduler", "epoch", "history", "rng",
                                            "options", "int8_calibration"}));
  std::vector<std::string> rng;
  for (const auto& entry : checkpoint.at("rng").toGenericDict()) rng.push_back(entry.key().toStringRef());
  EXPECT_EQ(rng, (std::vector<std::string>{"torch_cpu", "dropout_seed", "dropout_offset", "shuffle"}));
  EXPECT_EQ(checkpoint.at("options").toGenericDict().at("precision").toStringRef(), "fp32");
}

TEST(checkpoint, training_state_reads_back_as_written) {
  TempDir dir;
  TrainingState written;
  written.model.spec = {"mnist_cnn", 1, 2, 12, 12};
  written.model.classes = {"down", "up"};
  written.model.mean = {0.5};
  written.model.std = {0.25};
  written.model.epoch = 2;
  written.model.state_dict = module_state_dict(*make_model(written.model.spec));
  written.model.calibration = {{1.5, 2.5, 3.5}, 40};
  c10::impl::GenericDict optimizer(c10::StringType::get(), c10::AnyType::get());
  optimizer.insert("state", std::string("any"));
  written.optimizer = optimizer;
  written.base_lr = 1.3;
  written.gamma = 0.7;
  written.lr = 1.3 * 0.7 * 0.7;
  written.history = {{1, 0.5, 0.8, 0.4, 0.85, 1.3, 2.0}, {2, 0.3, 0.9, 0.2, 0.95, 0.91, 1.5}};
  written.torch_cpu_rng = at::arange(16, at::kByte);
  written.shuffle_rng = at::arange(8, at::kByte);
  written.dropout_seed = 123;
  written.dropout_offset = 4567;
  written.options.precision = Precision::bf16;
  const fs::path path = dir.path() / "state.pt";
  write_checkpoint(path, written);

  const TrainingState read = read_training_state(read_checkpoint(path), path);
  EXPECT_EQ(read.model.spec.name, "mnist_cnn");
  EXPECT_EQ(read.model.classes, written.model.classes);
  EXPECT_EQ(read.model.mean, written.model.mean);
  EXPECT_EQ(read.model.std, written.model.std);
  EXPECT_EQ(read.model.epoch, 2);
  EXPECT_EQ(read.model.calibration.activation_max, written.model.calibration.activation_max);
  EXPECT_EQ(read.model.calibration.images, 40);
  EXPECT_EQ(read.optimizer.toGenericDict().at("state").toStringRef(), "any");
  EXPECT_EQ(read.base_lr, 1.3);
  EXPECT_EQ(read.gamma, 0.7);
  EXPECT_EQ(read.lr, written.lr);
  ASSERT_EQ(read.history.size(), 2u);
  EXPECT_EQ(read.history[1].epoch, 2);
  EXPECT_EQ(read.history[1].learning_rate, 0.91);
  EXPECT_EQ(read.history[0].seconds, 2.0);
  EXPECT_TRUE(at::equal(read.torch_cpu_rng, written.torch_cpu_rng));
  EXPECT_FALSE(read.torch_device_rng.defined());
  EXPECT_TRUE(at::equal(read.shuffle_rng, written.shuffle_rng));
  EXPECT_EQ(read.dropout_seed, 123u);
  EXPECT_EQ(read.dropout_offset, 4567u);
  const auto weights = read.model.state_dict.toGenericDict();
  EXPECT_TRUE(at::equal(weights.at("fc2.bias").toTensor(),
                        written.model.state_dict.toGenericDict().at("fc2.bias").toTensor()));
  EXPECT_EQ(read_checkpoint(path).at("options").toGenericDict().at("precision").toStringRef(), "bf16");
}

TEST(checkpoint, missing_files_other_files_and_other_models_are_refused) {
  TempDir dir;
  const fs::path data = testing::write_halves_dataset(dir.path(), 8);
  Trainer trainer(testing::small_options(data));
  EXPECT_THROW(trainer.load_checkpoint(dir.path() / "missing.pt"), NotFoundError);
  EXPECT_THROW(trainer.load_checkpoint(data / "train.pt"), DataError);  // a tensor file, not a checkpoint
  TrainerOptions options = testing::small_options(data);
  options.model = "resnet8";
  Trainer other(options);
  other.save_checkpoint(dir.path() / "resnet.pt");
  EXPECT_THROW(trainer.load_checkpoint(dir.path() / "resnet.pt"), DataError);
}

}  // namespace
}  // namespace kiln
