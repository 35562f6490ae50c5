// Batch inference over a directory of images: src/batch_inferencing.py's engine.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "kiln/predictor.hpp"
#include "kiln/progress.hpp"

namespace kiln {

struct BatchInferenceOptions {
  std::filesystem::path input_dir;
  std::string glob = "*.png";         // relative to input_dir; "**" matches any number of folders
  std::filesystem::path output_path;  // the JSON-lines file; replaced atomically when complete
  std::int64_t batch_size = 256;      // images read, decoded and predicted together
};

struct BatchInferenceSummary {
  std::int64_t files = 0;       // files matching the glob
  std::int64_t classified = 0;  // lines with a prediction
  std::int64_t failed = 0;      // lines with an "error" instead
};

// Classifies every file under options.input_dir matching options.glob (in path order) and writes one
// JSON line per file to options.output_path:
//   {"time": "2026-11-25T19:40:27+0000", "filepath": "/abs/dir/a.png", "image_filepath": "/abs/dir/a.png",
//    "prediction": "Sneaker", "probability": 0.98}
// "filepath" is the template guide's field; "image_filepath", kiln's earlier name, carries the same value.
// A file that cannot be read or decoded gets "prediction": null, "probability": null and an "error"
// saying why; the rest are classified. Memory stays bounded by batch_size images whatever the file
// count. The output appears only once complete (an interrupted run leaves no partial file).
// Throws NotFoundError for a missing input_dir and DataError when no file matches.
BatchInferenceSummary classify_directory(const Predictor& predictor, const BatchInferenceOptions& options,
                                         const ProgressFn& progress = {});

// The files under `dir` whose path relative to `dir` matches `glob`, sorted. Segments match with
// fnmatch(3) rules; a "**" segment matches zero or more folders. Hidden files match only a pattern
// that names the dot. Returns absolute paths.
std::vector<std::filesystem::path> find_matching_files(const std::filesystem::path& dir, std::string_view glob);

}  // namespace kiln
