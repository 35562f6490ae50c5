#include "kiln/checkpoint.hpp"

#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <string>
#include <vector>

#include "fixtures.hpp"
#include "kiln/detail/tensor_file.hpp"
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
                                            "normalization", "transform", "optimizer", "scheduler", "epoch", "history",
                                            "rng", "options", "int8_calibration", "integrity"}));
  // No evaluation transform: the version every kiln reads, and the stored images are the model's input.
  EXPECT_EQ(checkpoint.at("format_version").toInt(), 1);
  const auto transform = checkpoint.at("transform").toGenericDict();
  std::vector<std::int64_t> shape;
  for (const auto& side : transform.at("image_shape").toListRef()) shape.push_back(side.toInt());
  EXPECT_EQ(shape, (std::vector<std::int64_t>{1, 12, 12}));
  EXPECT_TRUE(transform.at("resize").isNone());
  EXPECT_TRUE(transform.at("center_crop").isNone());
  std::vector<std::string> rng;
  for (const auto& entry : checkpoint.at("rng").toGenericDict()) rng.push_back(entry.key().toStringRef());
  EXPECT_EQ(rng, (std::vector<std::string>{"torch_cpu", "dropout_seed", "dropout_offset", "shuffle"}));
  EXPECT_EQ(checkpoint.at("options").toGenericDict().at("precision").toStringRef(), "fp32");
}

TrainingState small_state() {
  TrainingState written;
  written.model.spec = {"mnist_cnn", 1, 2, 12, 12};
  written.model.classes = {"down", "up"};
  written.model.mean = {0.5};
  written.model.std = {0.25};
  written.model.epoch = 2;
  written.model.state_dict = module_state_dict(*make_model(written.model.spec));
  written.model.calibration = {{1.5, 2.5, 3.5}, 40};
  c10::impl::GenericDict optimizer(c10::StringType::get(), c10::AnyType::get());
  c10::impl::GenericDict group(c10::StringType::get(), c10::AnyType::get());
  group.insert("lr", 1.3);
  group.insert("weight_decay", 0.0);
  optimizer.insert("state", c10::impl::GenericDict(c10::IntType::get(), c10::AnyType::get()));
  optimizer.insert("param_groups", detail::plain_list(std::vector<c10::IValue>{group}));
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
  return written;
}

TEST(checkpoint, training_state_reads_back_as_written) {
  TempDir dir;
  const TrainingState written = small_state();
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
  const auto group = read.optimizer.toGenericDict().at("param_groups").toListRef().at(0).toGenericDict();
  EXPECT_EQ(group.at("lr").toDouble(), 1.3);
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
  EXPECT_TRUE(
      at::equal(weights.at("fc2.bias").toTensor(), written.model.state_dict.toGenericDict().at("fc2.bias").toTensor()));
  EXPECT_EQ(read_checkpoint(path).at("options").toGenericDict().at("precision").toStringRef(), "bf16");
}

TEST(checkpoint, missing_files_other_files_and_other_models_are_refused) {
  TempDir dir;
  const fs::path data = testing::write_halves_dataset(dir.path(), 8);
  Trainer trainer(testing::small_options(data));
  EXPECT_THROW(trainer.load_checkpoint(dir.path() / "missing.pt"), NotFoundError);
  c10::impl::GenericDict tensors(c10::StringType::get(), c10::AnyType::get());
  tensors.insert("images", at::zeros({2, 1, 12, 12}, at::kByte));
  detail::save_ivalue(dir.path() / "tensors.pt", tensors);
  EXPECT_THROW(trainer.load_checkpoint(dir.path() / "tensors.pt"), DataError);  // a tensor file, not a checkpoint
  TrainerOptions options = testing::small_options(data);
  options.model = "resnet8";
  Trainer other(options);
  other.save_checkpoint(dir.path() / "resnet.pt");
  EXPECT_THROW(trainer.load_checkpoint(dir.path() / "resnet.pt"), DataError);
}

// What loading `path` for training says is wrong with it; "" if it loads.
std::string refusal(const fs::path& path) {
  try {
    read_training_state(read_checkpoint(path), path);
    const CheckpointModel model = checkpoint_model(read_checkpoint(path), path);
    load_module_state_dict(*make_model(model.spec), model.state_dict, "checkpoint '" + path.string() + "'");
    return "";
  } catch (const DataError& error) {
    return error.what();
  }
}

void write_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// The checkpoint at `from` with `change` applied to its dict, saved to `to` as torch.save would.
template <typename Change>
fs::path edited(const fs::path& from, const fs::path& to, Change change) {
  c10::impl::GenericDict checkpoint = read_checkpoint(from);
  change(checkpoint);
  detail::save_ivalue(to, checkpoint);
  return to;
}

c10::impl::GenericDict dict_at(c10::impl::GenericDict parent, const char* key) {
  return parent.at(key).toGenericDict();
}

void drop(c10::impl::GenericDict dict, const char* key) {
  ASSERT_EQ(dict.erase(key), 1u) << key;
}

TEST(checkpoint, every_damage_is_refused_in_one_line_naming_the_file_and_the_fault) {
  TempDir dir;
  const fs::path good = dir.path() / "good.pt";
  write_checkpoint(good, small_state());
  ASSERT_EQ(refusal(good), "");
  const std::string bytes = read_bytes(good);
  const auto file = [&dir](const char* name) { return dir.path() / name; };

  std::vector<std::pair<fs::path, std::string>> cases;
  write_bytes(file("empty.pt"), "");
  cases.emplace_back(file("empty.pt"), "empty file (0 bytes)");
  write_bytes(file("half.pt"), bytes.substr(0, bytes.size() / 2));
  cases.emplace_back(file("half.pt"), "truncated (zip central directory missing)");
  write_bytes(file("cut.pt"), bytes.substr(0, bytes.size() - 10));
  cases.emplace_back(file("cut.pt"), "truncated (zip central directory cut short)");
  write_bytes(file("text.pt"), "model weights: see the wiki\n");
  cases.emplace_back(file("text.pt"), "not a zip archive as torch.save writes (it starts with bytes 6d 6f 64");
  fs::create_directory(file("folder.pt"));
  cases.emplace_back(file("folder.pt"), "not a regular file");
  std::string renamed = bytes;  // the first tensor's record, renamed in the local and central headers
  for (auto at = renamed.find("/data/0"); at != std::string::npos; at = renamed.find("/data/0", at + 1)) {
    renamed[at + 2] = 'o';  // miniz finds records case-insensitively
  }
  write_bytes(file("record.pt"), renamed);
  cases.emplace_back(file("record.pt"), "record 'data/0' is missing from the zip archive");
  std::string claims = bytes;  // the pickle's "format" string claiming 2 GiB: refused before any allocation
  const std::string format_key("X\x06\0\0\0format", 11);
  ASSERT_NE(claims.find(format_key), std::string::npos);
  claims.replace(claims.find(format_key), 5, std::string("X\xff\xff\xff\x7f", 5));
  write_bytes(file("claims.pt"), claims);
  cases.emplace_back(file("claims.pt"), "is damaged: data.pkl claims 2147483647 bytes at byte ");
  std::string compressed = bytes;  // the first record marked deflated in the central directory
  compressed[compressed.find(std::string("PK\x01\x02", 4)) + 10] = 8;
  write_bytes(file("compressed.pt"), compressed);
  cases.emplace_back(file("compressed.pt"), "/data.pkl' is compressed; torch.save stores records uncompressed");
  c10::impl::GenericDict other(c10::StringType::get(), c10::AnyType::get());
  other.insert("weights", at::ones({3}));
  detail::save_ivalue(file("other.pt"), other);
  cases.emplace_back(file("other.pt"), "not a kiln checkpoint (no 'format': 'kiln-checkpoint' entry)");
  detail::save_ivalue(file("list.pt"), c10::IValue(detail::plain_list(std::vector<std::int64_t>{1, 2})));
  cases.emplace_back(file("list.pt"), "not a kiln checkpoint (it holds a list, not a dict)");
  edited(good, file("no_model.pt"), [](auto& c) {
    drop(c, "integrity");
    drop(c, "model");
  });
  cases.emplace_back(file("no_model.pt"), "has no 'model' entry");
  edited(good, file("version.pt"), [](auto& c) { c.insert_or_assign("format_version", std::string("one")); });
  cases.emplace_back(file("version.pt"), "'format_version' is a str, expected an int");
  edited(good, file("height.pt"), [](auto& c) { dict_at(c, "model").insert_or_assign("height", std::string("12")); });
  cases.emplace_back(file("height.pt"), "'model.height' is a str, expected an int");
  edited(good, file("name.pt"), [](auto& c) { dict_at(c, "model").insert_or_assign("name", std::string("nnist")); });
  cases.emplace_back(file("name.pt"), "'model.name' is 'nnist', a model this kiln does not know (known: mnist_cnn, ");
  edited(good, file("width.pt"), [](auto& c) { dict_at(c, "model").insert_or_assign("width", std::int64_t{-5}); });
  cases.emplace_back(file("width.pt"), "'model.width' is -5, expected an image side of 1 to 16384 pixels");
  edited(good, file("weights.pt"), [](auto& c) {
    drop(c, "integrity");
    dict_at(c, "model").insert_or_assign("state_dict", std::int64_t{5});
  });
  cases.emplace_back(file("weights.pt"), "'model.state_dict' is an int, expected a dict");
  edited(good, file("mean.pt"), [](auto& c) {
    dict_at(c, "normalization").insert_or_assign("mean", detail::plain_list(std::vector<std::string>{"x"}));
  });
  cases.emplace_back(file("mean.pt"), "'normalization.mean[0]' is a str, expected a number");
  edited(good, file("history.pt"),
         [](auto& c) { c.insert_or_assign("history", detail::plain_list(std::vector<std::int64_t>{1})); });
  cases.emplace_back(file("history.pt"), "'history[0]' is an int, expected a dict");
  edited(good, file("rng.pt"), [](auto& c) {
    drop(c, "integrity");
    c.insert_or_assign("rng", std::int64_t{1});
  });
  cases.emplace_back(file("rng.pt"), "'rng' is an int, expected a dict");
  edited(good, file("optimizer.pt"), [](auto& c) {
    c10::impl::GenericDict optimizer(c10::StringType::get(), c10::AnyType::get());
    optimizer.insert("state", c10::impl::GenericDict(c10::IntType::get(), c10::AnyType::get()));
    c.insert_or_assign("optimizer", optimizer);
  });
  cases.emplace_back(file("optimizer.pt"), "has no 'optimizer.param_groups' entry");
  edited(good, file("shape.pt"), [](auto& c) {
    drop(c, "integrity");
    dict_at(dict_at(c, "model"), "state_dict").insert_or_assign("fc2.bias", at::zeros({3}));
  });
  cases.emplace_back(file("shape.pt"), "'fc2.bias' has shape [3], the model expects [2]");
  edited(good, file("missing.pt"), [](auto& c) {
    drop(c, "integrity");
    drop(dict_at(dict_at(c, "model"), "state_dict"), "fc2.bias");
  });
  cases.emplace_back(file("missing.pt"), "has no tensor 'fc2.bias' for this model");
  edited(good, file("dtype.pt"), [](auto& c) {
    drop(c, "integrity");
    dict_at(dict_at(c, "model"), "state_dict").insert_or_assign("fc2.bias", at::zeros({2}, at::kLong));
  });
  cases.emplace_back(file("dtype.pt"), "'fc2.bias' is a Long tensor, the model expects Float");

  for (const auto& [path, fault] : cases) {
    const std::string message = refusal(path);
    EXPECT_NE(message.find(fault), std::string::npos) << path << ": " << message;
    EXPECT_NE(message.find("'" + path.string() + "'"), std::string::npos) << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  }
}

TEST(checkpoint, a_flipped_bit_in_tensor_data_is_refused_naming_the_tensor) {
  TempDir dir;
  const fs::path path = dir.path() / "model.pt";
  TrainingState state = small_state();
  const at::Tensor weight = state.model.state_dict.toGenericDict().at("conv1.weight").toTensor();
  write_checkpoint(path, state);
  std::string bytes = read_bytes(path);
  const std::string stored(static_cast<const char*>(weight.data_ptr()), weight.nbytes());
  const auto at = bytes.find(stored);
  ASSERT_NE(at, std::string::npos);
  bytes[at + stored.size() / 2] ^= 0x04;
  write_bytes(path, bytes);
  EXPECT_EQ(refusal(path), "checkpoint '" + path.string() +
                               "': tensor 'model.state_dict.conv1.weight' does not match its checksum; the file is "
                               "damaged");
}

TEST(checkpoint, checkpoints_written_before_checksums_load_unverified) {
  TempDir dir;
  write_checkpoint(dir.path() / "model.pt", small_state());
  const fs::path old = edited(dir.path() / "model.pt", dir.path() / "old.pt", [](auto& c) { drop(c, "integrity"); });
  EXPECT_EQ(refusal(old), "");
}

TEST(checkpoint, edited_tensors_are_refused_unless_the_checksums_are_removed) {
  TempDir dir;
  write_checkpoint(dir.path() / "model.pt", small_state());
  const fs::path path = edited(dir.path() / "model.pt", dir.path() / "edited.pt", [](auto& c) {
    dict_at(dict_at(c, "model"), "state_dict").insert_or_assign("extra", at::zeros({1}));
  });
  EXPECT_NE(refusal(path).find("tensor 'model.state_dict.extra' has no checksum"), std::string::npos);
  const fs::path dropped =
      edited(dir.path() / "model.pt", dir.path() / "dropped.pt", [](auto& c) { drop(dict_at(c, "rng"), "shuffle"); });
  EXPECT_NE(refusal(dropped).find("tensor 'rng.shuffle' is missing, though its checksums list it"), std::string::npos);
}

TEST(checkpoint, non_finite_weights_are_refused_on_load_naming_the_tensor) {
  TempDir dir;
  write_checkpoint(dir.path() / "model.pt", small_state());
  for (const double bad : {NAN, INFINITY}) {
    const fs::path path = edited(dir.path() / "model.pt", dir.path() / "diverged.pt", [bad](auto& c) {
      drop(c, "integrity");  // as in checkpoints written before kiln refused to write such weights
      dict_at(dict_at(c, "model"), "state_dict").at("fc1.weight").toTensor()[0][3] = bad;
    });
    EXPECT_NE(refusal(path).find("'fc1.weight' holds 1 NaN or infinite value(s) of"), std::string::npos)
        << refusal(path);
  }
}

TEST(checkpoint, non_finite_weights_are_not_written_and_the_previous_file_is_kept) {
  TempDir dir;
  const fs::path path = dir.path() / "model.pt";
  write_checkpoint(path, small_state());
  const std::string before = read_bytes(path);
  TrainingState diverged = small_state();
  diverged.model.state_dict.toGenericDict().at("fc2.bias").toTensor()[1] = NAN;
  EXPECT_THROW(write_checkpoint(path, diverged), TrainingError);
  EXPECT_EQ(read_bytes(path), before);
  EXPECT_EQ(std::distance(fs::directory_iterator(dir.path()), fs::directory_iterator()), 1);
}

// small_state's 12x12 model, trained on `stored` images that `eval` brings to 12x12.
TrainingState transformed_state(ImageSpec stored, EvalTransformOptions eval) {
  TrainingState state = small_state();
  state.model.stored_image = stored;
  state.model.eval_transform = eval;
  return state;
}

TEST(checkpoint, an_evaluation_transform_reads_back_as_written) {
  TempDir dir;
  const fs::path path = dir.path() / "model.pt";
  EvalTransformOptions eval;
  eval.resize = {{14, 0}};  // the shorter edge to 14: 20x30 -> 14x21
  eval.center_crop = {{12, 12}};
  write_checkpoint(path, transformed_state({1, 20, 30}, eval));
  const c10::impl::GenericDict checkpoint = read_checkpoint(path);
  EXPECT_EQ(checkpoint.at("format_version").toInt(), 2);  // older kilns refuse it instead of ignoring the transform
  const CheckpointModel model = checkpoint_model(checkpoint, path);
  EXPECT_EQ(model.stored_image, (ImageSpec{1, 20, 30}));
  EXPECT_EQ(model.eval_transform, eval);
  EXPECT_EQ(read_training_state(checkpoint, path).model.eval_transform, eval);
  // torch.load reads the entry as plain lists: a one-value resize is torchvision's Resize([size]).
  const auto transform = checkpoint.at("transform").toGenericDict();
  EXPECT_EQ(transform.at("resize").toListRef().size(), 1u);
  EXPECT_EQ(transform.at("center_crop").toListRef().size(), 2u);
}

TEST(checkpoint, checkpoints_written_before_transforms_load_as_the_model_s_input_untransformed) {
  TempDir dir;
  write_checkpoint(dir.path() / "model.pt", small_state());
  const fs::path old = edited(dir.path() / "model.pt", dir.path() / "old.pt", [](auto& c) { drop(c, "transform"); });
  const CheckpointModel model = checkpoint_model(read_checkpoint(old), old);
  EXPECT_EQ(model.stored_image, (ImageSpec{1, 12, 12}));
  EXPECT_EQ(model.eval_transform, EvalTransformOptions{});
  EXPECT_EQ(refusal(old), "");
}

TEST(checkpoint, a_transform_that_does_not_make_the_model_s_input_is_neither_written_nor_read) {
  TempDir dir;
  const fs::path path = dir.path() / "model.pt";
  EvalTransformOptions crop10;
  crop10.center_crop = {{10, 10}};
  const std::string written =
      testing::error_message<DataError>([&] { write_checkpoint(path, transformed_state({1, 16, 16}, crop10)); });
  EXPECT_EQ(written, "not writing checkpoint '" + path.string() +
                         "': its evaluation transform (center_crop 10x10) makes 10x10 images of the 16x16 stored "
                         "ones ('transform.image_shape'), but the model takes 12x12 ('model.height' x 'model.width')");
  EXPECT_FALSE(fs::exists(path));

  EvalTransformOptions crop12;
  crop12.center_crop = {{12, 12}};
  write_checkpoint(path, transformed_state({1, 16, 16}, crop12));
  const auto set = [](c10::impl::GenericDict c, const char* key, c10::IValue value) {
    dict_at(c, "transform").insert_or_assign(key, std::move(value));
  };
  const auto sides = [](std::vector<std::int64_t> values) { return c10::IValue(detail::plain_list(values)); };
  std::vector<std::pair<fs::path, std::string>> cases;
  const auto file = [&dir](const char* name) { return dir.path() / name; };
  edited(path, file("crop.pt"), [&](auto& c) { set(c, "center_crop", sides({10, 10})); });
  cases.emplace_back(file("crop.pt"), "(center_crop 10x10) makes 10x10 images of the 16x16 stored ones");
  edited(path, file("no_crop.pt"), [&](auto& c) { set(c, "center_crop", c10::IValue()); });
  cases.emplace_back(file("no_crop.pt"), "(no transform) makes 16x16 images of the 16x16 stored ones");
  edited(path, file("channels.pt"), [&](auto& c) { set(c, "image_shape", sides({3, 16, 16})); });
  cases.emplace_back(file("channels.pt"), "'transform.image_shape' has 3 channel(s), the model takes 1");
  edited(path, file("zero.pt"), [&](auto& c) { set(c, "image_shape", sides({1, 0, 16})); });
  cases.emplace_back(file("zero.pt"), "'transform.image_shape[1]' is 0, expected an image side of 1 to 16384 pixels");
  edited(path, file("two.pt"), [&](auto& c) { set(c, "image_shape", sides({16, 16})); });
  cases.emplace_back(file("two.pt"), "'transform.image_shape' has 2 values, expected 3");
  edited(path, file("text.pt"), [&](auto& c) { set(c, "resize", c10::IValue(std::string("16"))); });
  cases.emplace_back(file("text.pt"), "'transform.resize' is a str, expected a list");
  edited(path, file("huge.pt"), [&](auto& c) { set(c, "resize", sides({1'000'000})); });
  cases.emplace_back(file("huge.pt"), "'transform.resize[0]' is 1000000, expected an image side of 1 to 16384 pixels");
  // A shorter-edge resize of a long thin image: refused before a 16000x16000000 buffer is allocated.
  edited(path, file("long.pt"), [&](auto& c) {
    set(c, "image_shape", sides({1, 16, 16000}));
    set(c, "resize", sides({16000}));
  });
  cases.emplace_back(file("long.pt"), "the resized images ('transform.resize') are 16000x16000000, over kiln's limits");
  for (const auto& [file_path, fault] : cases) {
    const std::string message = refusal(file_path);
    EXPECT_NE(message.find(fault), std::string::npos) << file_path << ": " << message;
    EXPECT_NE(message.find("checkpoint '" + file_path.string() + "'"), std::string::npos) << message;
  }
}

TEST(checkpoint, implausible_model_sizes_are_refused_before_any_model_is_built) {
  // An mnist_cnn of 4096x4096 inputs has an fc1 of 34 billion weights (137 GB): building the model to
  // find that the file's fc1 does not fit took all the memory there was.
  TempDir dir;
  write_checkpoint(dir.path() / "model.pt", small_state());
  const auto file = [&dir](const char* name) { return dir.path() / name; };
  const auto resize_model = [](std::int64_t height, std::int64_t width, std::int64_t channels) {
    return [=](c10::impl::GenericDict& c) {
      drop(c, "transform");  // as in the checkpoints written before kiln recorded it
      dict_at(c, "model").insert_or_assign("height", height);
      dict_at(c, "model").insert_or_assign("width", width);
      dict_at(c, "model").insert_or_assign("in_channels", channels);
    };
  };
  std::vector<std::pair<fs::path, std::string>> cases;
  edited(dir.path() / "model.pt", file("fc1.pt"), resize_model(4096, 4096, 1));
  cases.emplace_back(file("fc1.pt"),
                     "mnist_cnn's fc1 for 4096x4096 images ('model.height' x 'model.width') reads "
                     "267911424 values, but 'model.state_dict.fc1.weight' has shape [128, 1024]");
  edited(dir.path() / "model.pt", file("side.pt"), resize_model(12, 100'000, 1));
  cases.emplace_back(file("side.pt"), "'model.width' is 100000, expected an image side of 1 to 16384 pixels");
  edited(dir.path() / "model.pt", file("area.pt"), resize_model(16'000, 16'000, 1));
  cases.emplace_back(file("area.pt"),
                     "the model's input images ('model.height' x 'model.width') are 16000x16000, "
                     "over kiln's limits (16384 pixels a side, 89478485 pixels an image)");
  edited(dir.path() / "model.pt", file("channels.pt"), resize_model(12, 12, 100'000'000));
  cases.emplace_back(file("channels.pt"), "'model.in_channels' is 100000000, expected 1 (grayscale) or 3 (RGB)");
  for (const auto& [path, fault] : cases) {
    const std::string message = refusal(path);
    EXPECT_NE(message.find(fault), std::string::npos) << path << ": " << message;
    EXPECT_NE(message.find("checkpoint '" + path.string() + "'"), std::string::npos) << message;
  }
}

TEST(checkpoint, a_missing_optimizer_entry_is_refused_naming_the_file_and_the_entry) {
  // c10::Dict::at's std::out_of_range reached Python as an IndexError naming neither.
  TempDir dir;
  const fs::path data = testing::write_halves_dataset(dir.path(), 8);
  const fs::path good = dir.path() / "good.pt";
  {
    Trainer trainer(testing::small_options(data));  // Adadelta, kiln's default
    trainer.run_epoch();
    trainer.save_checkpoint(good);
  }
  const auto optimizer = [](c10::impl::GenericDict c) { return dict_at(c, "optimizer"); };
  const auto group = [&](c10::impl::GenericDict c) {
    return optimizer(c).at("param_groups").toListRef().at(0).toGenericDict();
  };
  std::vector<std::pair<fs::path, std::string>> cases;
  edited(good, dir.path() / "slot.pt", [&](auto& c) {
    drop(c, "integrity");
    optimizer(c).at("state").toGenericDict().at(std::int64_t{3}).toGenericDict().erase("square_avg");
  });
  cases.emplace_back(dir.path() / "slot.pt", "has no 'optimizer.state.3.square_avg' entry");
  edited(good, dir.path() / "step.pt", [&](auto& c) {
    drop(c, "integrity");
    optimizer(c).at("state").toGenericDict().at(std::int64_t{0}).toGenericDict().insert_or_assign("step", 1.5);
  });
  cases.emplace_back(dir.path() / "step.pt", "'optimizer.state.0.step' is a float, expected a tensor");
  edited(good, dir.path() / "eps.pt", [&](auto& c) { group(c).erase("eps"); });
  cases.emplace_back(dir.path() / "eps.pt", "has no 'optimizer.param_groups[0].eps' entry");
  for (const auto& [path, fault] : cases) {
    Trainer trainer(testing::small_options(data));
    const std::string message = testing::error_message<DataError>([&] { trainer.load_checkpoint(path); });
    EXPECT_NE(message.find(fault), std::string::npos) << path << ": " << message;
    EXPECT_NE(message.find("checkpoint '" + path.string() + "'"), std::string::npos) << message;
  }
}

}  // namespace
}  // namespace kiln
