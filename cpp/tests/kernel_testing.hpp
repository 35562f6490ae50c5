// Shared by the tests of kiln's own kernels (Winograd, small-map and depthwise convolutions): the thread count
// for one test, and the tolerance for sums taken in another order than the reference's.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

namespace kiln::testing {

// The intra-op thread count for one test: kernels that share work out must give the same answers with any.
class ThreadCount {
 public:
  explicit ThreadCount(int threads) : previous_(at::get_num_threads()) { at::set_num_threads(threads); }
  ~ThreadCount() { at::set_num_threads(previous_); }
  ThreadCount(const ThreadCount&) = delete;
  ThreadCount& operator=(const ThreadCount&) = delete;

 private:
  int previous_;
};

// Within 1e-5 of the largest value of `expected`: float sums of the same products in another order (or through
// Winograd's transforms) than the reference kernel's.
inline bool close_to(const at::Tensor& actual, const at::Tensor& expected) {
  const double scale = expected.abs().max().item<double>();
  return (actual - expected).abs().max().item<double>() <= 1e-5 * scale;
}

}  // namespace kiln::testing
