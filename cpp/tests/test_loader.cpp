#include "kiln/loader.hpp"

#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <vector>

#include "fixtures.hpp"
#include "kiln/error.hpp"
#include "kiln/normalize.hpp"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;
using testing::write_halves_dataset;

// 10 distinct 3x8x8 images whose pixels encode their index, labelled index % 4.
SampleSource numbered_images() {
  at::Tensor images = at::arange(10, at::kByte).view({10, 1, 1, 1}).expand({10, 3, 8, 8}).contiguous();
  return SampleSource::resident(images, at::arange(10, at::kLong).remainder(4));
}

// Every batch of one epoch over `order`, copied (the loader reuses its buffers).
std::vector<std::pair<at::Tensor, at::Tensor>> epoch_batches(BatchLoader& loader, const at::Tensor& order,
                                                             std::uint64_t epoch) {
  loader.start_epoch(order, epoch);
  std::vector<std::pair<at::Tensor, at::Tensor>> batches;
  while (auto batch = loader.next()) batches.emplace_back(batch->images.clone(), batch->labels.clone());
  return batches;
}

TEST(loader, gives_the_samples_of_the_order_in_batches_whatever_the_worker_count) {
  const at::Tensor order = at::tensor(std::vector<std::int64_t>{7, 2, 9, 0, 4, 4, 1}, at::kLong);
  for (int workers : {1, 3}) {
    LoaderOptions options;
    options.batch_size = 3;
    options.num_workers = workers;
    BatchLoader loader(numbered_images(), ImageTransform(), options);
    const auto batches = epoch_batches(loader, order, 0);
    ASSERT_EQ(batches.size(), 3u) << workers << " workers";
    EXPECT_EQ(batches.back().first.size(0), 1);  // 7 samples in batches of 3
    const at::Tensor images = at::cat({batches[0].first, batches[1].first, batches[2].first});
    const at::Tensor labels = at::cat({batches[0].second, batches[1].second, batches[2].second});
    EXPECT_TRUE(at::equal(images.select(1, 0).select(1, 0).select(1, 0).to(at::kLong), order));
    EXPECT_TRUE(at::equal(labels, order.remainder(4)));
  }
}

TEST(loader, augmented_batches_depend_on_seed_and_epoch_not_on_the_worker_count) {
  TrainTransformOptions train;
  train.random_resized_crop = RandomResizedCropOptions{6, 6};
  train.horizontal_flip = 0.5;
  at::Tensor images = at::randint(0, 256, {10, 3, 8, 8}, at::kByte);
  const SampleSource source = SampleSource::resident(images, at::zeros({10}, at::kLong));
  const at::Tensor order = at::arange(10, at::kLong);
  const auto run = [&](int workers, std::uint64_t epoch) {
    LoaderOptions options;
    options.batch_size = 4;
    options.num_workers = workers;
    options.seed = 5;
    BatchLoader loader(source, ImageTransform(train, {}, 3), options);
    EXPECT_EQ(loader.output_image(), (ImageSpec{3, 6, 6}));
    std::vector<at::Tensor> images;
    for (auto& [batch, labels] : epoch_batches(loader, order, epoch)) images.push_back(batch);
    return at::cat(images);
  };
  const at::Tensor one_worker = run(1, 0);
  EXPECT_TRUE(at::equal(one_worker, run(3, 0)));
  EXPECT_FALSE(at::equal(one_worker, run(1, 1)));
}

TEST(loader, starting_an_epoch_early_abandons_the_last_one_cleanly) {
  LoaderOptions options;
  options.batch_size = 2;
  options.num_workers = 2;
  BatchLoader loader(numbered_images(), ImageTransform(), options);
  loader.start_epoch(at::arange(10, at::kLong), 0);
  ASSERT_TRUE(loader.next());
  const auto batches = epoch_batches(loader, at::arange(9, -1, -1, at::kLong), 1);
  ASSERT_EQ(batches.size(), 5u);
  EXPECT_EQ(batches.front().first[0][0][0][0].item<int>(), 9);
  EXPECT_GE(loader.wait_seconds(), 0.0);
}

TEST(loader, an_index_outside_the_split_fails_the_epoch_with_a_clear_error) {
  LoaderOptions options;
  options.batch_size = 2;
  BatchLoader loader(numbered_images(), ImageTransform(), options);
  loader.start_epoch(at::tensor(std::vector<std::int64_t>{1, 2, 12, 3}, at::kLong), 0);
  ASSERT_TRUE(loader.next());
  try {
    loader.next();
    FAIL() << "expected a DataError";
  } catch (const DataError& error) {
    EXPECT_NE(std::string(error.what()).find("sample index 12 is outside the split's 10 samples"), std::string::npos);
  }
  EXPECT_FALSE(loader.next());
}

TEST(loader, streams_a_processed_split_from_its_shards_as_it_is_stored) {
  TempDir dir;
  const fs::path data = write_halves_dataset(dir.path(), 20);
  const Manifest manifest = read_manifest(data);
  const SplitData resident = load_split(data, "train");
  LoaderOptions options;
  options.batch_size = 16;
  options.num_workers = 2;
  BatchLoader loader(SampleSource::streamed(std::make_shared<const SplitReader>(data, manifest, "train")),
                     ImageTransform(), options);
  const at::Tensor order = at::randperm(resident.images.size(0), at::kLong);
  std::vector<at::Tensor> images, labels;
  for (auto& [batch, batch_labels] : epoch_batches(loader, order, 0)) {
    images.push_back(batch);
    labels.push_back(batch_labels);
  }
  EXPECT_TRUE(at::equal(at::cat(images), resident.images.index_select(0, order)));
  EXPECT_TRUE(at::equal(at::cat(labels), resident.labels.index_select(0, order)));
}

TEST(loader, normalises_in_the_workers_as_the_trainer_s_normalizer_does) {
  at::Tensor images = at::randint(0, 256, {6, 3, 5, 7}, at::kByte);
  const std::vector<double> mean{0.2, 0.5, 0.7};
  const std::vector<double> std{0.3, 0.25, 0.1};
  const at::Tensor expected = Normalizer(mean, std, at::kCPU)(images);
  for (const bool channels_last : {false, true}) {
    LoaderOptions options;
    options.batch_size = 4;
    options.num_workers = 2;
    options.mean = mean;
    options.std = std;
    options.channels_last = channels_last;
    BatchLoader loader(SampleSource::resident(images, at::zeros({6}, at::kLong)), ImageTransform(), options);
    loader.start_epoch(at::arange(6, at::kLong), 0);
    std::vector<at::Tensor> batches;
    while (auto batch = loader.next()) {
      EXPECT_EQ(batch->images.scalar_type(), at::kFloat);
      EXPECT_EQ(batch->images.is_contiguous(at::MemoryFormat::ChannelsLast) && !batch->images.is_contiguous(),
                channels_last);
      batches.push_back(batch->images.clone());
    }
    EXPECT_TRUE(at::allclose(at::cat(batches), expected, 1e-6, 1e-6)) << "channels_last " << channels_last;
  }
  LoaderOptions wrong;
  wrong.mean = {0.5};
  wrong.std = {0.5};
  EXPECT_THROW(BatchLoader(SampleSource::resident(images, at::zeros({6}, at::kLong)), ImageTransform(), wrong),
               DataError);
}

TEST(loader, a_rank_s_share_of_the_epoch_draws_the_augmentation_of_its_global_positions) {
  TrainTransformOptions train;
  train.random_resized_crop = RandomResizedCropOptions{6, 6};
  train.horizontal_flip = 0.5;
  const SampleSource source =
      SampleSource::resident(at::randint(0, 256, {10, 3, 8, 8}, at::kByte), at::zeros({10}, at::kLong));
  LoaderOptions options;
  options.batch_size = 3;
  BatchLoader whole(source, ImageTransform(train, {}, 3), options);
  std::vector<at::Tensor> all;
  for (auto& [images, labels] : epoch_batches(whole, at::arange(10, at::kLong), 4)) all.push_back(images);
  const at::Tensor global = at::cat(all);
  // Rank 1 of 2 takes positions 1, 3, 5, ... of the epoch's order.
  BatchLoader rank1(source, ImageTransform(train, {}, 3), options);
  rank1.start_epoch(at::arange(1, 10, 2, at::kLong), 4, /*first_position=*/1, /*position_stride=*/2);
  std::vector<at::Tensor> share;
  while (auto batch = rank1.next()) share.push_back(batch->images.clone());
  EXPECT_TRUE(at::equal(at::cat(share), global.slice(0, 1, 10, 2)));
}

}  // namespace
}  // namespace kiln
