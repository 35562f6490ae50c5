#include "kiln/detail/files.hpp"

#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstring>
#include <system_error>

namespace kiln::detail {
namespace fs = std::filesystem;

namespace {

// Closes a POSIX file descriptor when it goes out of scope.
class FileDescriptor {
 public:
  explicit FileDescriptor(int fd) : fd_(fd) {}
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  ~FileDescriptor() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }

 private:
  int fd_;
};

[[noreturn]] void throw_errno(const std::string& what, const fs::path& path) {
  throw fs::filesystem_error(what, path, std::error_code(errno, std::generic_category()));
}

constexpr std::string_view kStagingTag = ".staging-";
constexpr std::string_view kTempTag = ".tmp-";
constexpr std::string_view kMovedAsideSuffix = "-previous";

std::string staging_prefix(const fs::path& destination) {
  return "." + destination.filename().string() + std::string(kStagingTag);
}

std::string temp_prefix(const fs::path& path) {
  return "." + path.filename().string() + std::string(kTempTag);
}

bool all_digits(std::string_view text) {
  return !text.empty() && text.size() <= 10 &&
         std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; });
}

const std::string& this_host() {
  static const std::string host = [] {
    char name[HOST_NAME_MAX + 1] = {};
    if (::gethostname(name, sizeof(name) - 1) != 0 || name[0] == '\0') return std::string("localhost");
    std::string result(name);
    for (char& c : result) {
      const bool plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                         c == '_' || c == '-';
      if (!plain) c = '_';
    }
    return result;
  }();
  return host;
}

bool process_runs(long pid) {
  return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM;
}

// How long an entry named with a bare pid must be untouched before it counts as stale: a pid alone
// cannot tell this host's processes from those of another machine sharing the volume.
constexpr auto kUnownedEntryAge = std::chrono::hours(1);

}  // namespace

std::string owner_tag() {
  return this_host() + "-" + std::to_string(::getpid());
}

bool left_by_dead_process(std::string_view tag, const fs::path& entry) {
  const auto dash = tag.rfind('-');
  const std::string_view host = dash == std::string_view::npos ? std::string_view() : tag.substr(0, dash);
  const std::string_view pid_text = dash == std::string_view::npos ? tag : tag.substr(dash + 1);
  if (!all_digits(pid_text)) return false;  // not a name kiln writes
  const long pid = std::stol(std::string(pid_text));
  if (pid <= 0 || pid > INT_MAX) return false;
  if (dash != std::string_view::npos) return host == this_host() && !process_runs(pid);
  if (process_runs(pid)) return false;
  std::error_code error;
  const auto modified = fs::last_write_time(entry, error);
  return !error && fs::file_time_type::clock::now() - modified > kUnownedEntryAge;
}

namespace {

template <typename Byte>
std::string read_open_file(int fd, std::vector<Byte>& buffer) {
  struct stat info {};
  if (::fstat(fd, &info) != 0) return std::string("cannot stat file: ") + std::strerror(errno);
  if (!S_ISREG(info.st_mode)) return "not a regular file";
  if (info.st_size == 0) return "empty file (0 bytes)";
  buffer.resize(static_cast<std::size_t>(info.st_size));
  std::size_t filled = 0;
  while (filled < buffer.size()) {
    const ssize_t got = ::read(fd, buffer.data() + filled, buffer.size() - filled);
    if (got < 0) {
      if (errno == EINTR) continue;
      return std::string("cannot read file: ") + std::strerror(errno);
    }
    if (got == 0) break;  // the file shrank while we read it
    filled += static_cast<std::size_t>(got);
  }
  buffer.resize(filled);
  if (filled == 0) return "empty file (0 bytes)";
  return {};
}

}  // namespace

template <typename Byte>
std::string read_file(const fs::path& path, std::vector<Byte>& buffer) {
  FileDescriptor fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) return std::string("cannot open file: ") + std::strerror(errno);
  return read_open_file(fd.get(), buffer);
}

std::string read_file_at(int dir_fd, const char* name, std::vector<std::uint8_t>& buffer) {
  if (dir_fd < 0) return std::string("cannot open its folder: ") + std::strerror(errno);
  FileDescriptor fd(::openat(dir_fd, name, O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) return std::string("cannot open file: ") + std::strerror(errno);
  return read_open_file(fd.get(), buffer);
}

OpenDirectory::~OpenDirectory() {
  if (fd_ >= 0) ::close(fd_);
}

int OpenDirectory::open(const fs::path& dir) {
  if (fd_ >= 0 && dir.native() == path_.native()) return fd_;
  if (fd_ >= 0) ::close(fd_);
  path_ = dir;
  fd_ = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  return fd_;
}

template std::string read_file(const fs::path&, std::vector<std::uint8_t>&);
template std::string read_file(const fs::path&, std::vector<char>&);

AtomicFile::AtomicFile(fs::path path)
    : path_(std::move(path)), temp_(path_.parent_path() / (temp_prefix(path_) + owner_tag())) {
  remove_stale_temp_files(path_);
  fd_ = ::open(temp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) throw_errno("cannot create file", temp_);
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) {
    ::close(fd_);
    ::unlink(temp_.c_str());
  }
}

void AtomicFile::write(const void* data, std::size_t size) {
  const auto* bytes = static_cast<const char*>(data);
  std::size_t written = 0;
  while (written < size) {
    const ssize_t put = ::write(fd_, bytes + written, size - written);
    if (put < 0) {
      if (errno == EINTR) continue;
      throw_errno("cannot write file", temp_);
    }
    written += static_cast<std::size_t>(put);
  }
  bytes_written_ += static_cast<std::int64_t>(size);
}

void AtomicFile::commit() {
  // The data must be on disk before the rename makes it visible, or a crash could expose an empty file.
  if (::fsync(fd_) != 0) throw_errno("cannot sync file", temp_);
  if (::close(fd_) != 0) {
    fd_ = -1;
    ::unlink(temp_.c_str());
    throw_errno("cannot close file", temp_);
  }
  fd_ = -1;
  if (std::rename(temp_.c_str(), path_.c_str()) != 0) {
    const int saved = errno;
    ::unlink(temp_.c_str());
    errno = saved;
    throw_errno("cannot rename file into place", path_);
  }
}

void write_file_atomic(const fs::path& path, std::string_view data) {
  AtomicFile file(path);
  file.write(data.data(), data.size());
  file.commit();
}

namespace {

int remove_entry(const char* path, const struct stat*, int, struct FTW*) {
  ::remove(path);  // unlink for files and links, rmdir for folders (emptied first: FTW_DEPTH)
  return 0;        // carry on past what cannot be removed
}

}  // namespace

bool remove_tree(const fs::path& path) noexcept {
  struct stat info {};
  if (::lstat(path.c_str(), &info) != 0) return errno == ENOENT;
  if (S_ISDIR(info.st_mode)) {
    ::nftw(path.c_str(), remove_entry, 16, FTW_DEPTH | FTW_PHYS);
  } else {
    ::unlink(path.c_str());
  }
  return ::lstat(path.c_str(), &info) != 0 && errno == ENOENT;
}

fs::path make_staging_dir(const fs::path& destination) {
  static std::atomic<int> counter{0};
  const fs::path parent = destination.parent_path().empty() ? fs::path(".") : destination.parent_path();
  fs::create_directories(parent);
  const fs::path staging =
      parent / (staging_prefix(destination) + owner_tag() + "-" + std::to_string(counter++));
  remove_tree(staging);
  fs::create_directory(staging);
  return staging;
}

void commit_dir(const fs::path& staging, const fs::path& destination) {
  if (!fs::exists(destination)) {
    if (std::rename(staging.c_str(), destination.c_str()) != 0)
      throw_errno("cannot move dataset into place", destination);
    return;
  }
  if (::renameat2(AT_FDCWD, staging.c_str(), AT_FDCWD, destination.c_str(), RENAME_EXCHANGE) == 0) {
    remove_tree(staging);  // now holds the previous contents
    return;
  }
  if (errno != EINVAL && errno != ENOSYS && errno != ENOTSUP)
    throw_errno("cannot swap dataset into place", destination);
  // File systems without RENAME_EXCHANGE: move the old dir aside first. A crash in between leaves no
  // dataset at the destination (never a partial one) and the old one recoverable next to it.
  const fs::path aside = staging.string() + std::string(kMovedAsideSuffix);
  if (std::rename(destination.c_str(), aside.c_str()) != 0)
    throw_errno("cannot move previous dataset aside", destination);
  if (std::rename(staging.c_str(), destination.c_str()) != 0)
    throw_errno("cannot move dataset into place", destination);
  remove_tree(aside);
}

void remove_stale_temp_files(const fs::path& path) {
  const fs::path parent = path.parent_path().empty() ? fs::path(".") : path.parent_path();
  const std::string prefix = temp_prefix(path);
  // Best effort: a folder that cannot be listed leaves its temp files, never fails the write.
  std::error_code error;
  for (fs::directory_iterator it(parent, error), end; !error && it != end; it.increment(error)) {
    const std::string name = it->path().filename().string();
    if (name.rfind(prefix, 0) != 0) continue;
    if (left_by_dead_process(std::string_view(name).substr(prefix.size()), it->path())) remove_tree(it->path());
  }
}

void remove_stale_staging_dirs(const fs::path& destination) {
  const fs::path parent = destination.parent_path().empty() ? fs::path(".") : destination.parent_path();
  std::error_code error;
  if (!fs::is_directory(parent, error)) return;
  const bool destination_exists = fs::exists(destination, error);
  const std::string prefix = staging_prefix(destination);
  for (fs::directory_iterator it(parent, error), end; !error && it != end; it.increment(error)) {
    const std::string name = it->path().filename().string();
    if (name.rfind(prefix, 0) != 0) continue;
    // <owner tag>-<counter>, or <owner tag>-<counter>-previous for a dataset moved aside by commit_dir.
    std::string_view rest = std::string_view(name).substr(prefix.size());
    const bool moved_aside = rest.size() > kMovedAsideSuffix.size() &&
                             rest.substr(rest.size() - kMovedAsideSuffix.size()) == kMovedAsideSuffix;
    if (moved_aside) {
      if (!destination_exists) continue;  // the only copy of the previous dataset
      rest.remove_suffix(kMovedAsideSuffix.size());
    }
    const auto dash = rest.rfind('-');
    if (dash == std::string_view::npos || !all_digits(rest.substr(dash + 1))) continue;
    if (left_by_dead_process(rest.substr(0, dash), it->path())) remove_tree(it->path());
  }
}

}  // namespace kiln::detail
