#include "kiln/distributed.hpp"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <chrono>
#include <map>

#include "kiln/error.hpp"

namespace kiln::detail {
namespace {

using Clock = std::chrono::steady_clock;

// Waits for `work`, turning c10d's error (a peer gone, a timeout) into kiln::DistributedError.
void wait_for(const c10::intrusive_ptr<c10d::Work>& work, const std::string& what, const std::string& group) {
  try {
    work->wait();
  } catch (const std::exception& error) {
    throw DistributedError(what + " on process group '" + group +
                           "' failed (another rank stopped or cannot be reached): " + error.what());
  }
}

class PendingWork final : public ProcessGroup::Pending {
 public:
  PendingWork(c10::intrusive_ptr<c10d::Work> work, std::string group)
      : work_(std::move(work)), group_(std::move(group)) {}
  void wait() override { wait_for(work_, "gradient all-reduce", group_); }

 private:
  c10::intrusive_ptr<c10d::Work> work_;
  std::string group_;
};

}  // namespace

struct ProcessGroup::Impl {
  c10::intrusive_ptr<c10d::ProcessGroup> group;

  c10::intrusive_ptr<c10d::Work> all_reduce(at::Tensor& tensor, c10d::ReduceOp::RedOpType op) {
    std::vector<at::Tensor> tensors{tensor};
    c10d::AllreduceOptions options;
    options.reduceOp = op;
    return group->allreduce(tensors, options);
  }
};

ProcessGroup::ProcessGroup(const std::string& name) : impl_(std::make_unique<Impl>()), name_(name) {
  try {
    impl_->group = c10d::resolve_process_group(name);
  } catch (const std::exception& error) {
    throw_data_error("no torch.distributed process group named '" + name +
                     "' in this process (create it with torch.distributed.init_process_group first): " + error.what());
  }
  rank_ = impl_->group->getRank();
  world_size_ = impl_->group->getSize();
}

ProcessGroup::~ProcessGroup() = default;

std::string ProcessGroup::backend() const {
  return impl_->group->getBackendName();
}

void ProcessGroup::broadcast(const std::vector<at::Tensor>& tensors, int root) {
  c10::NoGradGuard no_grad;
  // One flat buffer per dtype (and device): one collective each, whatever the number of tensors.
  std::map<std::pair<at::ScalarType, std::string>, std::vector<at::Tensor>> groups;
  for (const auto& tensor : tensors) groups[{tensor.scalar_type(), tensor.device().str()}].push_back(tensor);
  for (auto& [key, members] : groups) {
    std::vector<at::Tensor> flat_parts;
    flat_parts.reserve(members.size());
    for (const auto& member : members) flat_parts.push_back(member.reshape(-1));
    std::vector<at::Tensor> flat{at::cat(flat_parts)};
    c10d::BroadcastOptions options;
    options.rootRank = root;
    wait_for(impl_->group->broadcast(flat, options), "broadcast from rank " + std::to_string(root), name_);
    std::int64_t offset = 0;
    for (auto& member : members) {
      member.copy_(flat[0].narrow(0, offset, member.numel()).view(member.sizes()));
      offset += member.numel();
    }
  }
}

void ProcessGroup::all_reduce_sum(at::Tensor& tensor) {
  wait_for(impl_->all_reduce(tensor, c10d::ReduceOp::SUM), "all-reduce", name_);
}

void ProcessGroup::all_reduce_max(at::Tensor& tensor) {
  wait_for(impl_->all_reduce(tensor, c10d::ReduceOp::MAX), "all-reduce (max)", name_);
}

std::unique_ptr<ProcessGroup::Pending> ProcessGroup::all_reduce_sum_async(at::Tensor& tensor) {
  return std::make_unique<PendingWork>(impl_->all_reduce(tensor, c10d::ReduceOp::SUM), name_);
}

GradientReducer::GradientReducer(ProcessGroup& group, const std::vector<at::Tensor>& params, std::int64_t bucket_bytes,
                                 std::int64_t first_bucket_bytes)
    : group_(group), params_(params), place_(params.size()), seen_(params.size(), false) {
  // Reverse parameter order: the last layers' gradients come first in backward. A bucket holds one
  // dtype and device (bf16 working weights and float32 biases go to different buckets).
  std::map<std::pair<at::ScalarType, std::string>, std::size_t> open;  // (dtype, device) -> bucket index
  std::map<std::size_t, std::int64_t> bytes;
  for (std::size_t i = params_.size(); i-- > 0;) {
    const at::Tensor& param = params_[i];
    if (!param.requires_grad()) continue;
    const auto key = std::make_pair(param.scalar_type(), param.device().str());
    const std::int64_t size = param.numel() * static_cast<std::int64_t>(param.element_size());
    auto found = open.find(key);
    if (found != open.end()) {
      const std::int64_t cap = found->second == 0 ? first_bucket_bytes : bucket_bytes;
      if (bytes[found->second] + size > cap && !buckets_[found->second].params.empty()) open.erase(found);
    }
    found = open.find(key);
    if (found == open.end()) {
      buckets_.emplace_back();
      found = open.emplace(key, buckets_.size() - 1).first;
    }
    Bucket& bucket = buckets_[found->second];
    bucket.offsets.push_back(bucket.params.empty() ? 0 : bucket.offsets.back() + params_[bucket.params.back()].numel());
    place_[i] = {found->second, bucket.params.size()};
    bucket.params.push_back(i);
    bytes[found->second] += size;
  }
  for (Bucket& bucket : buckets_) {
    const at::Tensor& last = params_[bucket.params.back()];
    bucket.flat = at::zeros({bucket.offsets.back() + last.numel()}, last.options().requires_grad(false));
  }
  for (std::size_t i = 0; i < params_.size(); ++i) {
    if (!params_[i].requires_grad()) continue;
    hooks_.push_back(params_[i].register_hook([this, i](const at::Tensor& grad) { mark_ready(i, grad); }));
  }
}

GradientReducer::~GradientReducer() {
  std::size_t hook = 0;
  for (std::size_t i = 0; i < params_.size(); ++i) {
    if (params_[i].requires_grad()) params_[i].remove_hook(hooks_[hook++]);
  }
  // A backward that threw leaves launched all-reduces behind: wait so their buffers outlive them.
  for (Bucket& bucket : buckets_) {
    if (!bucket.pending) continue;
    try {
      bucket.pending->wait();
    } catch (const std::exception&) {  // already failing; the first error is the one reported
    }
  }
}

void GradientReducer::mark_ready(std::size_t param, const at::Tensor& grad) {
  const auto [b, slot] = place_[param];
  Bucket& bucket = buckets_[b];
  {
    c10::NoGradGuard no_grad;
    bucket.flat.narrow(0, bucket.offsets[slot], grad.numel()).view(grad.sizes()).copy_(grad);
  }
  if (!seen_[param]) {
    seen_[param] = true;
    ++bucket.ready;
  }
  launch_ready_buckets();
}

void GradientReducer::launch_ready_buckets() {
  // In bucket order on every rank, whatever order the hooks fire in: collectives must match up.
  while (next_bucket_ < buckets_.size() && buckets_[next_bucket_].ready == buckets_[next_bucket_].params.size()) {
    Bucket& bucket = buckets_[next_bucket_++];
    bucket.pending = group_.all_reduce_sum_async(bucket.flat);
    bucket.launched = true;
  }
}

void GradientReducer::finish() {
  c10::NoGradGuard no_grad;
  for (Bucket& bucket : buckets_) {
    for (std::size_t slot = 0; slot < bucket.params.size(); ++slot) {
      const std::size_t i = bucket.params[slot];
      if (seen_[i]) continue;
      bucket.flat.narrow(0, bucket.offsets[slot], params_[i].numel()).zero_();
      seen_[i] = true;
      ++bucket.ready;
    }
  }
  launch_ready_buckets();
  const auto started = Clock::now();
  for (Bucket& bucket : buckets_) {
    bucket.pending->wait();
    bucket.pending.reset();
  }
  wait_seconds_ += std::chrono::duration<double>(Clock::now() - started).count();
  const double scale = 1.0 / static_cast<double>(group_.world_size());
  for (Bucket& bucket : buckets_) {
    bucket.flat.mul_(scale);
    for (std::size_t slot = 0; slot < bucket.params.size(); ++slot) {
      at::Tensor& param = params_[bucket.params[slot]];
      const at::Tensor average = bucket.flat.narrow(0, bucket.offsets[slot], param.numel()).view(param.sizes());
      at::Tensor& grad = param.mutable_grad();
      if (grad.defined()) {
        grad.copy_(average);
      } else {
        grad = average.clone(at::MemoryFormat::Preserve);
      }
    }
    bucket.ready = 0;
    bucket.launched = false;
  }
  std::fill(seen_.begin(), seen_.end(), false);
  next_bucket_ = 0;
}

}  // namespace kiln::detail
