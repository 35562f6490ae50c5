// kiln._core: wires the per-area registrations together; nothing else lives here.
#include "bindings.hpp"

#include "kiln/detail/isa_dispatch.hpp"
#include "kiln/detail/utf8.hpp"
#include "kiln/error.hpp"
#include "kiln/trainer.hpp"

namespace kiln::bindings {
namespace {

PyObject* data_error_type = nullptr;
PyObject* training_error_type = nullptr;

// kiln's messages quote paths and bytes of files: any that are not UTF-8 are escaped, so Python gets
// the error (not a UnicodeDecodeError in its place).
void set_error(PyObject* type, const char* message) {
  py::set_error(type, detail::printable_utf8(message, /*keep_newlines=*/true).c_str());
}

}  // namespace

void register_errors(py::module_& m) {
  data_error_type = py::register_exception<DataError>(m, "DataError", PyExc_ValueError).ptr();
  training_error_type = py::register_exception<TrainingError>(m, "TrainingError", PyExc_RuntimeError).ptr();
  py::register_exception_translator([](std::exception_ptr pointer) {
    try {
      if (pointer) std::rethrow_exception(pointer);
    } catch (const NotFoundError& error) {
      set_error(PyExc_FileNotFoundError, error.what());
    } catch (const DataError& error) {
      set_error(data_error_type, error.what());
    } catch (const TrainingError& error) {
      set_error(training_error_type, error.what());
    }
  });
}

}  // namespace kiln::bindings

PYBIND11_MODULE(_core, m) {
  m.doc() = "kiln's C++ core (LibTorch + OpenCV). Use it through the kiln package.";
  m.attr("__version__") = KILN_VERSION;
  m.def(
      "isa_level", [] { return std::string(kiln::detail::isa_level_name()); },
      "The copy of kiln's own vector loops this process runs: 'avx512', 'avx2' or 'baseline' (the CPU's, "
      "lowered by ATEN_CPU_CAPABILITY as ATen's kernels are).");
  kiln::bindings::register_errors(m);
  kiln::bindings::register_dataset(m);
  kiln::bindings::register_training(m);
  kiln::bindings::register_inference(m);
  kiln::bindings::register_models(m);
  kiln::bindings::register_augment(m);
  kiln::bindings::register_loader(m);
}
