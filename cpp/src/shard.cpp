// Random access to a split's shards: the zip directory of each shard is read once to find where its
// records lie, the small records (labels, offsets) are read and checked, and every sample afterwards
// is one pread at a known offset, so a split far larger than memory costs 16 bytes per sample.
#include "kiln/shard.hpp"

#include <ATen/ops/empty.h>
#include <caffe2/serialize/file_adapter.h>
#include <caffe2/serialize/inline_container.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <fcntl.h>
#include <unistd.h>

#include "kiln/detail/utf8.hpp"
#include "kiln/error.hpp"

namespace kiln {
namespace fs = std::filesystem;

namespace {

constexpr const char* kRerun = "; run process_data again";

// The first line of a LibTorch error (its message without the C++ backtrace), printable.
std::string first_line(const std::exception& error) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&error);
  const std::string text = c10_error ? c10_error->msg() : error.what();
  return detail::printable_utf8(text.substr(0, text.find('\n')));
}

struct Record {
  std::size_t offset = 0;
  std::size_t size = 0;
};

}  // namespace

struct SplitReader::Shard {
  fs::path path;
  int fd = -1;
  std::int64_t count = 0;
  std::size_t data_offset = 0;        // where the samples' record starts in the file
  std::vector<std::int64_t> offsets;  // encoded: count + 1 offsets into the data record

  ~Shard() {
    if (fd >= 0) ::close(fd);
  }
  [[noreturn]] void fail(const std::string& what) const {
    throw_data_error("shard '" + path.string() + "': " + what + kRerun);
  }
};

SplitReader::SplitReader(const fs::path& processed_dir, const Manifest& manifest, const std::string& split)
    : storage_(manifest.storage), image_(manifest.image) {
  const SplitInfo& info = manifest.split(split);
  const auto classes = static_cast<std::int64_t>(manifest.classes.size());
  labels_ = at::empty({info.count}, at::kLong);
  std::int64_t* labels = labels_.data_ptr<std::int64_t>();
  first_index_.push_back(0);
  for (const ShardInfo& entry : info.shards) {
    auto shard = std::make_unique<Shard>();
    shard->path = processed_dir / entry.file;
    shard->count = entry.count;
    std::error_code error;
    const auto size = fs::file_size(shard->path, error);
    if (error) shard->fail("cannot be read: " + error.message());
    if (static_cast<std::int64_t>(size) != entry.bytes) {
      shard->fail("has " + std::to_string(size) + " bytes, the manifest says " + std::to_string(entry.bytes) +
                  "; it is incomplete or was changed after process_data wrote it");
    }
    // The records save_ivalue wrote, in the dict's order: decoded {images, labels}, encoded {data, offsets, labels}.
    const bool encoded = storage_ == Storage::encoded;
    const std::vector<std::string> names =
        encoded ? std::vector<std::string>{"data/0", "data/1", "data/2"} : std::vector<std::string>{"data/0", "data/1"};
    std::vector<Record> records(names.size());
    std::int64_t* shard_labels = labels + first_index_.back();
    try {
      caffe2::serialize::PyTorchStreamReader archive(
          std::make_shared<caffe2::serialize::FileAdapter>(shard->path.string()));
      for (std::size_t r = 0; r < names.size(); ++r) {
        if (!archive.hasRecord(names[r])) shard->fail("has no record '" + names[r] + "'; it is not a kiln shard");
        records[r] = {archive.getRecordOffset(names[r]), archive.getRecordSize(names[r])};
      }
      if (archive.hasRecord("data/" + std::to_string(names.size()))) {
        shard->fail("has more tensors than a " + to_string(storage_) + " shard; it is not a kiln shard");
      }
      const auto label_bytes = static_cast<std::size_t>(entry.count) * sizeof(std::int64_t);
      const std::size_t expected_data =
          encoded ? records[0].size : static_cast<std::size_t>(entry.count) * static_cast<std::size_t>(image_.bytes());
      const std::vector<std::size_t> expected =
          encoded ? std::vector<std::size_t>{expected_data, label_bytes + sizeof(std::int64_t), label_bytes}
                  : std::vector<std::size_t>{expected_data, label_bytes};
      for (std::size_t r = 0; r < names.size(); ++r) {
        if (records[r].size != expected[r]) {
          shard->fail("record '" + names[r] + "' has " + std::to_string(records[r].size) + " bytes, expected " +
                      std::to_string(expected[r]) + " for " + std::to_string(entry.count) + " samples of " +
                      to_string(image_) + " (" + to_string(storage_) + " storage)");
        }
        if (records[r].offset > size || records[r].size > size - records[r].offset) {
          shard->fail("record '" + names[r] + "' extends past the end of the file");
        }
      }
      if (encoded) {
        shard->offsets.resize(static_cast<std::size_t>(entry.count) + 1);
        archive.getRecord("data/1", shard->offsets.data(), records[1].size);
      }
      archive.getRecord(names.back(), shard_labels, label_bytes);
    } catch (const DataError&) {
      throw;
    } catch (const std::exception& error) {
      shard->fail("cannot be read as a zip archive: " + first_line(error));
    }
    for (std::int64_t i = 0; i < entry.count; ++i) {
      if (shard_labels[i] < 0 || shard_labels[i] >= classes) {
        shard->fail("sample " + std::to_string(i) + " has label " + std::to_string(shard_labels[i]) +
                    ", outside the dataset's " + std::to_string(classes) + " classes");
      }
    }
    if (encoded) {
      const auto& offsets = shard->offsets;
      if (offsets.front() != 0 || offsets.back() != static_cast<std::int64_t>(records[0].size)) {
        shard->fail("its offsets run from " + std::to_string(offsets.front()) + " to " +
                    std::to_string(offsets.back()) + ", not from 0 to the data's " + std::to_string(records[0].size) +
                    " bytes");
      }
      for (std::size_t i = 1; i < offsets.size(); ++i) {
        if (offsets[i] < offsets[i - 1]) shard->fail("its offsets decrease at sample " + std::to_string(i - 1));
      }
    }
    shard->data_offset = records[0].offset;
    shard->fd = ::open(shard->path.c_str(), O_RDONLY | O_CLOEXEC);
    if (shard->fd < 0) shard->fail(std::string("cannot be opened: ") + std::strerror(errno));
    first_index_.push_back(first_index_.back() + entry.count);
    shards_.push_back(std::move(shard));
  }
  if (first_index_.back() != info.count) {
    throw_data_error("split '" + split + "' of '" + processed_dir.string() + "' has " + std::to_string(info.count) +
                     " samples, its shards " + std::to_string(first_index_.back()) + kRerun);
  }
}

SplitReader::~SplitReader() = default;

std::int64_t SplitReader::size() const {
  return first_index_.back();
}

Storage SplitReader::storage() const {
  return storage_;
}

const ImageSpec& SplitReader::image() const {
  return image_;
}

const at::Tensor& SplitReader::labels() const {
  return labels_;
}

namespace {

// The shard holding sample `index` and the sample's index within it.
std::pair<std::size_t, std::int64_t> locate(const std::vector<std::int64_t>& first_index, std::int64_t index) {
  if (index < 0 || index >= first_index.back()) {
    throw std::out_of_range("sample index " + std::to_string(index) + " is outside the split's " +
                            std::to_string(first_index.back()) + " samples");
  }
  const auto after = std::upper_bound(first_index.begin(), first_index.end(), index);
  const auto shard = static_cast<std::size_t>(after - first_index.begin()) - 1;
  return {shard, index - first_index[shard]};
}

}  // namespace

std::int64_t SplitReader::sample_bytes(std::int64_t index) const {
  const auto [shard, local] = locate(first_index_, index);
  if (storage_ == Storage::decoded) return image_.bytes();
  const auto& offsets = shards_[shard]->offsets;
  return offsets[local + 1] - offsets[local];
}

void SplitReader::read(std::int64_t index, std::uint8_t* out) const {
  const auto [s, local] = locate(first_index_, index);
  const Shard& shard = *shards_[s];
  const std::int64_t start = storage_ == Storage::decoded ? local * image_.bytes() : shard.offsets[local];
  const std::int64_t bytes = sample_bytes(index);
  auto position = static_cast<off_t>(shard.data_offset + static_cast<std::size_t>(start));
  std::int64_t done = 0;
  while (done < bytes) {
    const ssize_t got = ::pread(shard.fd, out + done, static_cast<std::size_t>(bytes - done), position);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) {
      throw_data_error("cannot read " + describe(index) + ": " +
                       (got < 0 ? std::string(std::strerror(errno)) : "the file ends early") + kRerun);
    }
    done += got;
    position += got;
  }
}

std::string SplitReader::describe(std::int64_t index) const {
  const auto [shard, local] = locate(first_index_, index);
  return "shard '" + shards_[shard]->path.string() + "' (sample " + std::to_string(local) + " of " +
         std::to_string(shards_[shard]->count) + ")";
}

std::int64_t SplitReader::stored_bytes() const {
  if (storage_ == Storage::decoded) return size() * image_.bytes();
  std::int64_t total = 0;
  for (const auto& shard : shards_) total += shard->offsets.back();
  return total;
}

}  // namespace kiln
