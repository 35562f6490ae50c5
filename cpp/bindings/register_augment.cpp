#include "bindings.hpp"

namespace kiln::bindings {
void register_augment(py::module_& m) { (void)m; }
}  // namespace kiln::bindings
