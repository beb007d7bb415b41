// The autotuning cache (moefuse/tune.h): choices in memory, mirrored in an append-only text file.
#include "moefuse/tune.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

namespace moefuse {

TuneCache::TuneCache(std::string path) : path_(std::move(path)) {
  if (path_.empty()) return;
  std::ifstream in(path_);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    int choice = -1;
    std::string key;
    if (line.empty() || line[0] == '#' || !(fields >> choice) || choice < 0) continue;
    std::getline(fields >> std::ws, key);
    if (!key.empty()) choices_[key] = choice;  // a later line wins
  }
}

int TuneCache::find(const std::string& key) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto it = choices_.find(key);
  return it == choices_.end() ? -1 : it->second;
}

void TuneCache::keep(const std::string& key, int choice) {
  std::lock_guard<std::mutex> lock(mutex_);
  choices_[key] = choice;
  if (path_.empty()) return;
  std::error_code ec;
  const std::filesystem::path dir = std::filesystem::path(path_).parent_path();
  if (!dir.empty()) std::filesystem::create_directories(dir, ec);
  // One short line per write, appended: processes that share the file (one per GPU) do not garble it.
  std::ofstream(path_, std::ios::app) << choice << ' ' << key << '\n';
}

int TuneCache::pick(const std::string& key, int candidates, int fallback, bool may_time,
                    const std::function<double(int)>& time_us) {
  const int kept = find(key);
  if (kept >= 0 && kept < candidates) return kept;
  if (!may_time) return fallback;
  int best = fallback;
  double best_us = std::numeric_limits<double>::infinity();
  for (int i = 0; i < candidates; ++i) {
    const double us = time_us(i);
    if (us < best_us) best = i, best_us = us;
  }
  keep(key, best);
  return best;
}

namespace {
// One file per release: another release's kernels may rank otherwise.
std::string default_cache_path() {
  const std::string file = "/moefuse/tune-" MOEFUSE_VERSION ".txt";
  if (const char* p = std::getenv("MOEFUSE_TUNE_CACHE")) return p;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return x + file;
  if (const char* h = std::getenv("HOME"); h && *h) return h + std::string("/.cache") + file;
  return "";
}
}  // namespace

TuneCache& tune_cache() {
  static TuneCache cache(default_cache_path());
  return cache;
}

bool autotune_enabled() {
  const char* v = std::getenv("MOEFUSE_AUTOTUNE");
  return !(v && std::string(v) == "0");
}

}  // namespace moefuse
