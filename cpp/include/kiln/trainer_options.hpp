// What a training run is configured with (TrainerOptions) and what it reports, per epoch
// (EpochMetrics) and per batches as they finish (StepMetrics): the trainer's inputs and outputs, which
// its checkpoint records too. Kept apart from trainer.hpp so the checkpoint format (and inference,
// which reads checkpoints) does not depend on the trainer.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "kiln/augment.hpp"
#include "kiln/precision.hpp"

namespace kiln {

struct TrainerOptions {
  std::filesystem::path data_dir;
  std::string model = "mnist_cnn";
  double lr = 1.3;
  double gamma = 0.7;  // StepLR(step_size=1) after every epoch
  std::int64_t train_batch_size = 32;
  std::int64_t test_batch_size = 100;
  std::uint64_t seed = 1;
  std::string device = "cpu";  // "cpu", "cuda" or "cuda:N"
  Precision precision = Precision::fp32;  // fp32 or bf16; int8 is inference only
  bool channels_last = true;
  // The normalisation images train with, one value per channel (empty: the manifest's, measured on
  // the training split). Pretrained weights bring their own (ImageNet's); the checkpoint records it
  // so inference normalises the same way.
  std::vector<double> mean;
  std::vector<double> std;
  // "none" or "backbone": only the classifier head (the model's last layer) trains.
  std::string freeze = "none";
  // "adadelta" (the template's), "sgd" or "adamw" (kiln/optimizer.hpp).
  std::string optimizer = "adadelta";
  double momentum = 0.0;  // sgd
  bool nesterov = false;  // sgd
  double weight_decay = 0.0;
  std::string train_split = "train";
  std::string test_split = "test";
  // Use only the first N images of each split in a seeded random order (0 = all): quick runs, tests.
  std::int64_t train_limit = 0;
  std::int64_t test_limit = 0;
  // Decoded bytes of training and test images kept resident (in memory, or on the GPU); a dataset over
  // it is streamed from its shards by the loader's threads instead. 0: no limit, always resident.
  std::int64_t data_memory_budget = 0;
  // The loader's threads (read, decode, augment, collate) when streaming or augmenting; 0: one per core.
  int num_workers = 0;
  // Augmentation (training only) and the evaluation transform (evaluation, and after training every
  // inference path: it is saved in the checkpoint). The model's input size is their output size.
  TrainTransformOptions train_transform;
  EvalTransformOptions eval_transform;
  // Data-parallel training: the name of a torch.distributed process group in this process
  // (ProcessGroup.group_name; empty: one process, no communication). Every rank builds a Trainer
  // with the same options; each trains on its shard of every epoch (DistributedSampler's rule) with
  // train_batch_size images per batch and rank, and gradients are averaged over the group.
  std::string process_group;
  // Gradient buckets all-reduced while backward runs (DDP's defaults: 25 MB, the first 1 MB).
  std::int64_t bucket_bytes = 25 * 1024 * 1024;
  std::int64_t first_bucket_bytes = 1024 * 1024;
};

struct EpochMetrics {
  std::int64_t epoch = 0;  // 1-based, counting every epoch this model was trained (resumes included)
  double train_loss = 0;   // mean cross-entropy over the epoch's training batches
  double train_accuracy = 0;
  double test_loss = 0;
  double test_accuracy = 0;
  double learning_rate = 0;  // the rate this epoch trained with
  double seconds = 0;
  // Data-parallel: seconds this rank waited for gradient all-reduces that backward did not hide, and
  // for the epoch's metric reductions and broadcasts (0 in one process). Not saved in checkpoints.
  double communication_seconds = 0;
  // Seconds the training loop waited for the loader's batches (0 when the data is resident and not
  // augmented). Not saved in checkpoints.
  double data_wait_seconds = 0;
};

// The training batches since the last report, summarised while an epoch trains.
struct StepMetrics {
  std::int64_t step = 0;  // batches this model has trained, resumes included: epoch e's batch b is
                          // (e - 1) * batches per epoch + b, so steps continue across epochs and resumes
  double loss = 0;        // mean cross-entropy over the images of those batches
  double learning_rate = 0;
  double images_per_second = 0;  // training throughput over those batches
};
using StepMetricsFn = std::function<void(const StepMetrics&)>;

}  // namespace kiln
