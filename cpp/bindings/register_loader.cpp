// The streaming loader: kiln._core.BatchLoader over a processed split's shards (kiln.loader.DataLoader
// wraps it as a Python iterable).
#include "bindings.hpp"

#include "kiln/loader.hpp"
#include "kiln/manifest.hpp"

namespace kiln::bindings {

void register_loader(py::module_& m) {
  py::class_<BatchLoader>(m, "BatchLoader",
                          "Batches of a processed split read from its shards by C++ worker threads (decode, "
                          "transform, collate), in the order start_epoch() gives. Use kiln.loader.DataLoader.")
      .def(py::init([](const std::filesystem::path& data_dir, const std::string& split, std::int64_t batch_size,
                       const py::object& train_transform, const py::object& eval_transform, bool augment,
                       int num_workers, std::uint64_t seed, int prefetch_batches, const std::vector<double>& mean,
                       const std::vector<double>& std, bool channels_last) {
             TrainTransformOptions train;
             EvalTransformOptions eval;
             if (!train_transform.is_none()) train = train_transform.cast<TrainTransformOptions>();
             if (!eval_transform.is_none()) eval = eval_transform.cast<EvalTransformOptions>();
             py::gil_scoped_release release;
             const Manifest manifest = read_manifest(data_dir);
             auto reader = std::make_shared<const SplitReader>(data_dir, manifest, split);
             const int channels = manifest.image.channels;
             ImageTransform transform = augment ? ImageTransform(train, eval, channels)
                                                : ImageTransform::evaluation(eval, channels);
             LoaderOptions options;
             options.batch_size = batch_size;
             options.num_workers = num_workers;
             options.seed = seed;
             options.prefetch_batches = prefetch_batches;
             options.mean = mean;
             options.std = std;
             options.channels_last = channels_last;
             return std::make_unique<BatchLoader>(SampleSource::streamed(std::move(reader)), std::move(transform),
                                                  options);
           }),
           py::arg("data_dir"), py::arg("split"), py::kw_only(), py::arg("batch_size") = 32,
           py::arg("train_transform") = py::none(), py::arg("eval_transform") = py::none(), py::arg("augment") = true,
           py::arg("num_workers") = 0, py::arg("seed") = 1, py::arg("prefetch_batches") = 2,
           py::arg("mean") = std::vector<double>{}, py::arg("std") = std::vector<double>{},
           py::arg("channels_last") = false,
           "mean/std (one per channel, [0, 1] scale): float32 batches normalised by the workers, NHWC with "
           "channels_last; empty: uint8 batches.")
      .def("start_epoch", &BatchLoader::start_epoch, py::arg("order"), py::arg("epoch"), py::arg("first_position") = 0,
           py::arg("position_stride") = 1, py::call_guard<py::gil_scoped_release>(),
           "Starts an epoch over `order` (int64 sample indices); `epoch` seeds the random transforms, order[i] "
           "drawing those of position first_position + i * position_stride.")
      .def(
          "next",
          [](BatchLoader& loader) -> py::object {
            std::optional<Batch> batch;
            {
              py::gil_scoped_release release;
              batch = loader.next();
            }
            if (!batch) return py::none();
            return py::make_tuple(batch->images, batch->labels);
          },
          "The next (images [B, C, H, W]: uint8, or float32 when normalising; labels int64 [B]), valid until the "
          "following call; None at the epoch's end.")
      .def_property_readonly("wait_seconds", &BatchLoader::wait_seconds)
      .def_property_readonly("output_shape", [](const BatchLoader& loader) {
        const ImageSpec image = loader.output_image();
        return py::make_tuple(image.channels, image.height, image.width);
      });
}

}  // namespace kiln::bindings
