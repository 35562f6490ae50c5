// The intra-op thread count for one test: kernels that share work out must give the same answers with any.
#pragma once

#include <ATen/Parallel.h>

namespace kiln::testing {

class ThreadCount {
 public:
  explicit ThreadCount(int threads) : previous_(at::get_num_threads()) { at::set_num_threads(threads); }
  ~ThreadCount() { at::set_num_threads(previous_); }
  ThreadCount(const ThreadCount&) = delete;
  ThreadCount& operator=(const ThreadCount&) = delete;

 private:
  int previous_;
};

}  // namespace kiln::testing
