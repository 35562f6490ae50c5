// Inference: kiln._core.Predictor and the batch-inference engine.
#include "bindings.hpp"

#include "kiln/batch_inference.hpp"
#include "kiln/detail/utf8.hpp"
#include "kiln/error.hpp"
#include "kiln/precision.hpp"
#include "kiln/predictor.hpp"

namespace kiln::bindings {
namespace {

// Per-image errors are printable UTF-8 by construction; escaping again here means no byte of a
// hostile file can ever turn a per-image error into a UnicodeDecodeError for the whole batch.
py::list errors_or_none(const std::vector<std::string>& errors) {
  py::list list;
  for (const auto& error : errors) {
    list.append(error.empty() ? py::object(py::none()) : py::str(detail::printable_utf8(error)));
  }
  return list;
}

// Views of the callers' bytes (a sequence of bytes-like objects): nothing is copied. `views` keeps the
// buffers held while the GIL is released and they are read.
std::vector<EncodedImage> encoded_views(const py::sequence& images, std::vector<py::buffer_info>& views) {
  std::vector<EncodedImage> encoded;
  views.reserve(images.size());
  encoded.reserve(images.size());
  for (std::size_t i = 0; i < images.size(); ++i) {
    py::object item = images[i];
    if (!PyObject_CheckBuffer(item.ptr())) {
      throw py::type_error("images[" + std::to_string(i) + "] must be bytes, got " +
                           std::string(py::str(py::type::of(item).attr("__name__"))));
    }
    views.push_back(py::reinterpret_borrow<py::buffer>(item).request());
    const auto& view = views.back();
    encoded.emplace_back(static_cast<const std::uint8_t*>(view.ptr),
                         static_cast<std::size_t>(view.size * view.itemsize));
  }
  return encoded;
}

py::tuple shape_of(const ImageSpec& spec) {
  return py::make_tuple(spec.channels, spec.height, spec.width);
}

// [height, width], [shorter edge] (a resize keeping the aspect ratio) or None, as the checkpoint stores it.
py::object size_or_none(const std::optional<std::pair<int, int>>& size) {
  if (!size) return py::none();
  py::list values;
  values.append(size->first);
  if (size->second != 0) values.append(size->second);
  return values;
}

}  // namespace

void register_inference(py::module_& m) {
  py::class_<Predictor>(m, "Predictor", "Class probabilities from a kiln checkpoint; thread-safe.")
      .def(py::init([](const std::filesystem::path& checkpoint, const std::string& device, const std::string& precision,
                       const std::optional<std::string>& fallback) {
             const Precision requested = parse_precision(precision);
             std::optional<Precision> int8_fallback;
             if (fallback) int8_fallback = parse_precision(*fallback);
             py::gil_scoped_release release;
             return std::make_unique<Predictor>(checkpoint, device, requested, int8_fallback);
           }),
           py::arg("checkpoint"), py::arg("device") = "cpu", py::arg("precision") = "fp32",
           py::arg("fallback") = py::none(),
           "Load a kiln checkpoint (nothing is unpickled). precision: 'fp32', 'bf16' (bfloat16 autocast) or "
           "'int8' (static int8 on the CPU, from the calibration kiln's training records). When int8 cannot "
           "run here, the predictor uses `fallback` (the reason is in int8_unavailable), or raises ValueError "
           "naming the reason when there is none.")
      .def("predict", &Predictor::predict, py::arg("images"), py::call_guard<py::gil_scoped_release>(),
           "uint8 images [N, C, H, W] of image_shape (or one image) -> float32 probabilities [N, classes]; the "
           "checkpoint's evaluation transform is applied to them first.")
      .def(
          "predict_encoded",
          [](const Predictor& predictor, const py::sequence& images) {
            std::vector<py::buffer_info> views;
            const std::vector<EncodedImage> encoded = encoded_views(images, views);
            Predictor::EncodedPredictions result;
            {
              py::gil_scoped_release release;
              result = predictor.predict_encoded(encoded);
            }
            return py::make_tuple(result.probabilities, errors_or_none(result.errors));
          },
          py::arg("images"),
          "Encoded images (a sequence of bytes: PNG, JPEG, ...) -> (probabilities float32 [N, classes], errors). "
          "Images are decoded and converted exactly as data preparation does, then the checkpoint's evaluation "
          "transform applies (as preprocess shows); errors[i] is None or why image i "
          "could not be decoded (its probability row is then zero), e.g. 'PNG claims 60000x60000, over "
          "max_image_pixels=16777216'. One bad image never fails the others.")
      .def(
          "preprocess",
          [](const Predictor& predictor, const py::sequence& images) {
            std::vector<py::buffer_info> views;
            const std::vector<EncodedImage> encoded = encoded_views(images, views);
            DecodedBatch batch;
            {
              py::gil_scoped_release release;
              batch = predictor.preprocess(encoded);
            }
            return py::make_tuple(batch.images, errors_or_none(batch.errors));
          },
          py::arg("images"),
          "Encoded images (a sequence of bytes) -> (pixels uint8 [N, C, H, W] of input_shape, errors): what the model "
          "sees, decoded to image_shape as predict_encoded decodes them, then the checkpoint's evaluation transform. "
          "Rows of undecodable images are zero; errors[i] is None or why image i could not be decoded.")
      .def_property("max_image_pixels", &Predictor::max_image_pixels, &Predictor::set_max_image_pixels,
                    "Pixel budget (width x height) of each image predict_encoded and classify_directory decode: an "
                    "image whose header claims more is refused before it is decoded. At least 1; default 89478485.")
      .def_property_readonly("classes", &Predictor::classes)
      .def_property_readonly(
          "image_shape", [](const Predictor& predictor) { return shape_of(predictor.image_spec()); },
          "(C, H, W) of the images predict takes and encoded images are decoded to: the processed images the model "
          "was trained on (a processed split's images as they are).")
      .def_property_readonly(
          "input_shape", [](const Predictor& predictor) { return shape_of(predictor.input_spec()); },
          "(C, H, W) of the model's input: image_shape after eval_transform.")
      .def_property_readonly(
          "eval_transform",
          [](const Predictor& predictor) {
            const EvalTransformOptions& eval = predictor.eval_transform();
            py::dict transform;
            transform["resize"] = size_or_none(eval.resize);
            transform["center_crop"] = size_or_none(eval.center_crop);
            return transform;
          },
          "The checkpoint's evaluation transform, applied to every image before the model (torchvision.transforms.v2 "
          "Resize then CenterCrop): {'resize': [h, w] | [shorter edge] | None, 'center_crop': [h, w] | None}.")
      .def_property_readonly("model_name", [](const Predictor& predictor) { return predictor.model_spec().name; })
      .def_property_readonly("epoch", &Predictor::epoch)
      .def_property_readonly("precision", [](const Predictor& predictor) { return to_string(predictor.precision()); })
      .def_property_readonly(
          "int8_unavailable",
          [](const Predictor& predictor) -> py::object {
            const std::string& reason = predictor.int8_unavailable();
            return reason.empty() ? py::object(py::none()) : py::str(reason);
          },
          "Why int8 was asked for but the fallback precision runs; None otherwise.");

  m.def(
      "classify_directory",
      [](const Predictor& predictor, const std::filesystem::path& input_dir, const std::string& glob,
         const std::filesystem::path& output_path, std::int64_t batch_size, py::object progress) {
        BatchInferenceOptions options{input_dir, glob, output_path, batch_size};
        const BatchInferenceSummary summary = run_with_progress(std::move(progress), [&](const ProgressFn& report) {
          return classify_directory(predictor, options, report);
        });
        py::dict result;
        result["files"] = summary.files;
        result["classified"] = summary.classified;
        result["failed"] = summary.failed;
        return result;
      },
      py::arg("predictor"), py::arg("input_dir"), py::kw_only(), py::arg("glob") = "*.png", py::arg("output_path"),
      py::arg("batch_size") = 256, py::arg("progress") = py::none(),
      R"doc(Classify every file under input_dir matching glob and write one JSON line per file to output_path.

Lines: {"time", "filepath", "image_filepath", "prediction", "probability"} ("filepath" is the template
guide's name, "image_filepath" kiln's earlier one, with the same value); a file that cannot be read or decoded
gets null prediction/probability and an "error". The file appears only once complete. Returns
{"files", "classified", "failed"}. Raises FileNotFoundError for a missing input_dir and ValueError
when no file matches glob.)doc");

  m.def("find_matching_files", &find_matching_files, py::arg("dir"), py::arg("glob"),
        py::call_guard<py::gil_scoped_release>(),
        "The files under dir whose relative path matches glob (\"**\" spans folders), sorted, as absolute paths.");
}

}  // namespace kiln::bindings
