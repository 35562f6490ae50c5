// Private random streams run through torch's global generators, so that kiln's random draws and the
// user's torch code never disturb each other.
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <mutex>

namespace kiln::detail {

// Runs the torch ops in its scope (weight initialisation, dropout) on a trainer's own random stream:
// swaps `state` into torch's global generator of `device` and, on leaving, stores the advanced stream
// back and restores the global one. Two trainers, or other torch code, then never disturb each other.
class RandomStreamScope {
 public:
  RandomStreamScope(at::Tensor& state, const c10::Device& device)
      : state_(state), global_(at::globalContext().defaultGenerator(device)) {
    std::lock_guard<std::mutex> lock(global_.mutex());
    saved_ = global_.get_state();
    global_.set_state(state_);
  }
  RandomStreamScope(const RandomStreamScope&) = delete;
  RandomStreamScope& operator=(const RandomStreamScope&) = delete;
  ~RandomStreamScope() {
    std::lock_guard<std::mutex> lock(global_.mutex());
    state_ = global_.get_state();
    global_.set_state(saved_);
  }

 private:
  at::Tensor& state_;
  at::Generator global_;
  at::Tensor saved_;
};

// The state of `device`'s global generator as if seeded with `seed`, leaving the generator as it was.
inline at::Tensor seeded_stream(std::uint64_t seed, const c10::Device& device) {
  at::Generator global = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(global.mutex());
  const at::Tensor saved = global.get_state();
  global.set_current_seed(seed);
  at::Tensor seeded = global.get_state();
  global.set_state(saved);
  return seeded;
}

}  // namespace kiln::detail
