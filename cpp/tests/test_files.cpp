#include "kiln/detail/files.hpp"

#include <gtest/gtest.h>

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

TEST(files, stale_staging_dirs_of_dead_processes_are_removed) {
  TempDir dir;
  const fs::path destination = dir.path() / "processed";
  // No process has pid 2^22 + 1 (above Linux's pid_max default).
  const fs::path stale = dir.path() / ".processed.staging-4194305-0";
  fs::create_directories(stale);
  const fs::path live = make_staging_dir(destination);
  remove_stale_staging_dirs(destination);
  EXPECT_FALSE(fs::exists(stale));
  EXPECT_TRUE(fs::exists(live));
}

}  // namespace
}  // namespace kiln::detail
