#include "kiln/detail/files.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <fstream>

#include "test_helpers.hpp"

namespace kiln::detail {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

std::string slurp(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

TEST(files, read_file_reports_why_a_file_cannot_be_read) {
  TempDir dir;
  std::vector<std::uint8_t> buffer;
  EXPECT_NE(read_file(dir.path() / "missing", buffer).find("cannot open file"), std::string::npos);
  EXPECT_EQ(read_file(dir.path(), buffer), "not a regular file");
  std::ofstream(dir.path() / "empty").close();
  EXPECT_EQ(read_file(dir.path() / "empty", buffer), "empty file (0 bytes)");
  std::ofstream(dir.path() / "some") << "abc";
  EXPECT_EQ(read_file(dir.path() / "some", buffer), "");
  EXPECT_EQ(buffer.size(), 3u);
}

TEST(files, atomic_write_replaces_content_and_leaves_no_temp_file) {
  TempDir dir;
  write_file_atomic(dir.path() / "a.json", "first");
  write_file_atomic(dir.path() / "a.json", "second");
  EXPECT_EQ(slurp(dir.path() / "a.json"), "second");
  EXPECT_EQ(std::distance(fs::directory_iterator(dir.path()), fs::directory_iterator()), 1);
}

TEST(files, commit_dir_swaps_in_the_new_dir_whole) {
  TempDir dir;
  const fs::path destination = dir.path() / "processed";
  fs::create_directories(destination);
  std::ofstream(destination / "old.pt") << "old";
  const fs::path staging = make_staging_dir(destination);
  std::ofstream(staging / "new.pt") << "new";
  commit_dir(staging, destination);
  EXPECT_TRUE(fs::exists(destination / "new.pt"));
  EXPECT_FALSE(fs::exists(destination / "old.pt"));
  EXPECT_FALSE(fs::exists(staging));
}

// No process has pid 2^22 + 1 (above Linux's pid_max default).
constexpr const char* kDeadPid = "4194305";

std::string this_host() {
  const std::string tag = owner_tag();
  return tag.substr(0, tag.rfind('-'));
}

void make_old(const fs::path& path) {
  fs::last_write_time(path, fs::file_time_type::clock::now() - std::chrono::hours(2));
}

TEST(files, temp_files_name_their_host_and_process) {
  EXPECT_EQ(owner_tag(), this_host() + "-" + std::to_string(::getpid()));
  EXPECT_FALSE(this_host().empty());
  EXPECT_EQ(this_host().find('/'), std::string::npos);
}

TEST(files, the_next_atomic_write_removes_temp_files_of_dead_processes_only) {
  TempDir dir;
  const fs::path target = dir.path() / "checkpoint.pt";
  const fs::path dead = dir.path() / (".checkpoint.pt.tmp-" + this_host() + "-" + kDeadPid);
  const fs::path live = dir.path() / (".checkpoint.pt.tmp-" + this_host() + "-" + std::to_string(::getppid()));
  const fs::path other_host = dir.path() / (".checkpoint.pt.tmp-" + this_host() + "x-" + kDeadPid);
  const fs::path unowned_recent = dir.path() / ".checkpoint.pt.tmp-4194306";  // a bare pid, as kiln named them before
  const fs::path unowned_old = dir.path() / ".checkpoint.pt.tmp-4194307";
  const fs::path other_file = dir.path() / (".manifest.json.tmp-" + this_host() + "-" + kDeadPid);
  for (const auto& path : {dead, live, other_host, unowned_recent, unowned_old, other_file}) {
    std::ofstream(path) << "partial";
  }
  make_old(unowned_old);
  write_file_atomic(target, "new");
  EXPECT_EQ(slurp(target), "new");
  EXPECT_FALSE(fs::exists(dead));
  EXPECT_FALSE(fs::exists(unowned_old));
  EXPECT_TRUE(fs::exists(live));
  EXPECT_TRUE(fs::exists(other_host));  // another machine's, on a shared volume: never ours to judge
  EXPECT_TRUE(fs::exists(unowned_recent));
  EXPECT_TRUE(fs::exists(other_file));  // only the temp files of the file being written are looked at
}

TEST(files, stale_staging_dirs_of_dead_processes_are_removed) {
  TempDir dir;
  const fs::path destination = dir.path() / "processed";
  const std::string prefix = ".processed.staging-";
  const fs::path stale = dir.path() / (prefix + this_host() + "-" + kDeadPid + "-0");
  const fs::path other_host = dir.path() / (prefix + "elsewhere-" + kDeadPid + "-0");
  const fs::path unowned_recent = dir.path() / (prefix + "4194306-0");
  const fs::path unowned_old = dir.path() / (prefix + "4194307-0");
  for (const auto& path : {stale, other_host, unowned_recent, unowned_old}) fs::create_directories(path);
  make_old(unowned_old);
  const fs::path live = make_staging_dir(destination);
  EXPECT_EQ(live.filename().string().rfind(prefix + owner_tag() + "-", 0), 0u) << live;
  remove_stale_staging_dirs(destination);
  EXPECT_FALSE(fs::exists(stale));
  EXPECT_FALSE(fs::exists(unowned_old));
  EXPECT_TRUE(fs::exists(live));
  EXPECT_TRUE(fs::exists(other_host));
  EXPECT_TRUE(fs::exists(unowned_recent));
}

TEST(files, a_dataset_moved_aside_is_kept_while_it_is_the_only_copy) {
  TempDir dir;
  const fs::path destination = dir.path() / "processed";
  const fs::path aside = dir.path() / (".processed.staging-" + this_host() + "-" + kDeadPid + "-0-previous");
  fs::create_directories(aside);
  remove_stale_staging_dirs(destination);
  EXPECT_TRUE(fs::exists(aside));  // a crash between commit_dir's renames: the previous dataset
  fs::create_directories(destination);
  remove_stale_staging_dirs(destination);
  EXPECT_FALSE(fs::exists(aside));
}

TEST(files, remove_tree_removes_a_folder_tree_without_following_links) {
  TempDir dir;
  const fs::path outside = dir.path() / "outside";
  fs::create_directories(outside);
  std::ofstream(outside / "kept.txt") << "kept";
  const fs::path tree = dir.path() / "tree";
  fs::create_directories(tree / "a" / "b");
  std::ofstream(tree / "a" / "b" / "file.bin") << "data";
  std::ofstream(tree / "top.txt") << "top";
  fs::create_directory_symlink(outside, tree / "a" / "link");

  EXPECT_TRUE(remove_tree(tree));
  EXPECT_FALSE(fs::exists(tree));
  EXPECT_TRUE(fs::exists(outside / "kept.txt"));  // the link was removed, not what it points to
  EXPECT_TRUE(remove_tree(tree));                 // already gone: nothing to do
  std::ofstream(dir.path() / "single") << "x";
  EXPECT_TRUE(remove_tree(dir.path() / "single"));
  EXPECT_FALSE(fs::exists(dir.path() / "single"));
}

}  // namespace
}  // namespace kiln::detail
