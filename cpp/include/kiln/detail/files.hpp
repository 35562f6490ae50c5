// Small file-system helpers of the core: whole-file reads and atomic commits.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace kiln::detail {

// Reads a whole file into `buffer` (reused across calls to avoid allocations). Returns an empty
// string on success, else why the file could not be read. Byte is std::uint8_t or char.
template <typename Byte>
std::string read_file(const std::filesystem::path& path, std::vector<Byte>& buffer);

// As read_file, for `name` relative to the open directory `dir_fd` (see OpenDirectory).
std::string read_file_at(int dir_fd, const char* name, std::vector<std::uint8_t>& buffer);

// Keeps the most recently used directory open, for opening many files in the same folder.
class OpenDirectory {
 public:
  OpenDirectory() = default;
  OpenDirectory(const OpenDirectory&) = delete;
  OpenDirectory& operator=(const OpenDirectory&) = delete;
  ~OpenDirectory();

  // The descriptor of `dir` (negative with errno set if it cannot be opened).
  int open(const std::filesystem::path& dir);

 private:
  std::filesystem::path path_;
  int fd_ = -1;
};

// A file written under a temp name in its final dir and renamed into place by commit() after an
// fsync: readers see either the old file or the complete new one. Dropped uncommitted, the temp
// file is removed.
class AtomicFile {
 public:
  explicit AtomicFile(std::filesystem::path path);
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile();

  void write(const void* data, std::size_t size);
  void commit();
  std::int64_t bytes_written() const { return bytes_written_; }

 private:
  std::filesystem::path path_;
  std::filesystem::path temp_;
  int fd_ = -1;
  std::int64_t bytes_written_ = 0;
};

void write_file_atomic(const std::filesystem::path& path, std::string_view data);

// A fresh staging dir next to `destination` (same file system, so it can be renamed into place).
std::filesystem::path make_staging_dir(const std::filesystem::path& destination);

// Replaces `destination` by `staging` in one step (renameat2 RENAME_EXCHANGE where available) and
// removes the old contents. A crash at any point leaves either the old or the new dir in place.
void commit_dir(const std::filesystem::path& staging, const std::filesystem::path& destination);

// Removes staging dirs next to `destination` left behind by processes that no longer run.
void remove_stale_staging_dirs(const std::filesystem::path& destination);

}  // namespace kiln::detail
