// First include of every bindings file: the pybind11 namespace alias, torch's tensor casters and the
// helpers shared by all areas.
#pragma once

#include <pybind11/functional.h>
#include <pybind11/stl.h>
#include <pybind11/stl/filesystem.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>

#include "kiln/dataset.hpp"
#include "kiln/error.hpp"

namespace py = pybind11;

namespace kiln::bindings {

// Turns a Python progress callable into a kiln::ProgressFn for a call that runs with the GIL
// released. Each report re-acquires the GIL, lets Python handle pending signals (so Ctrl-C works),
// and calls the callable; an exception from either cancels the C++ call and is re-raised in Python
// once the call has unwound.
class PythonProgress {
 public:
  explicit PythonProgress(py::object callback) : callback_(std::move(callback)) {}

  ProgressFn function() {
    return [this](std::int64_t done, std::int64_t total) {
      py::gil_scoped_acquire gil;
      try {
        if (PyErr_CheckSignals() != 0) throw py::error_already_set();
        if (!callback_.is_none()) callback_(done, total);
        return true;
      } catch (py::error_already_set& error) {
        error_ = std::move(error);
        return false;
      }
    };
  }

  // Call with the GIL held after catching kiln::Cancelled.
  void rethrow_python_error() {
    if (error_) {
      py::error_already_set error = std::move(*error_);
      error_.reset();
      throw error;
    }
  }

 private:
  py::object callback_;
  std::optional<py::error_already_set> error_;
};

// Runs `work(progress_fn)` with the GIL released, reporting to the Python callable `progress`; a
// Ctrl-C or an exception raised by `progress` stops the work and is re-raised here.
template <typename Work>
auto run_with_progress(py::object progress, Work&& work) {
  PythonProgress bridge(std::move(progress));
  try {
    py::gil_scoped_release release;
    return work(bridge.function());
  } catch (const Cancelled&) {
    bridge.rethrow_python_error();
    throw;
  }
}

void register_errors(py::module_& m);
void register_dataset(py::module_& m);
void register_training(py::module_& m);
void register_inference(py::module_& m);
void register_models(py::module_& m);
void register_augment(py::module_& m);
void register_loader(py::module_& m);

}  // namespace kiln::bindings
