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

// Temp files and staging dirs carry their owner in their names, "<host>-<pid>" (the host name with
// characters other than letters, digits, '.', '_' and '-' as '_'), so that a later run can tell which
// ones a killed process left behind.
std::string owner_tag();

// Whether `entry`, named with `tag`, was left by a process that no longer runs: `tag` names this host
// and a pid that is not running. Another host's entries (a shared volume) are never stale here. A
// bare pid (the names kiln wrote before it recorded the host) counts only if that pid is not running
// here and the entry has not been modified for an hour.
bool left_by_dead_process(std::string_view tag, const std::filesystem::path& entry);

// A file written under a temp name, `.<name>.tmp-<owner_tag>`, in its final dir and renamed into
// place by commit() after an fsync: readers see either the old file or the complete new one. Dropped
// uncommitted, the temp file is removed; temp files of the same name left by dead processes (see
// left_by_dead_process) are removed when the next one is created.
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

// Removes `path` and, for a folder, everything under it, without following symbolic links; best
// effort, never throws. Returns whether `path` is gone. kiln does not call std::filesystem::remove_all:
// torch's wheels carry and export their own copies of libstdc++'s filesystem code, the dynamic linker
// binds kiln's calls to them, and on torch 2.11+cu130 that remove_all jumped to a null address (a
// segfault when process_data.py replaced an existing dataset).
bool remove_tree(const std::filesystem::path& path) noexcept;

// A fresh staging dir next to `destination` (same file system, so it can be renamed into place).
std::filesystem::path make_staging_dir(const std::filesystem::path& destination);

// Replaces `destination` by `staging` in one step (renameat2 RENAME_EXCHANGE where available) and
// removes the old contents. A crash at any point leaves either the old or the new dir in place.
void commit_dir(const std::filesystem::path& staging, const std::filesystem::path& destination);

// Removes `.<name>.tmp-<owner>` files next to `path` that left_by_dead_process says are stale.
void remove_stale_temp_files(const std::filesystem::path& path);

// Removes staging dirs next to `destination` that left_by_dead_process says are stale. A previous
// dataset moved aside by an interrupted commit_dir is kept while `destination` does not exist.
void remove_stale_staging_dirs(const std::filesystem::path& destination);

}  // namespace kiln::detail
