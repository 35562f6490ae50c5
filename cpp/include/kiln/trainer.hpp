// The training loop behind `python src/train_model.py`: the processed dataset resident in memory (or
// on the GPU) when it fits data_memory_budget, else streamed from its shards by kiln::BatchLoader's
// threads; shuffled index batches from a seeded generator (the same samples either way), one call per epoch.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "kiln/dataset.hpp"
#include "kiln/model.hpp"
#include "kiln/progress.hpp"
#include "kiln/trainer_options.hpp"

namespace kiln {

class Trainer {
 public:
  // Throws kiln::DataError for unusable options or data.
  explicit Trainer(TrainerOptions options);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  // Trains one epoch, evaluates on the test split and steps the learning-rate schedule; progress
  // counts the epoch's training batches. Throws
  // kiln::TrainingError on a NaN/inf loss (the model is then unusable: reload a checkpoint) and
  // kiln::Cancelled when `progress` returns false; after either, the epoch counter is
  // unchanged but the weights hold the partial epoch's updates: load the last checkpoint to go on exactly.
  //
  // With `on_steps`, every `every_n_steps` training batches are also summarised as they finish (step
  // metrics, what MLflow's autologging shows of a training loop): called from the calling thread.
  EpochMetrics run_epoch(const ProgressFn& progress = {}, const StepMetricsFn& on_steps = {},
                         std::int64_t every_n_steps = 50);

  // Confusion matrix [true class, predicted class] of the last evaluation (int64 [K, K]).
  at::Tensor confusion_matrix() const;

  // Atomic; readable by torch.load(weights_only=True) and by kiln::Predictor.
  void save_checkpoint(const std::filesystem::path& path) const;
  // Restores model, optimizer, schedule, RNG state, epoch counter and history. Throws
  // kiln::DataError if the checkpoint is not for this model and dataset.
  void load_checkpoint(const std::filesystem::path& path);
  // Starts the model from pretrained weights before the first epoch (kiln::load_pretrained: the head
  // kept new for another class count, the stem adapted to the channels); returns what was adapted.
  std::vector<std::string> load_pretrained(const c10::IValue& state, const std::string& source);

  std::int64_t epoch() const;
  const std::vector<EpochMetrics>& history() const;
  const Manifest& manifest() const;
  const ModelSpec& model_spec() const;
  std::string device() const;
  std::int64_t train_size() const;
  std::int64_t test_size() const;
  // Whether the data is streamed from the dataset's shards (it is over data_memory_budget) rather than
  // resident, and how long this epoch's training has waited for the loader so far.
  bool streams_data() const;
  double data_wait_seconds() const;
  // Data-parallel (TrainerOptions::process_group): this process's rank and the group's size; 0 and 1
  // in one process.
  int rank() const;
  int world_size() const;

 private:
  struct State;
  // run_epoch's steps, in pytorch/examples cpp/mnist's shape. One pass over the shuffled training
  // split: sets metrics' train_loss and train_accuracy.
  void train_epoch(EpochMetrics& metrics, const ProgressFn& progress, const StepMetricsFn& on_steps,
                   std::int64_t every_n_steps);
  // The test split without gradients, in eval mode: sets test_loss and test_accuracy, the confusion
  // matrix and the int8 calibration.
  void evaluate(EpochMetrics& metrics);

  std::unique_ptr<State> state_;
};

class TrainingError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace kiln
