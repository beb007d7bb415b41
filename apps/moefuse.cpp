// moefuse command line: `moefuse bench` times the MoE block (forward, forward+backward, forward+dX, with --lora the
// LoRA fine-tuning step, with --nf4 the frozen steps again on 4-bit expert weights) at one shape.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "core/half.h"
#include "moefuse/moefuse.h"
#ifdef MOEFUSE_WITH_CUDA
#include <cuda_runtime.h>
#endif

using namespace moefuse;

namespace {

struct Args {
  MoeConfig cfg{1024, 512, 32, 4, true};
  std::int64_t tokens = 2048;
  DType dtype = DType::f32;
  std::string device = "cpu";
  int iters = 5;
  int lora = 0;  // rank of the adapters on both expert projections; 0: none
  bool nf4 = false;  // also the frozen steps with the expert weights in 4 bits
};

[[noreturn]] void usage(int code) {
  std::fprintf(code ? stderr : stdout,
               "usage: moefuse bench [--tokens T] [--hidden H] [--intermediate I] [--experts E] [--top-k K]\n"
               "                     [--dtype f32|bf16|f16] [--device cpu|cuda] [--iters N] [--preset 30b|235b]\n"
               "                     [--lora R] [--nf4]\n"
               "Times the MoE block: forward, forward+backward (all gradients) and forward+dX (frozen experts);\n"
               "with --lora, also forward+backward with stacked LoRA of rank R on both expert projections (experts\n"
               "frozen, the adapters' gradients formed), and its time over the frozen step's; with --nf4, the\n"
               "forward+dX step (and the LoRA step) again with both expert weights 4-bit (NF4, QLoRA), against\n"
               "the same steps on the weights' dtype.\n"
               "FLOPs are counted as 6*T*k*H*I forward, x3 with all gradients, x2 with frozen experts or LoRA (the\n"
               "adapters' FLOPs not counted).\n"
               "On a GPU the warm-up steps autotune the kernel choices of new shapes (moefuse/tune.h; the cache\n"
               "file is printed; MOEFUSE_AUTOTUNE=0 turns it off).\n");
  std::exit(code);
}

// Says what was wrong with the command line, then how to use it.
[[noreturn]] void bad(const std::string& what) {
  std::fprintf(stderr, "moefuse bench: %s\n", what.c_str());
  usage(2);
}

// The value of option `k` as a whole integer of at least `min`.
std::int64_t integer(const std::string& k, const std::string& v, std::int64_t min) {
  std::size_t end = 0;
  std::int64_t n = 0;
  try {
    n = std::stoll(v, &end);
  } catch (const std::exception&) {
    end = 0;
  }
  if (v.empty() || end != v.size()) bad(k + " expects an integer, got '" + v + "'");
  if (n < min || n > std::numeric_limits<std::int32_t>::max())
    bad(k + " must be in [" + std::to_string(min) + ", 2^31 - 1], got " + v);
  return n;
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 2; i < argc; ++i) {
    std::string k = argv[i];
    if (k == "-h" || k == "--help") usage(0);
    if (k == "--nf4") {
      a.nf4 = true;
      continue;
    }
    if (i + 1 >= argc) bad(k + " needs a value");
    std::string v = argv[++i];
    if (k == "--tokens") a.tokens = integer(k, v, 0);
    else if (k == "--hidden") a.cfg.hidden = integer(k, v, 1);
    else if (k == "--intermediate") a.cfg.intermediate = integer(k, v, 1);
    else if (k == "--experts") a.cfg.experts = static_cast<int>(integer(k, v, 1));
    else if (k == "--top-k") a.cfg.top_k = static_cast<int>(integer(k, v, 1));
    else if (k == "--iters") a.iters = static_cast<int>(integer(k, v, 1));
    else if (k == "--lora") a.lora = static_cast<int>(integer(k, v, 0));
    else if (k == "--device" && (v == "cpu" || v == "cuda")) a.device = v;
    else if (k == "--dtype" && v == "f32") a.dtype = DType::f32;
    else if (k == "--dtype" && v == "bf16") a.dtype = DType::bf16;
    else if (k == "--dtype" && v == "f16") a.dtype = DType::f16;
    else if (k == "--preset" && v == "30b") a.cfg = {2048, 768, 128, 8, true};
    else if (k == "--preset" && v == "235b") a.cfg = {4096, 1536, 128, 8, true};
    else if (k == "--device" || k == "--dtype" || k == "--preset") bad("unknown " + k.substr(2) + " '" + v + "'");
    else bad("unknown option " + k);
  }
  return a;
}

// Memory on the bench's device; a tiny RAII owner so the program cleans up on errors too.
class Buffer {
 public:
  Buffer(std::size_t bytes, bool cuda) : cuda_(cuda) {
    bytes = (bytes + 255) / 256 * 256;
#ifdef MOEFUSE_WITH_CUDA
    if (cuda_) {
      const cudaError_t e = cudaMalloc(&p_, bytes);
      if (e != cudaSuccess) throw Error(std::string("cudaMalloc of ") + std::to_string(bytes) + " bytes failed: " +
                                        cudaGetErrorString(e));
      return;
    }
#endif
    p_ = std::aligned_alloc(256, bytes ? bytes : 256);
    if (!p_) throw Error("out of host memory");
  }
  ~Buffer() {
#ifdef MOEFUSE_WITH_CUDA
    if (cuda_) { cudaFree(p_); return; }
#endif
    std::free(p_);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  void* get() const { return p_; }

 private:
  void* p_ = nullptr;
  bool cuda_;
};

// Random data of the bench dtype with standard deviation `stddev`, copied to the device. Uniform in
// [-sqrt(3), sqrt(3)] * stddev from a counter hash: fast enough for the 235B shape's billions of weights, and random
// (never zeros, which would time differently).
void fill_random(const TensorView& t, float stddev, std::uint64_t seed, bool cuda) {
  const std::int64_t n = t.numel();
  std::vector<std::uint8_t> host(t.nbytes());
  const float scale = stddev * 1.7320508f / 8388608.f;  // 24 random bits -> [-2^23, 2^23) -> [-sqrt(3), sqrt(3))
#pragma omp parallel for
  for (std::int64_t i = 0; i < n; ++i) {
    std::uint64_t z = (static_cast<std::uint64_t>(i) + seed * 0x9e3779b97f4a7c15ull) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 31)) * 0x94d049bb133111ebull;
    const float v = (static_cast<float>(z >> 40) - 8388608.f) * scale;
    if (t.dtype == DType::f32) {
      std::memcpy(host.data() + 4 * i, &v, 4);
    } else {
      const std::uint16_t h = t.dtype == DType::bf16 ? detail::f32_to_bf16(v) : detail::f32_to_f16(v);
      std::memcpy(host.data() + 2 * i, &h, 2);
    }
  }
#ifdef MOEFUSE_WITH_CUDA
  if (cuda) {
    if (cudaMemcpy(t.data, host.data(), host.size(), cudaMemcpyHostToDevice) != cudaSuccess)
      throw Error("cudaMemcpy failed");
    return;
  }
#endif
  (void)cuda;
  std::memcpy(t.data, host.data(), host.size());
}

void sync(bool cuda) {
#ifdef MOEFUSE_WITH_CUDA
  if (cuda && cudaDeviceSynchronize() != cudaSuccess) throw Error("CUDA error during the benchmark");
#endif
  (void)cuda;
}

// Median wall time in ms over `iters` runs after one warm-up (the device is synchronised around each run).
double median_ms(const std::function<void()>& fn, int iters, bool cuda) {
  fn();
  sync(cuda);
  std::vector<double> ts;
  for (int i = 0; i < iters; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    fn();
    sync(cuda);
    ts.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

int bench(const Args& a) {
  const bool cuda = a.device == "cuda";
  if (cuda && !has_cuda()) throw Error("this moefuse was built without the CUDA backend");
  const Device dev = cuda ? Device::cuda(0) : Device::cpu();
  const MoeConfig& c = a.cfg;
  const std::int64_t T = a.tokens, H = c.hidden, I = c.intermediate, E = c.experts;

  std::vector<std::unique_ptr<Buffer>> owned;
  auto alloc = [&](DType dt, std::initializer_list<std::int64_t> shape) {
    std::int64_t n = 1;
    for (auto s : shape) n *= s;
    owned.push_back(std::make_unique<Buffer>(static_cast<std::size_t>(n) * dtype_size(dt), cuda));
    return view(owned.back()->get(), dt, dev, shape);
  };
  auto bytes = [&](std::size_t n) { return alloc(DType::u8, {static_cast<std::int64_t>(n)}); };

  const TensorView x = alloc(a.dtype, {T, H});
  const MoeWeights w{alloc(a.dtype, {E, H}), alloc(a.dtype, {E, 2 * I, H}), alloc(a.dtype, {E, H, I})};
  fill_random(x, 1.f, 1, cuda);
  fill_random(w.router, 0.02f, 2, cuda);
  fill_random(w.gate_up, 0.02f, 3, cuda);
  fill_random(w.down, 0.02f, 4, cuda);

  const TensorView out = alloc(a.dtype, {T, H}), logits = alloc(a.dtype, {T, E}), grad_out = alloc(a.dtype, {T, H});
  fill_random(grad_out, 1.f, 5, cuda);
  const MoeGrads full{alloc(a.dtype, {T, H}), alloc(a.dtype, {E, H}), alloc(a.dtype, {E, 2 * I, H}),
                      alloc(a.dtype, {E, H, I})};
  const MoeGrads frozen{full.x, full.router, {}, {}};
  const TensorView saved = bytes(moe_saved_bytes(c, T, a.dtype));
  const TensorView ws_f = bytes(moe_forward_workspace_bytes(c, x, w));
  const TensorView ws_b = bytes(moe_backward_workspace_bytes(c, x, w, full));

  auto step = [&](const MoeWeights& wt, const MoeGrads& g, const TensorView& wsf, const TensorView& wsb) {
    moe_forward(c, x, wt, out, logits, saved, wsf);
    moe_backward(c, x, wt, logits, saved, grad_out, {}, g, wsb);
  };
  const double f_ms = median_ms([&] { moe_forward(c, x, w, out, logits, saved, ws_f); }, a.iters, cuda);
  const double fb_ms = median_ms([&] { step(w, full, ws_f, ws_b); }, a.iters, cuda);
  const double fx_ms = median_ms([&] { step(w, frozen, ws_f, ws_b); }, a.iters, cuda);

  // LoRA fine-tuning's step: adapters on both projections (a and b random, scale 2 as alpha = 2r), the rows u each
  // forward keeps for its backward as the torch ops keep them, gradients for x, the router and the adapters.
  double lora_ms = 0;
  MoeWeights wl = w;
  MoeGrads gl = frozen;
  if (a.lora > 0) {
    const std::int64_t r = a.lora, M = T * c.top_k;
    wl.gate_up_lora = {alloc(a.dtype, {E, r, H}), alloc(a.dtype, {E, 2 * I, r}), 2.f, alloc(a.dtype, {M, r})};
    wl.down_lora = {alloc(a.dtype, {E, r, I}), alloc(a.dtype, {E, H, r}), 2.f, alloc(a.dtype, {M, r})};
    fill_random(wl.gate_up_lora.a, 1.f / std::sqrt(static_cast<float>(H)), 6, cuda);
    fill_random(wl.gate_up_lora.b, 0.02f, 7, cuda);
    fill_random(wl.down_lora.a, 1.f / std::sqrt(static_cast<float>(I)), 8, cuda);
    fill_random(wl.down_lora.b, 0.02f, 9, cuda);
    gl.gate_up_lora = {alloc(a.dtype, {E, r, H}), alloc(a.dtype, {E, 2 * I, r})};
    gl.down_lora = {alloc(a.dtype, {E, r, I}), alloc(a.dtype, {E, H, r})};
    const TensorView lws_f = bytes(moe_forward_workspace_bytes(c, x, wl));
    const TensorView lws_b = bytes(moe_backward_workspace_bytes(c, x, wl, gl));
    lora_ms = median_ms([&] { step(wl, gl, lws_f, lws_b); }, a.iters, cuda);
  }

  // The frozen and LoRA steps again with both expert weights 4-bit (QLoRA): the ops dequantize each into their
  // workspace just before its projection, forward and backward.
  double fx4_ms = 0, lora4_ms = 0;
  if (a.nf4) {
    const TensorView gate_up4 = alloc(DType::u8, {E, 2 * I, nf4_row_bytes(H)});
    const TensorView down4 = alloc(DType::u8, {E, H, nf4_row_bytes(I)});
    nf4_quantize(w.gate_up, gate_up4);
    nf4_quantize(w.down, down4);
    auto timed = [&](MoeWeights wt, const MoeGrads& g) {
      wt.gate_up = gate_up4;
      wt.down = down4;
      const TensorView wsf = bytes(moe_forward_workspace_bytes(c, x, wt)),
                       wsb = bytes(moe_backward_workspace_bytes(c, x, wt, g));
      return median_ms([&] { step(wt, g, wsf, wsb); }, a.iters, cuda);
    };
    fx4_ms = timed(w, frozen);
    if (a.lora > 0) lora4_ms = timed(wl, gl);
  }

  const double flops = 6.0 * T * c.top_k * H * I;
  std::printf("moefuse bench: %s %s  T=%lld H=%lld I=%lld E=%lld k=%d  (median of %d)\n", a.device.c_str(),
              dtype_name(a.dtype), (long long)T, (long long)H, (long long)I, (long long)E, c.top_k, a.iters);
  if (cuda)
    std::printf("  autotuning %s%s\n", autotune_enabled() ? "on, cache " : "off",
                autotune_enabled() ? (tune_cache().path().empty() ? "in memory" : tune_cache().path().c_str()) : "");
  // One pass: its time and its rate, `passes` times the forward's FLOPs.
  const auto row = [&](const std::string& name, double ms, int passes) {
    std::printf("  %-28s %10.2f %12.1f\n", name.c_str(), ms, passes * flops / ms * 1e-6);
  };
  std::printf("  %-28s %10s %12s\n", "pass", "ms", "GFLOP/s");
  row("forward", f_ms, 1);
  row("forward+backward (all)", fb_ms, 3);
  row("forward+dX (frozen experts)", fx_ms, 2);
  if (a.lora > 0) {
    row("forward+backward, LoRA r=" + std::to_string(a.lora), lora_ms, 2);
    std::printf("  LoRA step / frozen step: %.3fx\n", lora_ms / fx_ms);
  }
  if (a.nf4) {
    row("forward+dX, 4-bit experts", fx4_ms, 2);
    std::printf("  4-bit step / frozen step: %.3fx\n", fx4_ms / fx_ms);
    if (a.lora > 0) {
      row("LoRA r=" + std::to_string(a.lora) + ", 4-bit experts", lora4_ms, 2);
      std::printf("  QLoRA step / LoRA step: %.3fx\n", lora4_ms / lora_ms);
    }
    const double mib = 1.0 / (1 << 20);
    std::printf("  expert weights: %.1f MiB in %s, %.1f MiB in 4 bits\n",
                (w.gate_up.nbytes() + w.down.nbytes()) * mib, dtype_name(a.dtype),
                static_cast<double>(E * (2 * I * nf4_row_bytes(H) + H * nf4_row_bytes(I))) * mib);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "-h") == 0 || std::strcmp(argv[1], "--help") == 0) usage(argc < 2 ? 2 : 0);
  try {
    if (std::strcmp(argv[1], "bench") == 0) return bench(parse(argc, argv));
    std::fprintf(stderr, "moefuse: unknown command '%s'\n", argv[1]);
    usage(2);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moefuse: %s\n", e.what());
    return 1;
  }
}
