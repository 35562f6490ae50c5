// Models: kiln._core.Model, one of kiln's classifiers as Python sees it (state dicts in and out,
// forward passes), and the pretrained-weights loader the trainer uses.
#include "bindings.hpp"

#include "kiln/model.hpp"
#include "kiln/pretrained.hpp"

namespace kiln::bindings {
namespace {

// A kiln classifier with its spec, for Python.
struct PyModel {
  ModelSpec spec;
  std::shared_ptr<Classifier> module;
};

// In torch's Module.state_dict() order: a module's own parameters, then its buffers, then its children's.
void add_state(const torch::nn::Module& module, const std::string& prefix, py::dict& state) {
  for (const auto& item : module.named_parameters(/*recurse=*/false)) {
    state[py::str(prefix + item.key())] = item.value().detach();
  }
  for (const auto& item : module.named_buffers(/*recurse=*/false)) {
    state[py::str(prefix + item.key())] = item.value().detach();
  }
  for (const auto& child : module.named_children()) add_state(*child.value(), prefix + child.key() + ".", state);
}

py::dict state_dict_of(const PyModel& model) {
  py::dict state;
  add_state(*model.module, "", state);
  return state;
}

c10::IValue ivalue_of(const py::dict& state) {
  c10::impl::GenericDict dict(c10::StringType::get(), c10::AnyType::get());
  for (const auto& [key, value] : state) {
    if (!py::isinstance<py::str>(key)) throw py::type_error("state dict keys must be str");
    try {
      dict.insert(key.cast<std::string>(), value.cast<at::Tensor>());
    } catch (const py::cast_error&) {
      throw py::type_error("state dict entry '" + key.cast<std::string>() + "' is not a tensor");
    }
  }
  return dict;
}

}  // namespace

void register_models(py::module_& m) {
  py::class_<PyModel>(m, "Model",
                      "One of kiln's classifiers (model_names()), built in C++. The torchvision ones have "
                      "torchvision's parameter names: state_dict() loads into torchvision.models.<name>"
                      "(num_classes=K) and theirs into load_state_dict().")
      .def(py::init([](const std::string& name, int num_classes, int in_channels, int height, int width) {
             auto model = std::make_unique<PyModel>();
             model->spec = ModelSpec{name, in_channels, num_classes, height, width};
             model->module = make_model(model->spec);
             return model;
           }),
           py::arg("name"), py::arg("num_classes"), py::arg("in_channels") = 3, py::arg("height") = 224,
           py::arg("width") = 224,
           "Builds model `name`, initialised as its trainer would; height and width size the models "
           "whose layers depend on the image size (mnist_cnn).")
      .def(
          "__call__",
          [](PyModel& model, const at::Tensor& images) {
            py::gil_scoped_release release;
            return model.module->forward(images);
          },
          py::arg("images"), "Normalised float images [N, C, H, W] -> logits [N, classes] (autograd records).")
      .def("state_dict", &state_dict_of, "Parameters and buffers by name (the model's tensors, detached).")
      .def(
          "load_state_dict",
          [](PyModel& model, const py::dict& state) {
            load_state_dict_strict(*model.module, ivalue_of(state), "the state dict");
          },
          py::arg("state_dict"),
          "Copies a state dict in, as torch's load_state_dict(strict=True): every name the model's, every "
          "shape equal; otherwise ValueError listing the names at fault and nothing is copied.")
      .def(
          "load_pretrained",
          [](PyModel& model, const py::dict& state, const std::string& source) {
            return load_pretrained(*model.module, model.spec, ivalue_of(state), source).adaptations;
          },
          py::arg("state_dict"), py::arg("source") = "the state dict",
          "Starts from a state dict for fine-tuning (kiln.pretrained.read_state_dict reads one from a file): "
          "the head is kept new when the class count differs, the stem adapted to the input channels; "
          "returns what was adapted, one sentence each. `source` names the weights in errors.")
      .def(
          "named_parameters",
          [](PyModel& model) {
            py::dict parameters;
            for (const auto& item : model.module->named_parameters()) parameters[py::str(item.key())] = item.value();
            return parameters;
          },
          "The trainable tensors by name (the model's own: gradients of a backward pass land on them).")
      .def(
          "train", [](PyModel& model, bool mode) { model.module->train(mode); }, py::arg("mode") = true)
      .def("eval", [](PyModel& model) { model.module->eval(); })
      .def_property_readonly("training", [](const PyModel& model) { return model.module->is_training(); })
      .def_property_readonly("name", [](const PyModel& model) { return model.spec.name; });
}

}  // namespace kiln::bindings
