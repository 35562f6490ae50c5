#include "kiln/batch_inference.hpp"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fnmatch.h>

#include <algorithm>
#include <charconv>
#include <ctime>
#include <nlohmann/json.hpp>

#include "kiln/detail/files.hpp"
#include "kiln/error.hpp"

namespace kiln {
namespace fs = std::filesystem;

namespace {

std::vector<std::string> split_segments(std::string_view text) {
  std::vector<std::string> segments;
  std::size_t start = 0;
  while (start <= text.size()) {
    const std::size_t slash = std::min(text.find('/', start), text.size());
    if (slash > start) segments.emplace_back(text.substr(start, slash - start));
    start = slash + 1;
  }
  return segments;
}

bool match_segments(const std::vector<std::string>& pattern, std::size_t p, const std::vector<std::string>& path,
                    std::size_t q) {
  if (p == pattern.size()) return q == path.size();
  if (pattern[p] == "**") {
    for (std::size_t skip = q; skip <= path.size(); ++skip) {
      if (match_segments(pattern, p + 1, path, skip)) return true;
      if (skip < path.size() && path[skip].starts_with('.')) return false;  // ** does not enter hidden folders
    }
    return false;
  }
  return q < path.size() && ::fnmatch(pattern[p].c_str(), path[q].c_str(), FNM_PERIOD) == 0 &&
         match_segments(pattern, p + 1, path, q + 1);
}

std::string json_string(const std::string& text) {
  return nlohmann::json(text).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// Python's repr of the float: the shortest text that reads back as the same double.
std::string json_number(double value) {
  char buffer[32];
  const auto [end, error] = std::to_chars(buffer, buffer + sizeof(buffer), value);
  std::string text(buffer, end);
  if (text.find_first_of(".en") == std::string::npos) text += ".0";
  return text;
}

// The template's timestamp format: UTC, "%Y-%m-%dT%H:%M:%S+0000".
std::string utc_now() {
  const std::time_t now = std::time(nullptr);
  std::tm utc{};
  ::gmtime_r(&now, &utc);
  char buffer[32];
  std::strftime(buffer, sizeof(buffer), "%Y-%m-%dT%H:%M:%S+0000", &utc);
  return buffer;
}

}  // namespace

namespace {

// Path order, component by component ("a/x" before "a-b/x"), on the strings: '/' sorts first.
bool path_order(const std::string& a, const std::string& b) {
  const std::size_t n = std::min(a.size(), b.size());
  for (std::size_t i = 0; i < n; ++i) {
    if (a[i] == b[i]) continue;
    if (a[i] == '/') return true;
    if (b[i] == '/') return false;
    return static_cast<unsigned char>(a[i]) < static_cast<unsigned char>(b[i]);
  }
  return a.size() < b.size();
}

}  // namespace

std::vector<fs::path> find_matching_files(const fs::path& dir, std::string_view glob) {
  const std::vector<std::string> pattern = split_segments(glob);
  if (pattern.empty()) throw_data_error("the file glob is empty; expected e.g. \"*.png\" or \"**/*.png\"");
  std::error_code error;
  if (!fs::is_directory(dir, error)) {
    throw NotFoundError("input directory '" + dir.string() + "' does not exist or is not a directory");
  }
  const fs::path root = fs::absolute(dir).lexically_normal();
  const bool spans_folders = std::find(pattern.begin(), pattern.end(), "**") != pattern.end();
  // Without "**", nothing deeper than the pattern's own depth can match: those folders are not read.
  const auto max_depth = static_cast<int>(pattern.size()) - 1;
  std::vector<std::string> relative;  // the current entry's path below root, one segment per depth
  std::vector<std::string> matches;
  std::error_code ignored;
  for (auto it = fs::recursive_directory_iterator(root, fs::directory_options::skip_permission_denied);
       it != fs::recursive_directory_iterator(); ++it) {
    const int depth = it.depth();
    relative.resize(static_cast<std::size_t>(depth) + 1);
    relative.back() = it->path().filename().native();
    if (it->is_directory(ignored)) {
      if (!spans_folders && depth >= max_depth) it.disable_recursion_pending();
      continue;
    }
    if (match_segments(pattern, 0, relative, 0)) matches.push_back(it->path().native());
  }
  std::sort(matches.begin(), matches.end(), path_order);
  return {matches.begin(), matches.end()};
}

BatchInferenceSummary classify_directory(const Predictor& predictor, const BatchInferenceOptions& options,
                                         const ProgressFn& progress) {
  if (options.batch_size < 1)
    throw_data_error("batch_size must be at least 1, got " + std::to_string(options.batch_size));
  const std::vector<fs::path> files = find_matching_files(options.input_dir, options.glob);
  if (files.empty()) {
    throw DataError("no file in '" + fs::absolute(options.input_dir).string() + "' matches '" + options.glob +
                    "' (set inference.file_check_glob, e.g. \"*.jpg\" or \"**/*.png\" for sub-folders)");
  }
  const auto total = static_cast<std::int64_t>(files.size());
  const std::vector<std::string>& classes = predictor.classes();
  detail::AtomicFile output(options.output_path);
  BatchInferenceSummary summary;
  summary.files = total;

  std::vector<std::vector<std::uint8_t>> encoded;
  std::vector<std::string> read_errors;
  std::string lines;
  for (std::int64_t begin = 0; begin < total; begin += options.batch_size) {
    const std::int64_t count = std::min(options.batch_size, total - begin);
    encoded.resize(count);
    read_errors.assign(count, std::string());
    at::parallel_for(0, count, 4, [&](std::int64_t first, std::int64_t last) {
      for (std::int64_t i = first; i < last; ++i) read_errors[i] = detail::read_file(files[begin + i], encoded[i]);
    });
    std::vector<EncodedImage> images;
    images.reserve(count);
    for (std::int64_t i = 0; i < count; ++i) {
      // An unreadable file is passed on empty and keeps its read error below.
      images.emplace_back(read_errors[i].empty() ? EncodedImage(encoded[i]) : EncodedImage());
    }
    const Predictor::EncodedPredictions predictions = predictor.predict_encoded(images);
    const auto [top, label] = at::max(predictions.probabilities, 1);
    const float* top_probability = top.data_ptr<float>();
    const std::int64_t* top_label = label.data_ptr<std::int64_t>();

    const std::string time = json_string(utc_now());
    lines.clear();
    for (std::int64_t i = 0; i < count; ++i) {
      // "filepath" is the template guide's field; "image_filepath" is kiln's earlier name, kept for its readers.
      const std::string path = json_string(files[begin + i].string());
      lines += "{\"time\": " + time + ", \"filepath\": " + path + ", \"image_filepath\": " + path;
      const std::string& error = !read_errors[i].empty() ? read_errors[i] : predictions.errors[i];
      if (error.empty()) {
        lines += ", \"prediction\": " + json_string(classes[top_label[i]]) +
                 ", \"probability\": " + json_number(top_probability[i]) + "}\n";
        ++summary.classified;
      } else {
        lines += ", \"prediction\": null, \"probability\": null, \"error\": " + json_string(error) + "}\n";
        ++summary.failed;
      }
    }
    output.write(lines.data(), lines.size());
    if (progress && !progress(begin + count, total)) throw Cancelled("batch inference cancelled");
  }
  output.commit();
  return summary;
}

}  // namespace kiln
