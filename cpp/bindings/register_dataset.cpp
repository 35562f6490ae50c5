// Data preparation and processed-dataset access: kiln._core.prepare_dataset and friends.
#include "bindings.hpp"

#include <variant>

#include "kiln/dataset.hpp"
#include "kiln/detail/utf8.hpp"
#include "kiln/error.hpp"

namespace kiln::bindings {

void register_dataset(py::module_& m) {
  py::class_<ImageSpec>(m, "ImageSpec", "Layout every image of a dataset is brought to (uint8, CHW).")
      .def_readonly("channels", &ImageSpec::channels)
      .def_readonly("height", &ImageSpec::height)
      .def_readonly("width", &ImageSpec::width)
      .def("__repr__", [](const ImageSpec& spec) { return "ImageSpec(" + to_string(spec) + ")"; });

  py::class_<FileNote>(m, "FileNote", "A file of the raw tree and what happened to it.")
      .def_readonly("path", &FileNote::path)
      .def_property_readonly("reason", [](const FileNote& note) { return detail::printable_utf8(note.reason); })
      .def("__repr__", [](const FileNote& note) {
        return "FileNote(" + note.path + ": " + detail::printable_utf8(note.reason) + ")";
      });

  py::class_<ShardInfo>(m, "ShardInfo", "One shard file of a split: torch.load(path, weights_only=True) reads it.")
      .def_readonly("file", &ShardInfo::file)
      .def_readonly("count", &ShardInfo::count)
      .def_readonly("bytes", &ShardInfo::bytes)
      .def("__repr__", [](const ShardInfo& shard) {
        return "ShardInfo(" + shard.file + ": " + std::to_string(shard.count) + " samples, " +
               std::to_string(shard.bytes) + " bytes)";
      });

  py::class_<SplitInfo>(m, "SplitInfo")
      .def_readonly("name", &SplitInfo::name)
      .def_readonly("file", &SplitInfo::file)
      .def_readonly("count", &SplitInfo::count)
      .def_readonly("bytes", &SplitInfo::bytes)
      .def_readonly("class_counts", &SplitInfo::class_counts)
      .def_readonly("shards", &SplitInfo::shards);

  py::class_<Manifest>(m, "Manifest", "Contents of a processed dataset's manifest.json.")
      .def_readonly("format_version", &Manifest::format_version)
      .def_property_readonly("storage", [](const Manifest& manifest) { return to_string(manifest.storage); })
      .def_readonly("encoding", &Manifest::encoding)
      .def_readonly("kiln_version", &Manifest::kiln_version)
      .def_readonly("source_dir", &Manifest::source_dir)
      .def_readonly("classes", &Manifest::classes)
      .def_readonly("image", &Manifest::image)
      .def_readonly("mean", &Manifest::mean)
      .def_readonly("std", &Manifest::std)
      .def_readonly("normalization_split", &Manifest::normalization_split)
      .def_readonly("splits", &Manifest::splits)
      .def_readonly("skipped", &Manifest::skipped)
      .def_readonly("converted", &Manifest::converted)
      .def_readonly("warnings", &Manifest::warnings)
      .def("split", &Manifest::split, py::arg("name"), py::return_value_policy::reference_internal);

  m.def(
      "prepare_dataset",
      [](const std::variant<std::filesystem::path, std::vector<std::filesystem::path>>& raw_dir,
         const std::filesystem::path& out_dir, std::optional<std::pair<int, int>> image_size,
         std::optional<int> channels, int num_workers, std::int64_t max_image_pixels, const std::string& storage,
         const std::string& encoding, int jpeg_quality, std::int64_t shard_bytes, std::int64_t auto_decoded_max_bytes,
         py::object progress) {
        PrepareOptions options;
        if (const auto* one = std::get_if<std::filesystem::path>(&raw_dir)) {
          options.raw_dir = *one;
        } else {
          options.raw_dirs = std::get<std::vector<std::filesystem::path>>(raw_dir);
        }
        options.out_dir = out_dir;
        options.image_size = image_size;
        options.channels = channels;
        options.num_workers = num_workers;
        options.max_image_pixels = max_image_pixels;
        if (storage == "decoded") {
          options.storage = Storage::decoded;
        } else if (storage == "encoded") {
          options.storage = Storage::encoded;
        } else if (storage != "auto") {
          throw_data_error("storage must be auto, decoded or encoded, got '" + storage + "'");
        }
        options.encoding = encoding;
        options.jpeg_quality = jpeg_quality;
        options.shard_bytes = shard_bytes;
        options.auto_decoded_max_bytes = auto_decoded_max_bytes;
        return run_with_progress(std::move(progress),
                                 [&](const ProgressFn& report) { return prepare_dataset(options, report); });
      },
      py::arg("raw_dir"), py::arg("out_dir"), py::kw_only(), py::arg("image_size") = py::none(),
      py::arg("channels") = py::none(), py::arg("num_workers") = 0,
      py::arg("max_image_pixels") = kDefaultMaxImagePixels, py::arg("storage") = "auto",
      py::arg("encoding") = PrepareOptions{}.encoding, py::arg("jpeg_quality") = PrepareOptions{}.jpeg_quality,
      py::arg("shard_bytes") = PrepareOptions{}.shard_bytes,
      py::arg("auto_decoded_max_bytes") = PrepareOptions{}.auto_decoded_max_bytes, py::arg("progress") = py::none(),
      R"doc(Decode <raw_dir>/<split>/<class>/<image> on all cores and commit the processed dataset to out_dir.

raw_dir: one tree, or a list of trees combined into one dataset (splits of the same name joined, classes
merged by folder name; the manifest then lists files by absolute path and source_dir joins the trees with ':').

image_size: (height, width) for every image; default the size of the first image.
channels: 1 or 3; default the channel count of the first image.
num_workers: decoding threads, 0 for one per core.
max_image_pixels: an image whose header claims more pixels (width x height) is skipped before it is decoded.
storage: "decoded" (uint8 pixels), "encoded" (each image's bytes) or "auto" (decoded when every image decoded
takes at most auto_decoded_max_bytes).
encoding: for encoded storage, "png" (lossless) or "jpeg" (jpeg_quality, 1..100) re-encoded at the image shape,
or "original" (the raw files' bytes as they are).
shard_bytes: the most sample bytes per shard file (<split>-00000.pt, ...); at least one image's bytes.
progress: called as progress(done, total) from the calling thread; raising cancels the run.
Returns the Manifest. Unusable files are skipped and listed; raises FileNotFoundError for a
missing raw dir and ValueError (kiln DataError) when nothing usable is found.)doc");

  m.def("read_manifest", &read_manifest, py::arg("processed_dir"), py::call_guard<py::gil_scoped_release>(),
        "Read and validate <processed_dir>/manifest.json.");

  m.def(
      "load_split",
      [](const std::filesystem::path& processed_dir, const std::string& split) {
        SplitData data;
        {
          py::gil_scoped_release release;
          data = load_split(processed_dir, split);
        }
        return py::make_tuple(data.images, data.labels);
      },
      py::arg("processed_dir"), py::arg("split"),
      "Load (images uint8 [N,C,H,W], labels int64 [N]) of one split whole, its shards checked against the manifest "
      "(encoded ones decoded on all cores).");
}

}  // namespace kiln::bindings
