// kiln._core: wires the per-area registrations together; nothing else lives here.
#include "bindings.hpp"

#include "kiln/error.hpp"
#include "kiln/trainer.hpp"

namespace kiln::bindings {

void register_errors(py::module_& m) {
  py::register_exception<DataError>(m, "DataError", PyExc_ValueError);
  py::register_exception<TrainingError>(m, "TrainingError", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr pointer) {
    try {
      if (pointer) std::rethrow_exception(pointer);
    } catch (const NotFoundError& error) {
      py::set_error(PyExc_FileNotFoundError, error.what());
    }
  });
}

}  // namespace kiln::bindings

PYBIND11_MODULE(_core, m) {
  m.doc() = "kiln's C++ core (LibTorch + OpenCV). Use it through the kiln package.";
  m.attr("__version__") = KILN_VERSION;
  kiln::bindings::register_errors(m);
  kiln::bindings::register_dataset(m);
  kiln::bindings::register_training(m);
  kiln::bindings::register_inference(m);
  kiln::bindings::register_models(m);
}
