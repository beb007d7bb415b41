// The autotuning cache (moefuse/tune.h): the fastest candidate is picked and kept, timing happens once per key,
// choices survive in the file for a new cache, unparsable lines are skipped, and without timing the fallback runs
// and nothing is kept.
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "common.h"

namespace {

// A file path under the system's temporary directory, removed with its directory when the test ends.
struct TempFile {
  std::filesystem::path dir, path;
  explicit TempFile(const std::string& name)
      : dir(std::filesystem::temp_directory_path() /
            ("moefuse_tune_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()))),
        path(dir / "sub" / name) {
    std::filesystem::remove_all(dir);
  }
  ~TempFile() { std::filesystem::remove_all(dir); }
};

TEST(Tune, PicksTheFastestOnceAndKeepsItInTheFile) {
  TempFile f("tune.txt");
  const double us[3] = {30.0, 10.0, 20.0};
  int timed = 0;
  const auto time_us = [&](int i) { return ++timed, us[i]; };
  {
    moefuse::TuneCache cache(f.path.string());
    EXPECT_EQ(cache.find("NVIDIA H200 fwd bf16"), -1);
    EXPECT_EQ(cache.pick("NVIDIA H200 fwd bf16", 3, 0, true, time_us), 1);
    EXPECT_EQ(timed, 3);
    EXPECT_EQ(cache.pick("NVIDIA H200 fwd bf16", 3, 0, true, time_us), 1);  // kept: not timed again
    EXPECT_EQ(timed, 3);
  }
  moefuse::TuneCache again(f.path.string());  // a new process reads the file (its directory was made)
  EXPECT_EQ(again.find("NVIDIA H200 fwd bf16"), 1);
  EXPECT_EQ(again.pick("NVIDIA H200 fwd bf16", 3, 0, true, time_us), 1);
  EXPECT_EQ(timed, 3);
}

TEST(Tune, WithoutTimingTheFallbackRunsAndNothingIsKept) {
  moefuse::TuneCache cache("");
  int timed = 0;
  const auto time_us = [&](int i) { return ++timed, double(i); };
  EXPECT_EQ(cache.pick("k", 2, 1, false, time_us), 1);
  EXPECT_EQ(timed, 0);
  EXPECT_EQ(cache.find("k"), -1);
  EXPECT_EQ(cache.pick("k", 2, 1, true, time_us), 0);  // memory only (empty path), but kept
  EXPECT_EQ(cache.find("k"), 0);
}

TEST(Tune, SkipsLinesItCannotReadAndChoicesOutOfRange) {
  TempFile f("tune.txt");
  std::filesystem::create_directories(f.path.parent_path());
  std::ofstream(f.path) << "# a comment\n"
                        << "garbage\n"
                        << "-1 negative\n"
                        << "1 key with spaces\n"
                        << "0 key with spaces\n"  // a later line wins
                        << "5 too many\n"
                        << "1\n";
  moefuse::TuneCache cache(f.path.string());
  EXPECT_EQ(cache.find("garbage"), -1);
  EXPECT_EQ(cache.find("negative"), -1);
  EXPECT_EQ(cache.find("key with spaces"), 0);
  EXPECT_EQ(cache.find("too many"), 5);
  int timed = 0;
  EXPECT_EQ(cache.pick("too many", 2, 0, true, [&](int i) { return ++timed, 2.0 - i; }), 1);  // 5: timed again
  EXPECT_EQ(timed, 2);
}

TEST(Tune, AnUnwritableFileKeepsChoicesInMemory) {
  TempFile f("tune.txt");
  std::filesystem::create_directories(f.dir);
  std::ofstream(f.dir / "sub") << "a file where the directory should be\n";
  moefuse::TuneCache cache(f.path.string());
  EXPECT_EQ(cache.pick("k", 2, 0, true, [](int i) { return 1.0 - i; }), 1);
  EXPECT_EQ(cache.find("k"), 1);
}

}  // namespace
