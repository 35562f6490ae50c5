// Error types of the kiln core. The Python bindings map each to the Python exception a user expects:
// DataError -> ValueError, NotFoundError -> FileNotFoundError, Cancelled -> the interrupt that caused it.
#pragma once

#include <stdexcept>
#include <string>

namespace kiln {

// Input data or arguments that cannot be used (bad image dir layout, unknown format, bad option).
class DataError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// A path the caller named does not exist.
class NotFoundError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A long call was stopped because its progress callback asked it to (Ctrl-C in Python).
class Cancelled : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void throw_data_error(const std::string& message) {
  throw DataError(message);
}

}  // namespace kiln
