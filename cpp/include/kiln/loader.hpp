// The streaming batch loader: C++ worker threads read samples (from memory or from shards on disk),
// decode encoded ones, transform them (kiln/augment.hpp) and collate them into reused uint8 batch
// buffers, a few batches ahead of the training loop. The order of samples is the caller's (the trainer's
// seeded permutation) and each sample's random transform is seeded by (seed, epoch, position), so the
// batches are the same whatever num_workers is.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "kiln/augment.hpp"
#include "kiln/decode.hpp"
#include "kiln/shard.hpp"

namespace kiln {

// Where a loader's samples come from: a split resident in memory (uint8 [N, C, H, W]) or on disk.
class SampleSource {
 public:
  static SampleSource resident(at::Tensor images, at::Tensor labels);
  static SampleSource streamed(std::shared_ptr<const SplitReader> reader);

  std::int64_t size() const;
  const ImageSpec& image() const;
  const at::Tensor& labels() const;
  const SplitReader* reader() const { return reader_.get(); }
  const at::Tensor& images() const { return images_; }

 private:
  at::Tensor images_;  // resident
  at::Tensor labels_;
  ImageSpec image_;
  std::shared_ptr<const SplitReader> reader_;  // streamed
};

struct LoaderOptions {
  std::int64_t batch_size = 32;
  int num_workers = 0;         // threads; 0: one per core
  int prefetch_batches = 2;    // batches ready ahead of the loop, per worker
  std::uint64_t seed = 1;
  std::int64_t max_image_pixels = kDefaultMaxImagePixels;  // for encoded samples
  bool pin_memory = false;  // batch buffers in page-locked memory, for fast copies to a GPU
  // With one mean and std per channel ([0, 1] scale, as the manifest's), batches are float32
  // (pixel / 255 - mean) / std, computed by the workers while collating (torchvision's DataLoader
  // normalises in its workers too); channels_last lays them out as NHWC. Empty: uint8 batches.
  std::vector<double> mean;
  std::vector<double> std;
  bool channels_last = false;
};

struct Batch {
  at::Tensor images;  // uint8 [B, C, H', W'] (float32 when normalising; reused by the loader after the next next())
  at::Tensor labels;  // int64 [B]
  std::int64_t index = 0;  // position of the batch in the epoch
};

class BatchLoader {
 public:
  BatchLoader(SampleSource source, ImageTransform transform, LoaderOptions options);
  ~BatchLoader();  // stops and joins the workers
  BatchLoader(const BatchLoader&) = delete;
  BatchLoader& operator=(const BatchLoader&) = delete;

  // Starts an epoch over `order` (int64 sample indices into the source, the batches' samples in
  // order); `epoch` seeds the random transforms. Batches come out in order from next(). The sample at
  // order[i] draws its transform as the sample at position first_position + i * position_stride of the
  // epoch: data-parallel rank r of W passes (r, W), so its draws are those of the global epoch's positions.
  void start_epoch(at::Tensor order, std::uint64_t epoch, std::uint64_t first_position = 0,
                   std::uint64_t position_stride = 1);
  // The next batch, or nullopt when the epoch is done. Throws kiln::DataError for a sample that cannot be
  // read or decoded (naming its shard and index). The returned tensors are valid until the next call.
  std::optional<Batch> next();
  // Seconds next() has waited for workers since start_epoch (the loop waiting on data).
  double wait_seconds() const;
  // The (channels, height, width) of the batches' images.
  ImageSpec output_image() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace kiln
