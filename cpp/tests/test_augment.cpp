#include "kiln/augment.hpp"

#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <filesystem>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "kiln/error.hpp"

namespace kiln {
namespace {

at::Tensor random_image(int channels, int height, int width, std::uint64_t seed) {
  at::Tensor image = at::empty({channels, height, width}, at::kByte);
  SampleRandom random(seed);
  auto* pixels = image.data_ptr<std::uint8_t>();
  for (std::int64_t i = 0; i < image.numel(); ++i) pixels[i] = static_cast<std::uint8_t>(random.next() >> 56);
  return image;
}

EvalTransformOptions eval(std::optional<std::pair<int, int>> resize,
                          std::optional<std::pair<int, int>> center_crop = std::nullopt) {
  EvalTransformOptions options;
  options.resize = resize;
  options.center_crop = center_crop;
  return options;
}

TrainTransformOptions all_augmentations() {
  TrainTransformOptions train;
  train.random_resized_crop = RandomResizedCropOptions{.height = 24, .width = 20};
  train.horizontal_flip = 0.5;
  train.color_jitter = ColorJitterOptions{.brightness = 0.4, .contrast = 0.4, .saturation = 0.4};
  train.random_erasing = RandomErasingOptions{.p = 0.5, .value = {10, 20, 30}};
  return train;
}

// The message of the DataError `make` throws, or "" when it throws none.
template <typename Make>
std::string error_of(Make&& make) {
  try {
    make();
  } catch (const DataError& error) {
    return error.what();
  }
  return "";
}

TEST(sample_random, same_seed_epoch_and_position_give_the_same_stream) {
  SampleRandom first(7, 2, 40);
  SampleRandom second(7, 2, 40);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(first.next(), second.next());
}

TEST(sample_random, neighbouring_positions_epochs_and_seeds_give_different_streams) {
  std::set<std::uint64_t> firsts;
  for (std::uint64_t seed = 0; seed < 4; ++seed) {
    for (std::uint64_t epoch = 0; epoch < 4; ++epoch) {
      for (std::uint64_t position = 0; position < 64; ++position) {
        firsts.insert(SampleRandom(seed, epoch, position).next());
      }
    }
  }
  EXPECT_EQ(firsts.size(), 4u * 4u * 64u);
}

TEST(sample_random, neighbouring_positions_are_uncorrelated) {
  // Bit by bit, the first draws of positions p and p + 1 agree about half the time.
  std::int64_t agreeing = 0;
  constexpr int kPositions = 4096;
  for (int position = 0; position < kPositions; ++position) {
    const std::uint64_t a = SampleRandom(1, 0, position).next();
    const std::uint64_t b = SampleRandom(1, 0, position + 1).next();
    agreeing += 64 - __builtin_popcountll(a ^ b);
  }
  EXPECT_NEAR(static_cast<double>(agreeing) / (64.0 * kPositions), 0.5, 0.01);
}

TEST(sample_random, uniform_and_integer_stay_in_their_ranges_and_cover_them) {
  SampleRandom random(3);
  std::set<std::int64_t> seen;
  double low = 1;
  double high = 0;
  for (int i = 0; i < 10000; ++i) {
    const double u = random.uniform(0.25, 0.75);
    ASSERT_GE(u, 0.25);
    ASSERT_LT(u, 0.75);
    low = std::min(low, u);
    high = std::max(high, u);
    const std::int64_t k = random.integer(-2, 4);
    ASSERT_GE(k, -2);
    ASSERT_LE(k, 4);
    seen.insert(k);
  }
  EXPECT_LT(low, 0.26);
  EXPECT_GT(high, 0.74);
  EXPECT_EQ(seen.size(), 7u);
  EXPECT_EQ(random.integer(5, 5), 5);
}

TEST(image_transform, training_output_is_deterministic_per_seed_epoch_and_position) {
  const ImageTransform transform(all_augmentations(), {}, 3);
  const at::Tensor image = random_image(3, 40, 50, 1);
  SampleRandom a(9, 1, 5);
  SampleRandom b(9, 1, 5);
  EXPECT_TRUE(at::equal(transform.apply(image, a), transform.apply(image, b)));
  std::set<std::string> outputs;
  for (int position = 0; position < 8; ++position) {
    SampleRandom random(9, 1, position);
    const at::Tensor out = transform.apply(image, random);
    outputs.insert(std::string(static_cast<const char*>(out.data_ptr()), out.numel()));
  }
  EXPECT_EQ(outputs.size(), 8u);
}

TEST(image_transform, pointer_apply_equals_tensor_apply_and_its_draw) {
  const ImageTransform transform(all_augmentations(), {}, 3);
  const at::Tensor image = random_image(3, 40, 50, 2);
  for (int position = 0; position < 20; ++position) {
    SampleRandom for_tensor(4, 0, position);
    SampleRandom for_pointer(4, 0, position);
    SampleRandom for_draw(4, 0, position);
    const at::Tensor expected = transform.apply(image, for_tensor);
    at::Tensor out = at::empty({3, 24, 20}, at::kByte);
    transform.apply(image.data_ptr<std::uint8_t>(), 40, 50, out.data_ptr<std::uint8_t>(), for_pointer);
    EXPECT_TRUE(at::equal(out, expected));
    const TransformDraw drawn = transform.draw(40, 50, for_draw);
    at::Tensor redone = at::empty({3, 24, 20}, at::kByte);
    transform.apply(image.data_ptr<std::uint8_t>(), 40, 50, redone.data_ptr<std::uint8_t>(), drawn);
    EXPECT_TRUE(at::equal(redone, expected));
  }
}

TEST(image_transform, output_sizes_follow_the_crop_or_the_evaluation_resize_and_crop) {
  EXPECT_EQ(ImageTransform(all_augmentations(), {}, 3).output_size(100, 70), std::pair(24, 20));
  EXPECT_EQ(ImageTransform::evaluation({}, 1).output_size(100, 70), std::pair(100, 70));
  // Resize(int): the shorter edge to 32, the other to int(32 * 100 / 70) = 45.
  EXPECT_EQ(ImageTransform::evaluation(eval(std::pair(32, 0)), 1).output_size(100, 70), std::pair(45, 32));
  EXPECT_EQ(ImageTransform::evaluation(eval(std::pair(32, 0)), 1).output_size(70, 100), std::pair(32, 45));
  EXPECT_EQ(ImageTransform::evaluation(eval(std::pair(16, 24)), 1).output_size(100, 70), std::pair(16, 24));
  const EvalTransformOptions resize_crop = eval(std::pair(32, 0), std::pair(28, 28));
  EXPECT_EQ(ImageTransform::evaluation(resize_crop, 1).output_size(100, 70), std::pair(28, 28));
  // Without a random_resized_crop, training resizes and crops as evaluation does.
  TrainTransformOptions flip_only;
  flip_only.horizontal_flip = 1;
  const ImageTransform train(flip_only, resize_crop, 1);
  EXPECT_EQ(train.output_size(100, 70), std::pair(28, 28));
  SampleRandom random(1);
  const at::Tensor image = random_image(1, 100, 70, 3);
  EXPECT_TRUE(at::equal(train.apply(image, random),
                        transforms::horizontal_flip(ImageTransform::evaluation(resize_crop, 1).apply(image, random))));
}

TEST(image_transform, says_whether_it_is_random_or_the_identity) {
  EXPECT_TRUE(ImageTransform::evaluation({}, 3).identity());
  EXPECT_FALSE(ImageTransform::evaluation({}, 3).random());
  EXPECT_FALSE(ImageTransform::evaluation(eval(std::nullopt, std::pair(8, 8)), 3).identity());
  EXPECT_TRUE(ImageTransform({}, {}, 3).identity());
  EXPECT_TRUE(ImageTransform(all_augmentations(), {}, 3).random());
  // Augmentations that can never change a pixel are not random: the loader may skip their draws.
  TrainTransformOptions never;
  never.color_jitter = ColorJitterOptions{};
  never.random_erasing = RandomErasingOptions{.p = 0};
  EXPECT_FALSE(never.any());
  EXPECT_TRUE(ImageTransform(never, {}, 3).identity());
  // Evaluation ignores any training options.
  EXPECT_FALSE(ImageTransform::evaluation({}, 3).random());
}

TEST(image_transform, an_evaluation_transform_ignores_the_random_stream) {
  const ImageTransform transform = ImageTransform::evaluation(eval(std::pair(30, 0), std::pair(24, 24)), 3);
  const at::Tensor image = random_image(3, 40, 50, 4);
  SampleRandom one(1);
  SampleRandom two(2);
  EXPECT_TRUE(at::equal(transform.apply(image, one), transform.apply(image, two)));
  EXPECT_TRUE(
      at::equal(transform.apply(image, one), transforms::center_crop(transforms::resize(image, 30, 37), 24, 24)));
}

TEST(transforms, horizontal_flip_reverses_every_row_and_twice_is_the_identity) {
  const at::Tensor image = random_image(3, 5, 7, 5);
  const at::Tensor flipped = transforms::horizontal_flip(image);
  EXPECT_TRUE(at::equal(flipped, image.flip(-1)));
  EXPECT_TRUE(at::equal(transforms::horizontal_flip(flipped), image));
}

TEST(transforms, crop_and_center_crop_copy_the_box_and_pad_outside_with_zeros) {
  const at::Tensor image = random_image(2, 6, 9, 6);
  EXPECT_TRUE(at::equal(transforms::crop(image, 1, 2, 3, 4), image.slice(1, 1, 4).slice(2, 2, 6)));
  // Odd margins: torchvision rounds (6 - 3) / 2 = 1.5 to 2 (half to even), (9 - 4) / 2 = 2.5 to 2.
  EXPECT_TRUE(at::equal(transforms::center_crop(image, 3, 4), image.slice(1, 2, 5).slice(2, 2, 6)));
  // Larger than the image: padded with (8 - 6) // 2 = 1 row above, 1 below.
  const at::Tensor padded = transforms::center_crop(image, 8, 9);
  EXPECT_TRUE(at::equal(padded.slice(1, 1, 7), image));
  EXPECT_EQ(padded.slice(1, 0, 1).sum().item<int64_t>(), 0);
  EXPECT_EQ(padded.slice(1, 7, 8).sum().item<int64_t>(), 0);
  const at::Tensor outside = transforms::crop(image, -2, 7, 4, 4);
  EXPECT_EQ(outside.slice(1, 0, 2).sum().item<int64_t>(), 0);
  EXPECT_EQ(outside.slice(2, 2, 4).sum().item<int64_t>(), 0);
  EXPECT_TRUE(at::equal(outside.slice(1, 2, 4).slice(2, 0, 2), image.slice(1, 0, 2).slice(2, 7, 9)));
}

TEST(transforms, resize_to_the_same_size_is_a_copy_and_resampling_keeps_a_flat_image_flat) {
  const at::Tensor image = random_image(3, 12, 10, 7);
  EXPECT_TRUE(at::equal(transforms::resize(image, 12, 10), image));
  const at::Tensor flat = at::full({3, 31, 17}, 77, at::kByte);
  EXPECT_TRUE(at::equal(transforms::resize(flat, 8, 9), at::full({3, 8, 9}, 77, at::kByte)));
  EXPECT_TRUE(at::equal(transforms::resize(flat, 40, 50), at::full({3, 40, 50}, 77, at::kByte)));
}

TEST(transforms, erase_fills_the_box_per_channel_and_nothing_else) {
  const at::Tensor image = random_image(3, 8, 8, 8);
  const at::Tensor erased = transforms::erase(image, 2, 3, 4, 2, {1, 2, 3});
  at::Tensor expected = image.clone();
  for (int c = 0; c < 3; ++c) expected[c].slice(0, 2, 6).slice(1, 3, 5).fill_(c + 1);
  EXPECT_TRUE(at::equal(erased, expected));
}

TEST(image_transform, erasing_rectangles_lie_inside_the_image) {
  TrainTransformOptions train;
  train.random_erasing = RandomErasingOptions{.p = 1, .scale_min = 0.02, .scale_max = 0.9, .value = {255}};
  const ImageTransform transform(train, {}, 1);
  const at::Tensor black = at::zeros({1, 13, 21}, at::kByte);
  int erased = 0;
  for (int position = 0; position < 300; ++position) {
    SampleRandom random(5, 0, position);
    const TransformDraw drawn = transform.draw(13, 21, random);
    if (!drawn.erase) continue;
    const CropBox box = *drawn.erase;
    ASSERT_GE(box.top, 0);
    ASSERT_GE(box.left, 0);
    ASSERT_LT(box.height, 13);
    ASSERT_LT(box.width, 21);
    ASSERT_LE(box.top + box.height, 13);
    ASSERT_LE(box.left + box.width, 21);
    SampleRandom again(5, 0, position);
    const at::Tensor out = transform.apply(black, again);
    EXPECT_EQ(out.sum().item<int64_t>(), 255LL * box.height * box.width);
    EXPECT_EQ(out.slice(1, box.top, box.top + box.height).slice(2, box.left, box.left + box.width).min().item<int>(),
              box.height * box.width > 0 ? 255 : 0);
    ++erased;
  }
  EXPECT_GT(erased, 250);
}

TEST(image_transform, random_resized_crops_lie_inside_the_image) {
  const RandomResizedCropOptions options{.height = 8, .width = 8};
  for (const auto& [height, width] : {std::pair(1, 1), std::pair(3, 200), std::pair(64, 48), std::pair(500, 2)}) {
    for (int position = 0; position < 200; ++position) {
      SampleRandom random(2, 0, position);
      const CropBox box = random_resized_crop_params(height, width, options, random);
      ASSERT_GE(box.top, 0);
      ASSERT_GE(box.left, 0);
      ASSERT_GE(box.height, 1);
      ASSERT_GE(box.width, 1);
      ASSERT_LE(box.top + box.height, height);
      ASSERT_LE(box.left + box.width, width);
    }
  }
}

TEST(image_transform, validation_errors_name_the_key_and_the_value) {
  auto with = [](auto change) {
    return error_of([&] {
      TrainTransformOptions train = all_augmentations();
      EvalTransformOptions evaluation;
      change(train, evaluation);
      ImageTransform(train, evaluation, 3);
    });
  };
  EXPECT_EQ(with([](auto&, auto&) {}), "");
  EXPECT_NE(with([](auto& t, auto&) {
              t.random_resized_crop->scale_min = 0.9, t.random_resized_crop->scale_max = 0.1;
            }).find("transforms.train.random_resized_crop.scale is [0.9, 0.1]: expected"),
            std::string::npos);
  EXPECT_NE(with([](auto& t, auto&) {
              t.random_resized_crop->height = 0;
            }).find("transforms.train.random_resized_crop.size is [0, 20]"),
            std::string::npos);
  EXPECT_NE(with([](auto& t, auto&) {
              t.random_resized_crop->ratio_min = 0;
            }).find("transforms.train.random_resized_crop.ratio"),
            std::string::npos);
  EXPECT_NE(with([](auto& t, auto&) { t.horizontal_flip = 1.5; }).find("transforms.train.horizontal_flip is 1.5"),
            std::string::npos);
  EXPECT_NE(
      with([](auto& t, auto&) { t.color_jitter->contrast = -1; }).find("transforms.train.color_jitter.contrast is -1"),
      std::string::npos);
  EXPECT_NE(with([](auto& t, auto&) { t.random_erasing->p = -0.1; }).find("transforms.train.random_erasing.p"),
            std::string::npos);
  EXPECT_NE(with([](auto& t, auto&) { t.random_erasing->scale_max = 2; }).find("transforms.train.random_erasing.scale"),
            std::string::npos);
  EXPECT_NE(with([](auto& t, auto&) {
              t.random_erasing->value = {1, 2};
            }).find("transforms.train.random_erasing.value is [1, 2]"),
            std::string::npos);
  EXPECT_NE(with([](auto& t, auto&) {
              t.random_erasing->value = {256};
            }).find("transforms.train.random_erasing.value is [256]"),
            std::string::npos);
  EXPECT_NE(with([](auto&, auto& e) { e.resize = std::pair(0, 0); }).find("transforms.eval.resize is [0, 0]"),
            std::string::npos);
  EXPECT_NE(
      with([](auto&, auto& e) { e.center_crop = std::pair(4, -1); }).find("transforms.eval.center_crop is [4, -1]"),
      std::string::npos);
  EXPECT_NE(error_of([] { ImageTransform(all_augmentations(), {}, 4); }).find("transforms.train.color_jitter"),
            std::string::npos);
  EXPECT_NE(error_of([] { transforms::adjust_brightness(random_image(3, 2, 2, 1), -1); }).find("factor is -1"),
            std::string::npos);
  EXPECT_NE(
      error_of([] { transforms::resize(at::zeros({2, 2}, at::kByte), 1, 1); }).find("expected a uint8 [C, H, W] image"),
      std::string::npos);
}

int thread_count() {
  int count = 0;
  for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator("/proc/self/task")) ++count;
  return count;
}

TEST(image_transform, worker_threads_start_no_aten_threads) {
  // Big enough that ATen would split the resampling across its intra-op threads.
  const ImageTransform transform(all_augmentations(), eval(std::pair(300, 0)), 3);
  const at::Tensor image = random_image(3, 600, 800, 9);
  const int before = thread_count();
  int during = 0;
  std::thread worker([&] {
    RandomResizedCropOptions big{.height = 512, .width = 512};
    SampleRandom random(1);
    at::Tensor out = at::empty({3, 512, 512}, at::kByte);
    for (int i = 0; i < 3; ++i) {
      const CropBox box = random_resized_crop_params(600, 800, big, random);
      const at::Tensor expected = transforms::resized_crop(image, box.top, box.left, box.height, box.width, 512, 512);
      ASSERT_EQ(expected.size(1), 512);
    }
    during = thread_count();
  });
  worker.join();
  EXPECT_EQ(during, before + 1);
}

}  // namespace
}  // namespace kiln
