// Progress reporting of long core calls.
#pragma once

#include <cstdint>
#include <functional>

namespace kiln {

// Called from the calling thread with (work done, work in total); returning false cancels the call,
// which then throws kiln::Cancelled.
using ProgressFn = std::function<bool(std::int64_t done, std::int64_t total)>;

}  // namespace kiln
