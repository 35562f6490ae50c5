// Data-parallel training on a torch.distributed process group: the group Python created
// (torch.distributed.init_process_group under torchrun), found by its name in c10d's group registry,
// and the collectives the trainer needs from it. The c10d headers stay in distributed.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace kiln::detail {

// The trainer's view of one c10d process group (gloo on CPUs, NCCL on GPUs). Every collective is
// issued in the same order on every rank; a failure or timeout in one throws kiln::DistributedError.
class ProcessGroup {
 public:
  // The group registered under `name` (torch.distributed's ProcessGroup.group_name). Throws
  // kiln::DataError when no group of that name exists in this process.
  explicit ProcessGroup(const std::string& name);
  ~ProcessGroup();
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  const std::string& name() const { return name_; }
  std::string backend() const;

  // Overwrites `tensors` with rank `root`'s values (one collective per dtype, on flattened copies).
  void broadcast(const std::vector<at::Tensor>& tensors, int root = 0);
  // In-place sum (or maximum) over the ranks of one dense tensor; blocks until done.
  void all_reduce_sum(at::Tensor& tensor);
  void all_reduce_max(at::Tensor& tensor);

  // Starts a sum of `tensor` in place and returns at once; wait() on the result before reading it.
  class Pending {
   public:
    virtual ~Pending() = default;
    virtual void wait() = 0;
  };
  std::unique_ptr<Pending> all_reduce_sum_async(at::Tensor& tensor);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string name_;
  int rank_ = 0;
  int world_size_ = 1;
};

// Averages the gradients of `params` over the group while backward runs, as DDP's Reducer does:
// parameters are grouped in buckets in reverse order (the order backward produces their gradients),
// at most `bucket_bytes` each (the first `first_bucket_bytes`, so communication starts early); an
// autograd hook per parameter copies its gradient into its bucket, and a full bucket's all-reduce
// starts at once, in bucket order on every rank. finish() waits for them all and writes the averages
// into the parameters' .grad. Hooks live as long as the reducer.
class GradientReducer {
 public:
  GradientReducer(ProcessGroup& group, const std::vector<at::Tensor>& params, std::int64_t bucket_bytes,
                  std::int64_t first_bucket_bytes);
  ~GradientReducer();
  GradientReducer(const GradientReducer&) = delete;
  GradientReducer& operator=(const GradientReducer&) = delete;

  // After backward: launches what is left (a parameter that got no gradient counts as zero), waits,
  // divides by the world size and sets every parameter's gradient. Resets for the next backward.
  void finish();
  // Seconds spent blocked in finish() waiting for all-reduces (the communication backward did not hide).
  double wait_seconds() const { return wait_seconds_; }
  std::size_t buckets() const { return buckets_.size(); }

 private:
  struct Bucket {
    std::vector<std::size_t> params;    // indices into params_
    std::vector<std::int64_t> offsets;  // each one's start in `flat`
    at::Tensor flat;
    std::size_t ready = 0;
    std::unique_ptr<ProcessGroup::Pending> pending;
    bool launched = false;
  };
  void mark_ready(std::size_t param, const at::Tensor& grad);
  void launch_ready_buckets();

  ProcessGroup& group_;
  std::vector<at::Tensor> params_;
  std::vector<unsigned> hooks_;
  std::vector<std::pair<std::size_t, std::size_t>> place_;  // per parameter: (bucket, slot)
  std::vector<bool> seen_;
  std::vector<Bucket> buckets_;
  std::size_t next_bucket_ = 0;
  double wait_seconds_ = 0;
};

}  // namespace kiln::detail

namespace kiln {

// A collective failed or timed out: another rank died or cannot be reached.
class DistributedError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace kiln
