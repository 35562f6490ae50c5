#include "kiln/dataset.hpp"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>

#include "kiln/detail/files.hpp"
#include "kiln/detail/tensor_file.hpp"
#include "kiln/error.hpp"
#include "kiln/shard.hpp"

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

// The files [begin, end) of tree.files to decode in one go, and where their results go.
struct Chunk {
  std::size_t begin = 0;
  std::size_t end = 0;
  // Decoded storage: the file at index i goes to row i - begin of this [end - begin, C, H, W] buffer.
  // Null for encoded storage: each worker decodes into its own scratch image and keeps the bytes to store.
  std::uint8_t* pixels = nullptr;
  // Encoded storage: the bytes to store of each file (index i - begin).
  std::vector<std::vector<std::uint8_t>>* encoded = nullptr;
  // Encoded storage: no more files are started once this many bytes are encoded, so a chunk holds about a
  // shard whatever the images' sizes.
  std::int64_t byte_budget = 0;
};

struct Encoding {
  std::string name;  // png, jpeg or original
  int jpeg_quality = 90;
};

// PNG's compression level is fixed so the same pixels always give the same bytes; 3 is zlib's fast end
// with most of the size gain of higher levels on photos.
constexpr int kPngCompression = 3;

// The pixels `chw` (RGB order) encoded as `encoding` (png or jpeg). OpenCV encodes HWC in BGR order. No
// encoder option that could vary between runs is left to its default's future.
std::vector<std::uint8_t> encode_pixels(const std::uint8_t* chw, const ImageSpec& spec, const Encoding& encoding) {
  const int plane_size = spec.height * spec.width;
  std::vector<cv::Mat> planes;
  for (int c = spec.channels - 1; c >= 0; --c) {
    // cv::Mat over our own buffer, read only by merge below.
    planes.emplace_back(spec.height, spec.width, CV_8UC1, const_cast<std::uint8_t*>(chw) + c * plane_size);
  }
  cv::Mat image;
  cv::merge(planes, image);
  std::vector<std::uint8_t> bytes;
  const bool png = encoding.name == "png";
  const std::vector<int> parameters = png ? std::vector<int>{cv::IMWRITE_PNG_COMPRESSION, kPngCompression}
                                          : std::vector<int>{cv::IMWRITE_JPEG_QUALITY,     encoding.jpeg_quality,
                                                             cv::IMWRITE_JPEG_OPTIMIZE,    0,
                                                             cv::IMWRITE_JPEG_PROGRESSIVE, 0};
  if (!cv::imencode(png ? ".png" : ".jpg", image, bytes, parameters)) {
    throw_data_error("OpenCV could not encode a " + to_string(spec) + " image as " + encoding.name);
  }
  return bytes;
}

// Decodes the files of `chunk` on `workers` threads, while the calling thread reports progress (`done_before`
// files of `total` were done by earlier chunks). Fills `results` for the files it decoded and accumulates
// the normalisation stats. Returns the end of the files it decoded: chunk.end, or fewer when the chunk's
// byte budget was reached first.
std::size_t decode_chunk(const Tree& tree, const ImageSpec& spec, const Chunk& chunk, const Encoding& encoding,
                         int stats_split, int workers, std::int64_t max_image_pixels, const ProgressFn& progress,
                         std::size_t done_before, std::vector<DecodeResult>& results, ChannelStats& stats) {
  const std::size_t total = tree.files.size();
  std::atomic<std::size_t> next{chunk.begin};
  std::atomic<std::size_t> done{0};
  std::atomic<std::int64_t> encoded_bytes{0};
  std::atomic<bool> stop{false};
  std::mutex mutex;
  std::condition_variable finished;
  std::exception_ptr failure;
  int running = workers;
  // Files claimed at a time: many for pixels (their room is fixed), one for encoded bytes so the budget is
  // overshot by at most one file per worker.
  const std::size_t claim = chunk.pixels ? 64 : 1;

  auto work = [&] {
    ChannelStats local;
    std::vector<std::uint8_t> buffer;
    std::vector<std::uint8_t> scratch(chunk.pixels ? 0 : static_cast<std::size_t>(spec.bytes()));
    // Files are opened relative to their class folder: one path component to resolve, not five.
    detail::OpenDirectory folder;
    try {
      while (!stop.load(std::memory_order_relaxed)) {
        if (chunk.byte_budget > 0 && encoded_bytes.load() >= chunk.byte_budget) break;
        const std::size_t begin = next.fetch_add(claim);
        if (begin >= chunk.end) break;
        const std::size_t end = std::min(chunk.end, begin + claim);
        for (std::size_t i = begin; i < end; ++i) {
          const Candidate& file = tree.files[i];
          std::uint8_t* out = chunk.pixels ? chunk.pixels + (i - chunk.begin) * spec.bytes() : scratch.data();
          if (std::string error = detail::read_file_at(folder.open(tree.dirs[file.dir]), file.name(), buffer);
              !error.empty()) {
            results[i].error = std::move(error);
            continue;
          }
          results[i] = decode_into(buffer, spec, out, max_image_pixels);
          if (!results[i].ok) continue;
          if (file.split == stats_split) local.add(out, spec);
          if (chunk.encoded) {
            auto& stored = (*chunk.encoded)[i - chunk.begin];
            stored = encoding.name == "original" ? buffer : encode_pixels(out, spec, encoding);
            encoded_bytes += static_cast<std::int64_t>(stored.size());
          }
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
        cancelled = !progress(static_cast<std::int64_t>(done_before + done.load()), static_cast<std::int64_t>(total));
        lock.lock();
        if (cancelled) stop = true;
      }
    }
  }
  for (auto& thread : threads) thread.join();
  if (failure) std::rethrow_exception(failure);
  if (cancelled) throw Cancelled("data preparation cancelled");
  // Every claimed file was decoded: the claims are contiguous from chunk.begin.
  const std::size_t reached = std::min(next.load(), chunk.end);
  if (progress &&
      !progress(static_cast<std::int64_t>(done_before + (reached - chunk.begin)), static_cast<std::int64_t>(total))) {
    throw Cancelled("data preparation cancelled");
  }
  return reached;
}

// Writes a split's shards, <split>-00000.pt, <split>-00001.pt, ..., into the staging dir, each one as soon
// as it is complete, and keeps the split's counts.
class ShardWriter {
 public:
  ShardWriter(fs::path dir, SplitInfo& info, const std::vector<std::string>& classes, std::int64_t shard_bytes)
      : dir_(std::move(dir)), info_(info), classes_(classes), shard_bytes_(shard_bytes) {
    for (const auto& class_name : classes) info_.class_counts[class_name] = 0;
  }

  // Decoded storage: `images` [N, C, H, W] and `labels` [N] (exactly their storage) as the next shard.
  void write_decoded(const at::Tensor& images, const at::Tensor& labels) {
    c10::Dict<std::string, at::Tensor> content;
    content.insert("images", images);
    content.insert("labels", labels);
    save(content, labels);
  }

  // Encoded storage: adds the next sample, cutting a shard first when it would take this one past
  // shard_bytes.
  void add_encoded(const std::vector<std::uint8_t>& bytes, std::int64_t label) {
    if (!labels_.empty() && static_cast<std::int64_t>(data_.size() + bytes.size()) > shard_bytes_) flush();
    // Room for a whole shard up front: growing by doubling would copy it and hold up to twice its size.
    if (data_.capacity() == 0) data_.reserve(static_cast<std::size_t>(shard_bytes_));
    data_.insert(data_.end(), bytes.begin(), bytes.end());
    offsets_.push_back(static_cast<std::int64_t>(data_.size()));
    labels_.push_back(label);
  }

  // Encoded storage: writes the samples not yet in a shard.
  void flush() {
    if (labels_.empty()) return;
    const auto count = static_cast<std::int64_t>(labels_.size());
    // Tensors over the pending buffers without copying them: save_ivalue has written them when it returns.
    const at::Tensor labels = at::from_blob(labels_.data(), {count}, at::kLong);
    c10::Dict<std::string, at::Tensor> content;
    content.insert("data", at::from_blob(data_.data(), {static_cast<std::int64_t>(data_.size())}, at::kByte));
    content.insert("offsets", at::from_blob(offsets_.data(), {count + 1}, at::kLong));
    content.insert("labels", labels);
    save(content, labels);
    data_.clear();
    offsets_.assign(1, 0);
    labels_.clear();
  }

 private:
  void save(const c10::Dict<std::string, at::Tensor>& content, const at::Tensor& labels) {
    const auto count = labels.size(0);
    std::array<char, 16> number{};
    std::snprintf(number.data(), number.size(), "-%05zu.pt", info_.shards.size());
    ShardInfo shard{info_.name + number.data(), count, 0};
    shard.bytes = detail::save_ivalue(dir_ / shard.file, c10::IValue(content));
    const std::int64_t* label = labels.data_ptr<std::int64_t>();
    for (std::int64_t i = 0; i < count; ++i) ++info_.class_counts[classes_[label[i]]];
    info_.count += count;
    info_.bytes += shard.bytes;
    info_.shards.push_back(std::move(shard));
  }

  fs::path dir_;
  SplitInfo& info_;
  const std::vector<std::string>& classes_;
  std::int64_t shard_bytes_;
  std::vector<std::uint8_t> data_;
  std::vector<std::int64_t> offsets_{0};
  std::vector<std::int64_t> labels_;
};

// Decodes the files [begin, end) of one split in chunks of about a shard and writes the split's shards as
// the chunks complete, so memory holds a chunk and a shard whatever the split's size.
void prepare_split(const Tree& tree, std::size_t begin, std::size_t end, const ImageSpec& spec, Storage storage,
                   const Encoding& encoding, const PrepareOptions& options, int stats_split, const ProgressFn& progress,
                   ShardWriter& writer, std::vector<DecodeResult>& results, ChannelStats& stats) {
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int configured = options.num_workers > 0 ? options.num_workers : cores;
  const auto workers_for = [&](std::size_t files) {
    return std::clamp(configured, 1, static_cast<int>(std::max<std::size_t>(1, files / 64 + 1)));
  };
  // Decoded: a chunk is a shard's worth of rows. Encoded: a chunk ends once a shard's worth of bytes is
  // encoded, or at kMaxEncodedChunkFiles files (tiny images), which bounds its per-file byte vectors.
  const std::size_t rows_per_shard =
      static_cast<std::size_t>(std::max<std::int64_t>(1, options.shard_bytes / spec.bytes()));
  constexpr std::size_t kMaxEncodedChunkFiles = 65536;
  // Decoded: one shard's buffer for every chunk of the split, written as it is when no file was skipped
  // (a fresh allocation per chunk let the allocator keep several freed ones resident).
  at::Tensor shard_images;
  while (begin < end) {
    if (storage == Storage::decoded) {
      const std::size_t chunk_end = std::min(end, begin + rows_per_shard);
      const auto rows = static_cast<std::int64_t>(chunk_end - begin);
      if (!shard_images.defined() || shard_images.size(0) != rows) {
        shard_images = at::empty({rows, spec.channels, spec.height, spec.width}, at::kByte);
      }
      const at::Tensor& images = shard_images;
      Chunk chunk{begin, chunk_end, images.data_ptr<std::uint8_t>(), nullptr, 0};
      decode_chunk(tree, spec, chunk, encoding, stats_split, workers_for(rows), options.max_image_pixels, progress,
                   begin, results, stats);
      // Rows of skipped files are removed, keeping order; copied only when something was skipped so the
      // saved tensor owns exactly its rows.
      at::Tensor labels = at::empty({rows}, at::kLong);
      std::uint8_t* pixels = images.data_ptr<std::uint8_t>();
      std::int64_t* label = labels.data_ptr<std::int64_t>();
      std::int64_t kept = 0;
      for (std::int64_t row = 0; row < rows; ++row) {
        if (!results[begin + row].ok) continue;
        if (kept != row) std::memmove(pixels + kept * spec.bytes(), pixels + row * spec.bytes(), spec.bytes());
        label[kept++] = tree.files[begin + row].label;
      }
      if (kept > 0 && kept == rows) writer.write_decoded(images, labels);
      if (kept > 0 && kept < rows) {
        writer.write_decoded(images.narrow(0, 0, kept).clone(), labels.narrow(0, 0, kept).clone());
      }
      begin = chunk_end;
    } else {
      std::vector<std::vector<std::uint8_t>> encoded(std::min(end - begin, kMaxEncodedChunkFiles));
      Chunk chunk{begin, begin + encoded.size(), nullptr, &encoded, options.shard_bytes};
      const std::size_t reached = decode_chunk(tree, spec, chunk, encoding, stats_split, workers_for(encoded.size()),
                                               options.max_image_pixels, progress, begin, results, stats);
      for (std::size_t i = begin; i < reached; ++i) {
        if (!results[i].ok) continue;
        writer.add_encoded(encoded[i - begin], tree.files[i].label);
        encoded[i - begin] = {};
      }
      begin = reached;
    }
  }
  writer.flush();
}

void check_storage_options(const PrepareOptions& options) {
  if (options.encoding != "png" && options.encoding != "jpeg" && options.encoding != "original") {
    throw_data_error("encoding must be png, jpeg or original, got '" + options.encoding + "'");
  }
  if (options.jpeg_quality < 1 || options.jpeg_quality > 100) {
    throw_data_error("jpeg_quality must be in 1..100, got " + std::to_string(options.jpeg_quality));
  }
  if (options.shard_bytes < 1) {
    throw_data_error("shard_bytes must be at least one image's bytes, got " + std::to_string(options.shard_bytes));
  }
  if (options.auto_decoded_max_bytes < 0) {
    throw_data_error("auto_decoded_max_bytes must be 0 or more, got " + std::to_string(options.auto_decoded_max_bytes));
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
  check_storage_options(options);
  const std::vector<fs::path> raw_dirs = raw_trees(options);
  for (const auto& raw_dir : raw_dirs) check_destination(raw_dir, options.out_dir);
  Tree tree = scan_tree(raw_dirs);
  const int stats_split = normalization_split(tree);
  const ImageSpec spec = choose_spec(tree, options, stats_split);
  if (spec.bytes() > options.shard_bytes) {
    throw_data_error("shard_bytes (shard_size_mb in conf/process_data.yaml) is " + std::to_string(options.shard_bytes) +
                     " bytes, smaller than one image of " + to_string(spec) + " (" + std::to_string(spec.bytes()) +
                     " bytes); give shards room for at least one");
  }

  Manifest manifest;
  manifest.kiln_version = KILN_VERSION;
  for (const auto& raw_dir : raw_dirs) {
    manifest.source_dir += (manifest.source_dir.empty() ? "" : ":") + fs::weakly_canonical(raw_dir).string();
  }
  manifest.classes = tree.classes;
  manifest.image = spec;
  manifest.normalization_split = tree.splits[stats_split];
  manifest.skipped = std::move(tree.skipped);
  // Auto counts every candidate file, before decoding, so the choice never depends on which files turn out bad.
  const double decoded_bytes = static_cast<double>(tree.files.size()) * static_cast<double>(spec.bytes());
  manifest.storage = options.storage.value_or(
      decoded_bytes <= static_cast<double>(options.auto_decoded_max_bytes) ? Storage::decoded : Storage::encoded);
  if (manifest.storage == Storage::encoded) manifest.encoding = options.encoding;

  std::vector<DecodeResult> results(tree.files.size());
  ChannelStats stats;
  std::vector<std::string> split_warnings;
  detail::remove_stale_staging_dirs(options.out_dir);
  StagingGuard staging(detail::make_staging_dir(options.out_dir));
  std::size_t begin = 0;
  for (std::size_t s = 0; s < tree.splits.size(); ++s) {
    std::size_t end = begin;
    while (end < tree.files.size() && tree.files[end].split == static_cast<int>(s)) ++end;
    SplitInfo info;
    info.name = tree.splits[s];
    ShardWriter writer(staging.path(), info, tree.classes, options.shard_bytes);
    if (spec.bytes() > 0) {
      prepare_split(tree, begin, end, spec, manifest.storage, {options.encoding, options.jpeg_quality}, options,
                    stats_split, progress, writer, results, stats);
    } else {
      for (std::size_t i = begin; i < end; ++i) results[i].error = "not a decodable image";
    }
    for (const auto& class_name : tree.split_classes[s]) {
      if (info.class_counts[class_name] == 0) {
        split_warnings.push_back("class folder '" + info.name + "/" + class_name + "' has no usable images");
      }
    }
    for (const auto& class_name : tree.classes) {
      if (std::find(tree.split_classes[s].begin(), tree.split_classes[s].end(), class_name) ==
          tree.split_classes[s].end()) {
        split_warnings.push_back("split '" + info.name + "' has no folder for class '" + class_name + "'");
      }
    }
    manifest.splits.push_back(std::move(info));
    begin = end;
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
  manifest.warnings.insert(manifest.warnings.end(), split_warnings.begin(), split_warnings.end());

  write_manifest(manifest, staging.path() / "manifest.json");
  detail::commit_dir(staging.path(), options.out_dir);
  staging.committed();
  return manifest;
}

SplitData load_split(const fs::path& processed_dir, const std::string& split) {
  const Manifest manifest = read_manifest(processed_dir);
  const SplitReader reader(processed_dir, manifest, split);
  const ImageSpec& spec = manifest.image;
  SplitData data{at::empty({reader.size(), spec.channels, spec.height, spec.width}, at::kByte), reader.labels()};
  std::uint8_t* images = data.images.data_ptr<std::uint8_t>();
  if (reader.storage() == Storage::decoded) {
    // Reads go straight into the split's one tensor; a grain of many samples keeps them large.
    at::parallel_for(0, reader.size(), 1024, [&](std::int64_t begin, std::int64_t end) {
      for (std::int64_t i = begin; i < end; ++i) reader.read(i, images + i * spec.bytes());
    });
    return data;
  }
  at::parallel_for(0, reader.size(), 16, [&](std::int64_t begin, std::int64_t end) {
    std::vector<std::uint8_t> encoded;
    for (std::int64_t i = begin; i < end; ++i) {
      encoded.resize(static_cast<std::size_t>(reader.sample_bytes(i)));
      reader.read(i, encoded.data());
      const DecodeResult result = decode_into(encoded, spec, images + i * spec.bytes());
      if (!result.ok) {
        throw_data_error("cannot decode " + reader.describe(i) + ": " + result.error + "; run process_data again");
      }
    }
  });
  return data;
}

}  // namespace kiln
