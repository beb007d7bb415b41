// Autotuning: where a backend has more than one kernel for a GEMM (on Hopper, CUTLASS's grouped GEMM and moefuse's
// gather kernel for the projections whose rows are already in sorted order), the first call of each shape times
// them on its own data and keeps the fastest. The choices go to a cache file that later processes read, so each
// shape is timed once per device. Timing waits for the GPU once per new shape; it never runs during CUDA graph
// capture (a shape seen first there gets the default kernel, not kept).
//   MOEFUSE_AUTOTUNE=0     no timing and no cache: the default kernel always
//   MOEFUSE_TUNE_CACHE     the cache file; default $XDG_CACHE_HOME/moefuse/tune-<version>.txt, else
//                          ~/.cache/moefuse/tune-<version>.txt (a new release times again)
// A shape is the device's name, the GEMM, the dtype, the expert count, the weight's sizes and the rows per expert
// rounded up to a power of two. The file holds one "choice key" line per shape; delete it to time again.
#pragma once

#include <functional>
#include <map>
#include <mutex>
#include <string>

namespace moefuse {

class TuneCache {
 public:
  // Reads `path` if it exists (lines it cannot parse are skipped); an empty path keeps choices in memory only.
  explicit TuneCache(std::string path);

  // The kept choice for `key`, or -1.
  int find(const std::string& key) const;
  // Keeps `choice` for `key`, appending it to the file (a file that cannot be written leaves it in memory only).
  void keep(const std::string& key, int choice);
  // Which of `candidates` runs for `key`: the kept choice; else, if `may_time`, the one with the least
  // `time_us(candidate)`, kept; else `fallback`.
  int pick(const std::string& key, int candidates, int fallback, bool may_time,
           const std::function<double(int)>& time_us);
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  mutable std::mutex mutex_;
  std::map<std::string, int> choices_;
};

// The process's cache, at the path the environment gives (above).
TuneCache& tune_cache();
// False when MOEFUSE_AUTOTUNE=0.
bool autotune_enabled();

}  // namespace moefuse
