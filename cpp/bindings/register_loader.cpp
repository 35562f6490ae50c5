#include "bindings.hpp"

namespace kiln::bindings {
void register_loader(py::module_& m) { (void)m; }
}  // namespace kiln::bindings
