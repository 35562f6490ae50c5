#include "kiln/dataset.hpp"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>

#include "kiln/detail/files.hpp"
#include "kiln/detail/tensor_file.hpp"
#include "kiln/error.hpp"

namespace kiln {
namespace fs = std::filesystem;

namespace {

constexpr std::array<std::string_view, 10> kImageExtensions = {".png",  ".jpg",  ".jpeg", ".bmp", ".tif",
                                                               ".tiff", ".webp", ".pgm",  ".ppm", ".pbm"};
constexpr const char* kLayoutHint = "expected <raw>/<split>/<class name>/<image>, e.g. raw/train/Sneaker/0001.png";

bool has_image_extension(std::string_view name) {
  const auto dot = name.rfind('.');
  if (dot == std::string_view::npos) return false;
  std::string extension(name.substr(dot));
  std::transform(extension.begin(), extension.end(), extension.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return std::find(kImageExtensions.begin(), kImageExtensions.end(), extension) != kImageExtensions.end();
}

struct DirEntry {
  std::string name;
  bool is_directory = false;
};

// Entries of `dir` sorted by name (byte order), hidden ones left out, so the same tree always gives
// the same dataset.
std::vector<DirEntry> list_dir(const fs::path& dir) {
  std::vector<DirEntry> entries;
  for (const auto& entry : fs::directory_iterator(dir)) {
    std::string name = entry.path().filename().string();
    if (!name.starts_with('.')) entries.push_back({std::move(name), entry.is_directory()});
  }
  std::sort(entries.begin(), entries.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  return entries;
}

struct Candidate {
  std::string relative;         // <split>/<class>/<name>, as listed in the manifest
  std::size_t name_offset = 0;  // where <name> starts in `relative`
  int dir = 0;                  // index into Tree::dirs
  int split = 0;
  std::int64_t label = 0;

  const char* name() const { return relative.c_str() + name_offset; }
};

struct Tree {
  std::vector<std::string> splits;
  std::vector<std::string> classes;
  // split index -> class folders present in that split
  std::vector<std::vector<std::string>> split_classes;
  std::vector<fs::path> dirs;  // the class folders, in file order
  std::vector<Candidate> files;
  std::vector<FileNote> skipped;

  fs::path path(const Candidate& file) const { return dirs[file.dir] / file.name(); }
};

void check_raw_dir(const fs::path& raw_dir) {
  if (!fs::exists(raw_dir)) throw NotFoundError("raw data dir '" + raw_dir.string() + "' does not exist");
  if (!fs::is_directory(raw_dir)) throw_data_error("raw data dir '" + raw_dir.string() + "' is not a directory");
}

std::vector<fs::path> raw_trees(const PrepareOptions& options) {
  return options.raw_dirs.empty() ? std::vector<fs::path>{options.raw_dir} : options.raw_dirs;
}

std::string describe(const std::vector<fs::path>& raw_dirs) {
  std::string text;
  for (const auto& dir : raw_dirs) text += (text.empty() ? "'" : ", '") + dir.string() + "'";
  return text;
}

// One tree: files are listed as <split>/<class>/<name>. Several: each under its tree's absolute path, so
// that the same relative name in two trees stays two distinct entries.
Tree scan_tree(const std::vector<fs::path>& raw_dirs) {
  if (raw_dirs.empty()) throw_data_error("no raw data dir given");
  for (const auto& raw_dir : raw_dirs) check_raw_dir(raw_dir);
  std::vector<std::string> entry_prefixes;
  for (const auto& raw_dir : raw_dirs) {
    const std::string canonical = fs::weakly_canonical(raw_dir).string();
    for (std::size_t d = 0; d < entry_prefixes.size(); ++d) {
      if (entry_prefixes[d] == canonical + "/") {
        throw_data_error("raw data dir '" + raw_dir.string() + "' is given twice (as '" + raw_dirs[d].string() +
                         "'); each tree's images would be counted twice");
      }
    }
    entry_prefixes.push_back(canonical + "/");
  }
  if (raw_dirs.size() == 1) entry_prefixes[0].clear();

  Tree tree;
  // split name -> for each raw dir, its class folders in that split (empty when it has no such split)
  std::vector<std::vector<std::vector<std::string>>> classes_by_dir;
  for (std::size_t d = 0; d < raw_dirs.size(); ++d) {
    bool has_split = false;
    for (const auto& split_entry : list_dir(raw_dirs[d])) {
      if (!split_entry.is_directory) continue;  // README, licence files and the like next to the splits
      has_split = true;
      auto position = std::lower_bound(tree.splits.begin(), tree.splits.end(), split_entry.name);
      const auto split = static_cast<std::size_t>(position - tree.splits.begin());
      if (position == tree.splits.end() || *position != split_entry.name) {
        tree.splits.insert(position, split_entry.name);
        classes_by_dir.insert(classes_by_dir.begin() + static_cast<std::ptrdiff_t>(split),
                              std::vector<std::vector<std::string>>(raw_dirs.size()));
      }
      auto& classes = classes_by_dir[split][d];
      for (const auto& class_entry : list_dir(raw_dirs[d] / split_entry.name)) {
        if (!class_entry.is_directory) {
          tree.skipped.push_back({entry_prefixes[d] + split_entry.name + "/" + class_entry.name,
                                  "not inside a class folder (" + std::string(kLayoutHint) + ")"});
          continue;
        }
        classes.push_back(class_entry.name);
      }
    }
    if (!has_split) {
      throw_data_error("raw data dir '" + raw_dirs[d].string() + "' holds no split folders; " + kLayoutHint);
    }
  }
  for (const auto& by_dir : classes_by_dir) {
    auto& classes = tree.split_classes.emplace_back();
    for (const auto& dir_classes : by_dir) classes.insert(classes.end(), dir_classes.begin(), dir_classes.end());
    std::sort(classes.begin(), classes.end());
    classes.erase(std::unique(classes.begin(), classes.end()), classes.end());
    tree.classes.insert(tree.classes.end(), classes.begin(), classes.end());
  }
  std::sort(tree.classes.begin(), tree.classes.end());
  tree.classes.erase(std::unique(tree.classes.begin(), tree.classes.end()), tree.classes.end());

  for (std::size_t split = 0; split < tree.splits.size(); ++split) {
    for (const auto& class_name : tree.split_classes[split]) {
      const auto label = std::lower_bound(tree.classes.begin(), tree.classes.end(), class_name) - tree.classes.begin();
      for (std::size_t d = 0; d < raw_dirs.size(); ++d) {
        const auto& dir_classes = classes_by_dir[split][d];
        if (std::find(dir_classes.begin(), dir_classes.end(), class_name) == dir_classes.end()) continue;
        const std::string prefix = entry_prefixes[d] + tree.splits[split] + "/" + class_name + "/";
        const int dir = static_cast<int>(tree.dirs.size());
        tree.dirs.push_back(raw_dirs[d] / tree.splits[split] / class_name);
        for (const auto& file : list_dir(tree.dirs.back())) {
          if (file.is_directory) {
            tree.skipped.push_back({prefix + file.name, "folder inside a class folder (not read)"});
          } else if (!has_image_extension(file.name)) {
            tree.skipped.push_back(
                {prefix + file.name, "unsupported file type '" + fs::path(file.name).extension().string() +
                                         "' (expected .png, .jpg, .jpeg, .bmp, .tif, .webp, .pgm or .ppm)"});
          } else {
            tree.files.push_back({prefix + file.name, prefix.size(), dir, static_cast<int>(split), label});
          }
        }
      }
    }
  }
  if (tree.files.empty()) {
    throw_data_error("no images found under raw data dir " + describe(raw_dirs) + "; " + kLayoutHint);
  }
  return tree;
}

int normalization_split(const Tree& tree) {
  const auto train = std::find(tree.splits.begin(), tree.splits.end(), "train");
  return train != tree.splits.end() ? static_cast<int>(train - tree.splits.begin()) : 0;
}

// The image spec of the dataset: the options where given, the rest from the first decodable image
// (of the normalisation split first, then the others, in file order).
ImageSpec choose_spec(const Tree& tree, const PrepareOptions& options, int first_split) {
  if (options.max_image_pixels < 1) {
    throw_data_error("max_image_pixels must be at least 1, got " + std::to_string(options.max_image_pixels));
  }
  if (options.channels && *options.channels != 1 && *options.channels != 3) {
    throw_data_error("channels must be 1 (grayscale) or 3 (RGB), got " + std::to_string(*options.channels));
  }
  if (options.image_size) {
    const auto [height, width] = *options.image_size;
    if (height <= 0 || width <= 0 || height > 16384 || width > 16384) {
      throw_data_error("image_size must be [height, width] with both in 1..16384, got [" + std::to_string(height) +
                       ", " + std::to_string(width) + "]");
    }
    if (options.channels) return {*options.channels, height, width};
  }
  std::vector<std::size_t> order(tree.files.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_partition(order.begin(), order.end(), [&](std::size_t i) { return tree.files[i].split == first_split; });
  std::vector<std::uint8_t> buffer;
  for (const std::size_t index : order) {
    if (!detail::read_file(tree.path(tree.files[index]), buffer).empty()) continue;
    const auto native = probe_image(buffer, nullptr, options.max_image_pixels);
    if (!native) continue;
    ImageSpec spec = *native;
    if (options.channels) spec.channels = *options.channels;
    if (options.image_size) std::tie(spec.height, spec.width) = *options.image_size;
    return spec;
  }
  return {};  // nothing decodes: every file ends up skipped, reported by the caller
}

struct ChannelStats {
  std::array<std::uint64_t, 3> sum{};
  std::array<std::uint64_t, 3> sum_of_squares{};
  std::int64_t images = 0;

  void add(const std::uint8_t* chw, const ImageSpec& spec) {
    const std::size_t plane = static_cast<std::size_t>(spec.height) * spec.width;
    for (int c = 0; c < spec.channels; ++c) {
      std::uint64_t s = 0;
      std::uint64_t sq = 0;
      for (std::size_t i = 0; i < plane; ++i) {
        const std::uint64_t v = chw[c * plane + i];
        s += v;
        sq += v * v;
      }
      sum[c] += s;
      sum_of_squares[c] += sq;
    }
    ++images;
  }
  void merge(const ChannelStats& other) {
    for (int c = 0; c < 3; ++c) {
      sum[c] += other.sum[c];
      sum_of_squares[c] += other.sum_of_squares[c];
    }
    images += other.images;
  }
};

struct SplitBuffers {
  at::Tensor images;
  at::Tensor labels;
  std::vector<std::size_t> file_of_row;
};

// Decodes every candidate into its split's preallocated tensor on `workers` threads, while the
// calling thread reports progress. Returns the per-file outcome; accumulates normalisation stats.
std::vector<DecodeResult> decode_all(const Tree& tree, const ImageSpec& spec, std::vector<SplitBuffers>& splits,
                                     const std::vector<std::int64_t>& row_of_file, int stats_split, int workers,
                                     std::int64_t max_image_pixels, const ProgressFn& progress, ChannelStats& stats) {
  const std::size_t total = tree.files.size();
  std::vector<DecodeResult> results(total);
  std::atomic<std::size_t> next{0};
  std::atomic<std::size_t> done{0};
  std::atomic<bool> stop{false};
  std::mutex mutex;
  std::condition_variable finished;
  std::exception_ptr failure;
  int running = workers;
  constexpr std::size_t kChunk = 64;

  auto work = [&] {
    ChannelStats local;
    std::vector<std::uint8_t> buffer;
    // Files are opened relative to their class folder: one path component to resolve, not five.
    detail::OpenDirectory folder;
    try {
      while (!stop.load(std::memory_order_relaxed)) {
        const std::size_t begin = next.fetch_add(kChunk);
        if (begin >= total) break;
        const std::size_t end = std::min(total, begin + kChunk);
        for (std::size_t i = begin; i < end; ++i) {
          const Candidate& file = tree.files[i];
          auto& split = splits[file.split];
          std::uint8_t* out = split.images.data_ptr<std::uint8_t>() + row_of_file[i] * spec.bytes();
          if (std::string error = detail::read_file_at(folder.open(tree.dirs[file.dir]), file.name(), buffer);
              !error.empty()) {
            results[i].error = std::move(error);
            continue;
          }
          results[i] = decode_into(buffer, spec, out, max_image_pixels);
          if (results[i].ok && file.split == stats_split) local.add(out, spec);
        }
        done.fetch_add(end - begin, std::memory_order_relaxed);
      }
    } catch (...) {
      std::lock_guard lock(mutex);
      if (!failure) failure = std::current_exception();
      stop = true;
    }
    std::lock_guard lock(mutex);
    stats.merge(local);
    if (--running == 0) finished.notify_all();
  };

  std::vector<std::thread> threads;
  threads.reserve(workers);
  for (int i = 0; i < workers; ++i) threads.emplace_back(work);
  bool cancelled = false;
  {
    std::unique_lock lock(mutex);
    while (running > 0) {
      finished.wait_for(lock, std::chrono::milliseconds(100));
      if (progress && !cancelled && running > 0) {
        lock.unlock();
        cancelled = !progress(static_cast<std::int64_t>(done.load()), static_cast<std::int64_t>(total));
        lock.lock();
        if (cancelled) stop = true;
      }
    }
  }
  for (auto& thread : threads) thread.join();
  if (failure) std::rethrow_exception(failure);
  if (cancelled) throw Cancelled("data preparation cancelled");
  if (progress && !progress(static_cast<std::int64_t>(total), static_cast<std::int64_t>(total))) {
    throw Cancelled("data preparation cancelled");
  }
  return results;
}

// Removes the rows of skipped files, keeping order; copies only when something was skipped so the
// saved tensor owns exactly its rows.
void compact(SplitBuffers& split, const std::vector<DecodeResult>& results, const ImageSpec& spec) {
  const std::int64_t rows = split.images.size(0);
  std::uint8_t* images = split.images.data_ptr<std::uint8_t>();
  std::int64_t* labels = split.labels.data_ptr<std::int64_t>();
  std::int64_t kept = 0;
  for (std::int64_t row = 0; row < rows; ++row) {
    if (!results[split.file_of_row[row]].ok) continue;
    if (kept != row) {
      std::memmove(images + kept * spec.bytes(), images + row * spec.bytes(), spec.bytes());
      labels[kept] = labels[row];
    }
    ++kept;
  }
  if (kept != rows) {
    split.images = split.images.narrow(0, 0, kept).clone();
    split.labels = split.labels.narrow(0, 0, kept).clone();
  }
}

// Removes the staging dir unless the dataset was committed, so failures leave nothing behind.
class StagingGuard {
 public:
  explicit StagingGuard(fs::path path) : path_(std::move(path)) {}
  StagingGuard(const StagingGuard&) = delete;
  StagingGuard& operator=(const StagingGuard&) = delete;
  ~StagingGuard() {
    if (!committed_) detail::remove_tree(path_);
  }
  const fs::path& path() const { return path_; }
  void committed() { committed_ = true; }

 private:
  fs::path path_;
  bool committed_ = false;
};

bool is_within(const fs::path& inner, const fs::path& outer) {
  const auto relative = inner.lexically_relative(outer);
  return !relative.empty() && *relative.begin() != "..";
}

void check_destination(const fs::path& raw_dir, const fs::path& out_dir) {
  const fs::path raw = fs::weakly_canonical(raw_dir);
  const fs::path out = fs::weakly_canonical(out_dir);
  if (is_within(out, raw)) {
    throw_data_error("processed data dir '" + out_dir.string() + "' is inside the raw data dir '" + raw_dir.string() +
                     "'; choose a dir outside it");
  }
  if (is_within(raw, out)) {
    throw_data_error("raw data dir '" + raw_dir.string() + "' is inside the processed data dir '" + out_dir.string() +
                     "', which is replaced as a whole; choose a processed dir outside it");
  }
  if (fs::exists(out_dir) && !fs::is_directory(out_dir)) {
    throw_data_error("processed data dir '" + out_dir.string() + "' exists and is not a directory");
  }
  if (fs::is_directory(out_dir) && !fs::is_empty(out_dir) && !fs::exists(out_dir / "manifest.json")) {
    throw_data_error("processed data dir '" + out_dir.string() +
                     "' exists, is not empty and holds no kiln manifest.json; kiln replaces that dir as a whole, so "
                     "choose a new or empty dir");
  }
}

}  // namespace

Manifest prepare_dataset(const PrepareOptions& options, const ProgressFn& progress) {
  const std::vector<fs::path> raw_dirs = raw_trees(options);
  for (const auto& raw_dir : raw_dirs) check_destination(raw_dir, options.out_dir);
  Tree tree = scan_tree(raw_dirs);
  const int stats_split = normalization_split(tree);
  const ImageSpec spec = choose_spec(tree, options, stats_split);

  Manifest manifest;
  manifest.kiln_version = KILN_VERSION;
  for (const auto& raw_dir : raw_dirs) {
    manifest.source_dir += (manifest.source_dir.empty() ? "" : ":") + fs::weakly_canonical(raw_dir).string();
  }
  manifest.classes = tree.classes;
  manifest.image = spec;
  manifest.normalization_split = tree.splits[stats_split];
  manifest.skipped = std::move(tree.skipped);

  std::vector<DecodeResult> results(tree.files.size());
  std::vector<SplitBuffers> buffers(tree.splits.size());
  ChannelStats stats;
  if (spec.bytes() > 0) {
    std::vector<std::int64_t> row_of_file(tree.files.size());
    for (std::size_t i = 0; i < tree.files.size(); ++i) {
      auto& split = buffers[tree.files[i].split];
      row_of_file[i] = static_cast<std::int64_t>(split.file_of_row.size());
      split.file_of_row.push_back(i);
    }
    for (std::size_t s = 0; s < buffers.size(); ++s) {
      const auto rows = static_cast<std::int64_t>(buffers[s].file_of_row.size());
      buffers[s].images = at::empty({rows, spec.channels, spec.height, spec.width}, at::kByte);
      buffers[s].labels = at::empty({rows}, at::kLong);
      for (std::int64_t row = 0; row < rows; ++row) {
        buffers[s].labels.data_ptr<std::int64_t>()[row] = tree.files[buffers[s].file_of_row[row]].label;
      }
    }
    const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    const int workers = std::clamp(options.num_workers > 0 ? options.num_workers : cores, 1,
                                   static_cast<int>(std::max<std::size_t>(1, tree.files.size() / 64 + 1)));
    results = decode_all(tree, spec, buffers, row_of_file, stats_split, workers, options.max_image_pixels, progress,
                         stats);
  } else {
    for (auto& result : results) result.error = "not a decodable image";
  }

  std::int64_t usable = 0;
  for (std::size_t i = 0; i < tree.files.size(); ++i) {
    if (!results[i].ok) {
      manifest.skipped.push_back({tree.files[i].relative, results[i].error});
    } else {
      ++usable;
      if (!results[i].conversion.empty()) manifest.converted.push_back({tree.files[i].relative, results[i].conversion});
    }
  }
  std::sort(manifest.skipped.begin(), manifest.skipped.end(),
            [](const auto& a, const auto& b) { return a.path < b.path; });
  if (usable == 0) {
    throw_data_error("no usable images under raw data dir " + describe(raw_dirs) + ": all " +
                     std::to_string(tree.files.size()) + " image files were skipped (first: " +
                     manifest.skipped.front().path + ": " + manifest.skipped.front().reason + ")");
  }

  const double pixels = static_cast<double>(stats.images) * spec.height * spec.width;
  for (int c = 0; c < spec.channels; ++c) {
    const double mean = pixels > 0 ? static_cast<double>(stats.sum[c]) / pixels / 255.0 : 0.0;
    const double mean_square =
        pixels > 0 ? static_cast<double>(stats.sum_of_squares[c]) / pixels / (255.0 * 255.0) : 0.0;
    manifest.mean.push_back(mean);
    // A constant channel would divide by zero when normalising; 1 leaves it centred only.
    const double std = std::sqrt(std::max(0.0, mean_square - mean * mean));
    manifest.std.push_back(std > 1e-12 ? std : 1.0);
  }
  if (stats.images == 0) {
    manifest.warnings.push_back("split '" + manifest.normalization_split +
                                "' has no usable images; normalisation uses mean 0 and std 1");
  }

  detail::remove_stale_staging_dirs(options.out_dir);
  StagingGuard staging(detail::make_staging_dir(options.out_dir));
  for (std::size_t s = 0; s < buffers.size(); ++s) {
    SplitBuffers& split = buffers[s];
    compact(split, results, spec);
    SplitInfo info;
    info.name = tree.splits[s];
    info.file = info.name + ".pt";
    info.count = split.images.size(0);
    for (const auto& class_name : tree.classes) info.class_counts[class_name] = 0;
    const std::int64_t* labels = split.labels.data_ptr<std::int64_t>();
    for (std::int64_t row = 0; row < info.count; ++row) ++info.class_counts[tree.classes[labels[row]]];
    for (const auto& class_name : tree.split_classes[s]) {
      if (info.class_counts[class_name] == 0) {
        manifest.warnings.push_back("class folder '" + info.name + "/" + class_name + "' has no usable images");
      }
    }
    for (const auto& class_name : tree.classes) {
      if (std::find(tree.split_classes[s].begin(), tree.split_classes[s].end(), class_name) ==
          tree.split_classes[s].end()) {
        manifest.warnings.push_back("split '" + info.name + "' has no folder for class '" + class_name + "'");
      }
    }

    c10::Dict<std::string, at::Tensor> content;
    content.insert("images", split.images);
    content.insert("labels", split.labels);
    info.bytes = detail::save_ivalue(staging.path() / info.file, c10::IValue(content));
    split = {};  // release the pixels before writing the next split
    manifest.splits.push_back(std::move(info));
  }
  write_manifest(manifest, staging.path() / "manifest.json");
  detail::commit_dir(staging.path(), options.out_dir);
  staging.committed();
  return manifest;
}

SplitData load_split(const fs::path& processed_dir, const std::string& split) {
  const Manifest manifest = read_manifest(processed_dir);
  const SplitInfo& info = manifest.split(split);
  const fs::path path = processed_dir / info.file;
  std::error_code error;
  const auto size = fs::file_size(path, error);
  if (error) {
    throw_data_error("cannot read split '" + split + "' from '" + path.string() + "': " + error.message() +
                     "; run process_data again");
  }
  if (static_cast<std::int64_t>(size) != info.bytes) {
    throw_data_error("split file '" + path.string() + "' has " + std::to_string(size) + " bytes, the manifest says " +
                     std::to_string(info.bytes) +
                     "; it is incomplete or was changed after process_data wrote it. "
                     "Run process_data again");
  }
  const c10::IValue value = detail::load_ivalue(path);
  if (!value.isGenericDict()) throw_data_error("split file '" + path.string() + "' does not hold a dict of tensors");
  const auto dict = value.toGenericDict();
  SplitData data;
  for (const auto& [key, tensor] : {std::pair{"images", &data.images}, std::pair{"labels", &data.labels}}) {
    if (!dict.contains(key) || !dict.at(key).isTensor()) {
      throw_data_error("split file '" + path.string() + "' has no tensor '" + key + "'");
    }
    *tensor = dict.at(key).toTensor();
  }
  const ImageSpec& spec = manifest.image;
  if (data.images.scalar_type() != at::kByte || data.images.dim() != 4 || data.images.size(0) != info.count ||
      data.images.size(1) != spec.channels || data.images.size(2) != spec.height || data.images.size(3) != spec.width ||
      data.labels.scalar_type() != at::kLong || data.labels.dim() != 1 || data.labels.size(0) != info.count) {
    throw_data_error("split file '" + path.string() + "' does not match its manifest (expected " +
                     std::to_string(info.count) + " images of " + to_string(spec) + " and int64 labels)");
  }
  return data;
}

}  // namespace kiln
