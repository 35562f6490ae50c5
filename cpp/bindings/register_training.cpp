// Training: kiln._core.Trainer (and the Adadelta it uses, for testing).
#include "bindings.hpp"

#include "kiln/optimizer.hpp"
#include "kiln/precision.hpp"
#include "kiln/scripted_model.hpp"
#include "kiln/trainer.hpp"

namespace kiln::bindings {
namespace {

py::dict metrics_dict(const EpochMetrics& m) {
  py::dict d;
  d["epoch"] = m.epoch;
  d["train_loss"] = m.train_loss;
  d["train_accuracy"] = m.train_accuracy;
  d["test_loss"] = m.test_loss;
  d["test_accuracy"] = m.test_accuracy;
  d["learning_rate"] = m.learning_rate;
  d["seconds"] = m.seconds;
  d["communication_seconds"] = m.communication_seconds;
  d["data_wait_seconds"] = m.data_wait_seconds;
  return d;
}

py::dict step_dict(const StepMetrics& m) {
  py::dict d;
  d["step"] = m.step;
  d["loss"] = m.loss;
  d["learning_rate"] = m.learning_rate;
  d["images_per_second"] = m.images_per_second;
  return d;
}

// The plain values kiln's state dicts hold (dicts, lists, tensors, numbers, strings, None) as Python
// objects; torch's general IValue converter lives in a much heavier header.
py::object to_python(const c10::IValue& value) {
  if (value.isNone()) return py::none();
  if (value.isTensor()) return py::cast(value.toTensor());
  if (value.isBool()) return py::bool_(value.toBool());
  if (value.isInt()) return py::int_(value.toInt());
  if (value.isDouble()) return py::float_(value.toDouble());
  if (value.isString()) return py::str(value.toStringRef());
  if (value.isList()) {
    py::list list;
    for (const auto& item : value.toListRef()) list.append(to_python(item));
    return list;
  }
  if (value.isGenericDict()) {
    py::dict dict;
    for (const auto& entry : value.toGenericDict()) dict[to_python(entry.key())] = to_python(entry.value());
    return dict;
  }
  throw std::runtime_error("cannot convert a " + value.tagKind() + " to Python");
}

}  // namespace

void register_training(py::module_& m) {
  py::class_<Trainer>(m, "Trainer",
                      "Trains a classifier on a processed dataset held in memory; one run_epoch() call per epoch.")
      .def(py::init([](const std::filesystem::path& data_dir, const std::string& model, double lr, double gamma,
                       std::int64_t train_batch_size, std::int64_t test_batch_size, std::uint64_t seed,
                       const std::string& device, const std::string& precision, bool channels_last,
                       std::int64_t train_limit, std::int64_t test_limit, const std::string& process_group,
                       const std::vector<double>& mean, const std::vector<double>& std, const std::string& freeze,
                       const std::string& optimizer, double momentum, bool nesterov, double weight_decay,
                       std::int64_t data_memory_budget, int num_workers, const py::object& train_transform,
                       const py::object& eval_transform) {
             TrainerOptions options;
             options.data_dir = data_dir;
             options.model = model;
             options.lr = lr;
             options.gamma = gamma;
             options.train_batch_size = train_batch_size;
             options.test_batch_size = test_batch_size;
             options.seed = seed;
             options.device = device;
             options.precision = parse_precision(precision);
             options.channels_last = channels_last;
             options.train_limit = train_limit;
             options.test_limit = test_limit;
             options.process_group = process_group;
             options.mean = mean;
             options.std = std;
             options.freeze = freeze;
             options.optimizer = optimizer;
             options.momentum = momentum;
             options.nesterov = nesterov;
             options.weight_decay = weight_decay;
             options.data_memory_budget = data_memory_budget;
             options.num_workers = num_workers;
             if (!train_transform.is_none()) options.train_transform = train_transform.cast<TrainTransformOptions>();
             if (!eval_transform.is_none()) options.eval_transform = eval_transform.cast<EvalTransformOptions>();
             py::gil_scoped_release release;
             return std::make_unique<Trainer>(options);
           }),
           py::arg("data_dir"), py::kw_only(), py::arg("model") = "mnist_cnn", py::arg("lr") = 1.3,
           py::arg("gamma") = 0.7, py::arg("train_batch_size") = 32, py::arg("test_batch_size") = 100,
           py::arg("seed") = 1, py::arg("device") = "cpu", py::arg("precision") = "fp32",
           py::arg("channels_last") = true, py::arg("train_limit") = 0, py::arg("test_limit") = 0,
           py::arg("process_group") = "", py::arg("mean") = std::vector<double>{},
           py::arg("std") = std::vector<double>{}, py::arg("freeze") = "none", py::arg("optimizer") = "adadelta",
           py::arg("momentum") = 0.0, py::arg("nesterov") = false, py::arg("weight_decay") = 0.0,
           py::arg("data_memory_budget") = 0, py::arg("num_workers") = 0, py::arg("train_transform") = py::none(),
           py::arg("eval_transform") = py::none(),
           "data_memory_budget: bytes of decoded training and test images kept resident; a dataset over it is "
           "streamed from its shards (0: no limit). num_workers: the loader's threads (0: one per core). "
           "train_transform / eval_transform: kiln.TrainTransformOptions / kiln.EvalTransformOptions "
           "(kiln.transforms builds them from the YAML's transforms group); the model's input size is their "
           "output size. mean/std: the normalisation to train with, one value per channel (empty: the manifest's); it is "
           "checkpointed for inference. freeze: 'none' or 'backbone' (only the classifier head trains). "
           "optimizer: 'adadelta', 'sgd' (momentum, nesterov) or 'adamw', with weight_decay. "
           "process_group: the group_name of a torch.distributed process group (torch.distributed.group.WORLD."
           "group_name after init_process_group) to train data-parallel on; every rank builds the same Trainer. "
           "Empty: one process.")
      .def(
          "run_epoch",
          [](Trainer& trainer, py::object progress, py::object on_steps, std::int64_t every_n_steps) {
            // A step report is one more Python call from the epoch's thread: it takes the GIL, and an
            // exception it raises is stashed and re-raised once the epoch has unwound (kiln::Cancelled).
            std::optional<py::error_already_set> step_error;
            StepMetricsFn steps;
            if (!on_steps.is_none()) {
              steps = [&](const StepMetrics& m) {
                py::gil_scoped_acquire gil;
                try {
                  on_steps(step_dict(m));
                } catch (py::error_already_set& error) {
                  step_error = std::move(error);
                  throw Cancelled("training cancelled by an error in on_steps");
                }
              };
            }
            try {
              return metrics_dict(run_with_progress(std::move(progress), [&](const ProgressFn& report) {
                return trainer.run_epoch(report, steps, every_n_steps);
              }));
            } catch (const Cancelled&) {
              if (!step_error) throw;
              py::error_already_set error = std::move(*step_error);
              step_error.reset();
              throw error;
            }
          },
          py::arg("progress") = py::none(), py::kw_only(), py::arg("on_steps") = py::none(),
          py::arg("every_n_steps") = 50,
          "Train one epoch, evaluate, step the LR schedule; returns the epoch's metrics as a dict. "
          "progress(batches_done, batches_total) is called from this thread; raising in it (or Ctrl-C) stops the "
          "epoch. on_steps({step, loss, learning_rate, images_per_second}) is called after every "
          "every_n_steps-th training batch (step counts this model's batches across epochs and resumes; loss "
          "and images/s cover the batches since the last call). Raises kiln.TrainingError when the loss "
          "becomes NaN/inf.")
      .def("save_checkpoint", &Trainer::save_checkpoint, py::arg("path"), py::call_guard<py::gil_scoped_release>())
      .def("load_checkpoint", &Trainer::load_checkpoint, py::arg("path"), py::call_guard<py::gil_scoped_release>())
      .def(
          "load_pretrained",
          [](Trainer& trainer, const py::dict& state_dict, const std::string& source) {
            c10::impl::GenericDict state(c10::StringType::get(), c10::AnyType::get());
            for (const auto& [key, value] : state_dict) state.insert(key.cast<std::string>(), value.cast<at::Tensor>());
            py::gil_scoped_release release;
            return trainer.load_pretrained(state, source);
          },
          py::arg("state_dict"), py::arg("source") = "the state dict",
          "Start from pretrained weights (a state dict; kiln.pretrained.read_state_dict reads a file) before "
          "the first epoch: the head stays new for another class count, the stem adapts to the channels. "
          "Returns what was adapted, one sentence each.")
      .def("confusion_matrix", &Trainer::confusion_matrix)
      .def_property_readonly("epoch", &Trainer::epoch)
      .def_property_readonly("history",
                             [](const Trainer& trainer) {
                               py::list history;
                               for (const auto& metrics : trainer.history()) history.append(metrics_dict(metrics));
                               return history;
                             })
      .def_property_readonly("classes", [](const Trainer& trainer) { return trainer.manifest().classes; })
      .def_property_readonly("model_name", [](const Trainer& trainer) { return trainer.model_spec().name; })
      .def_property_readonly("image_shape",
                             [](const Trainer& trainer) {
                               const ImageSpec& image = trainer.manifest().image;
                               return py::make_tuple(image.channels, image.height, image.width);
                             })
      .def_property_readonly("device", &Trainer::device)
      .def_property_readonly("train_size", &Trainer::train_size)
      .def_property_readonly("test_size", &Trainer::test_size)
      .def_property_readonly("streams_data", &Trainer::streams_data)
      .def_property_readonly("data_wait_seconds", &Trainer::data_wait_seconds,
                             "Seconds this epoch's training has waited for the loader so far.")
      .def_property_readonly("input_shape",
                             [](const Trainer& trainer) {
                               const ModelSpec& spec = trainer.model_spec();
                               return py::make_tuple(spec.in_channels, spec.height, spec.width);
                             })
      .def_property_readonly("rank", &Trainer::rank)
      .def_property_readonly("world_size", &Trainer::world_size);

  m.def("model_names", &model_names, "Names of the models Trainer(model=...) accepts.");
  m.def(
      "register_scripted_model",
      [](const std::string& name, const py::bytes& archive) { register_scripted_model(name, std::string(archive)); },
      py::arg("name"), py::arg("archive"),
      "Makes a TorchScript archive (torch.jit.save's bytes) the model `name` ('python:<module>:<callable>') "
      "for Trainer(model=name) in this process; kiln.custom_model does this for python: models.");

  py::class_<Adadelta>(m, "Adadelta", "kiln's C++ Adadelta, as the Trainer uses it (exposed for testing).")
      .def(py::init([](std::vector<at::Tensor> params, double lr, double rho, double eps, double weight_decay) {
             return std::make_unique<Adadelta>(std::move(params), AdadeltaOptions{lr, rho, eps, weight_decay});
           }),
           py::arg("params"), py::kw_only(), py::arg("lr") = 1.0, py::arg("rho") = 0.9, py::arg("eps") = 1e-6,
           py::arg("weight_decay") = 0.0)
      .def("step", &Adadelta::step, py::call_guard<py::gil_scoped_release>())
      .def("zero_grad", &Adadelta::zero_grad)
      .def("state_dict", [](const Adadelta& optimizer) { return to_python(optimizer.state_dict()); })
      .def_property("lr", &Adadelta::lr, &Adadelta::set_lr);
}

}  // namespace kiln::bindings
