// Times the MoE block (public API) on the GPU: forward, forward+backward (all gradients) and forward+dX (frozen
// experts), median of N iterations with CUDA events, plus a dense cuBLAS GEMM pair of the forward's FLOPs.
// FLOPs: forward 6*T*k*H*I; forward+backward 3x that; frozen 2x.
//   bench_block [out.csv]
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "moefuse/moefuse.h"

namespace {

#define CHECK(call)                                                                              \
  do {                                                                                           \
    cudaError_t e_ = (call);                                                                     \
    if (e_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s failed: %s (%s:%d)\n", #call, cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

using moefuse::Device;
using moefuse::DType;
using moefuse::TensorView;

// N(0, std) in bf16 from a counter hash (Box-Muller): fast and repeatable.
__global__ void fill_normal(__nv_bfloat16* p, std::int64_t n, float stddev, unsigned seed) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    unsigned h = static_cast<unsigned>(i) * 2654435761u ^ seed * 2246822519u ^ static_cast<unsigned>(i >> 32);
    h ^= h >> 15, h *= 2246822519u, h ^= h >> 13, h *= 3266489917u, h ^= h >> 16;
    unsigned g = h * 668265263u + 374761393u;
    g ^= g >> 15, g *= 2246822519u, g ^= g >> 13;
    const float u1 = (h >> 8) * (1.f / 16777216.f) + 1e-7f, u2 = (g >> 8) * (1.f / 16777216.f);
    p[i] = __float2bfloat16(stddev * sqrtf(-2.f * logf(u1)) * cospif(2.f * u2));
  }
}

struct Buffer {
  void* ptr = nullptr;
  explicit Buffer(std::size_t bytes) { CHECK(cudaMalloc(&ptr, std::max<std::size_t>(bytes, 1))); }
  ~Buffer() { cudaFree(ptr); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

TensorView random_bf16(std::vector<std::unique_ptr<Buffer>>& keep, std::initializer_list<std::int64_t> shape,
                       float stddev, unsigned seed) {
  std::int64_t n = 1;
  for (auto s : shape) n *= s;
  keep.push_back(std::make_unique<Buffer>(n * 2));
  fill_normal<<<1024, 256>>>(static_cast<__nv_bfloat16*>(keep.back()->ptr), n, stddev, seed);
  CHECK(cudaGetLastError());
  return moefuse::view(keep.back()->ptr, DType::bf16, Device::cuda(0), shape);
}

TensorView bytes(std::vector<std::unique_ptr<Buffer>>& keep, std::size_t n) {
  keep.push_back(std::make_unique<Buffer>(n));
  return moefuse::view(keep.back()->ptr, DType::u8, Device::cuda(0), {static_cast<std::int64_t>(n)});
}

// Median milliseconds of `iters` timed runs after `warmup` untimed ones.
double median_ms(const std::function<void()>& fn, int warmup = 3, int iters = 20) {
  for (int i = 0; i < warmup; ++i) fn();
  CHECK(cudaDeviceSynchronize());
  std::vector<double> ms;
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  for (int i = 0; i < iters; ++i) {
    CHECK(cudaEventRecord(a));
    fn();
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float t = 0;
    CHECK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  CHECK(cudaGetLastError());
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

struct Shape {
  const char* name;
  std::int64_t H, I;
  int E, k;
  std::int64_t T;
};

struct Row {
  std::string shape;
  std::int64_t T;
  double fwd_ms, fwdbwd_ms, frozen_ms, dense_ms;
};

Row run(const Shape& s) {
  std::vector<std::unique_ptr<Buffer>> keep;
  const moefuse::MoeConfig cfg{s.H, s.I, s.E, s.k, true};
  const float wstd = 0.02f;
  TensorView x = random_bf16(keep, {s.T, s.H}, 1.f, 1);
  moefuse::MoeWeights w;
  w.router = random_bf16(keep, {s.E, s.H}, wstd, 2);
  w.gate_up = random_bf16(keep, {s.E, 2 * s.I, s.H}, wstd, 3);
  w.down = random_bf16(keep, {s.E, s.H, s.I}, wstd, 4);
  TensorView out = random_bf16(keep, {s.T, s.H}, 1.f, 5);
  TensorView logits = random_bf16(keep, {s.T, s.E}, 1.f, 6);
  TensorView gout = random_bf16(keep, {s.T, s.H}, 1.f, 7);
  moefuse::MoeGrads all;
  all.x = random_bf16(keep, {s.T, s.H}, 1.f, 8);
  all.router = random_bf16(keep, {s.E, s.H}, 1.f, 9);
  all.gate_up = random_bf16(keep, {s.E, 2 * s.I, s.H}, 1.f, 10);
  all.down = random_bf16(keep, {s.E, s.H, s.I}, 1.f, 11);
  moefuse::MoeGrads frozen = all;
  frozen.gate_up = TensorView{};
  frozen.down = TensorView{};
  TensorView saved = bytes(keep, moefuse::moe_saved_bytes(cfg, s.T, DType::bf16));
  TensorView fws = bytes(keep, moefuse::moe_forward_workspace_bytes(cfg, x, w));
  TensorView bws = bytes(keep, moefuse::moe_backward_workspace_bytes(cfg, x, w, all));

  auto fwd = [&] { moefuse::moe_forward(cfg, x, w, out, logits, saved, fws); };
  Row r{s.name, s.T, 0, 0, 0, 0};
  r.fwd_ms = median_ms(fwd);
  r.fwdbwd_ms = median_ms([&] {
    fwd();
    moefuse::moe_backward(cfg, x, w, logits, saved, gout, TensorView{}, all, bws);
  });
  r.frozen_ms = median_ms([&] {
    fwd();
    moefuse::moe_backward(cfg, x, w, logits, saved, gout, TensorView{}, frozen, bws);
  });

  // Dense pair with the forward's FLOPs: [T*k, H] x [H, 2I], then [T*k, I] x [I, H].
  const std::int64_t m = s.T * s.k;
  TensorView da = random_bf16(keep, {m, s.H}, 1.f, 12), db = random_bf16(keep, {2 * s.I, s.H}, wstd, 13);
  TensorView dc = random_bf16(keep, {m, 2 * s.I}, 1.f, 14), dd = random_bf16(keep, {s.H, s.I}, wstd, 15);
  TensorView de = random_bf16(keep, {m, s.H}, 1.f, 16);
  cublasHandle_t h;
  cublasCreate(&h);
  const float one = 1.f, zero = 0.f;
  r.dense_ms = median_ms([&] {
    cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, 2 * s.I, m, s.H, &one, db.data, CUDA_R_16BF, s.H, da.data, CUDA_R_16BF,
                 s.H, &zero, dc.data, CUDA_R_16BF, 2 * s.I, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, s.H, m, s.I, &one, dd.data, CUDA_R_16BF, s.I, dc.data, CUDA_R_16BF,
                 2 * s.I, &zero, de.data, CUDA_R_16BF, s.H, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  });
  cublasDestroy(h);
  CHECK(cudaDeviceSynchronize());
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  const Shape shapes[] = {
      {"Qwen3-30B-A3B", 2048, 768, 128, 8, 4096},
      {"Qwen3-30B-A3B", 2048, 768, 128, 8, 16384},
      {"Qwen3-235B-A22B", 4096, 1536, 128, 8, 8192},
  };
  std::vector<Row> rows;
  for (const Shape& s : shapes) {
    try {
      rows.push_back(run(s));
    } catch (const std::exception& e) {
      std::fprintf(stderr, "%s T=%lld failed: %s\n", s.name, static_cast<long long>(s.T), e.what());
      return 1;
    }
    const Row& r = rows.back();
    std::fprintf(stderr, "done %s T=%lld\n", r.shape.c_str(), static_cast<long long>(r.T));
  }
  FILE* csv = argc > 1 ? std::fopen(argv[1], "w") : nullptr;
  if (csv) std::fprintf(csv, "shape,T,fwd_ms,fwd_tflops,fwdbwd_ms,fwdbwd_tflops,frozen_ms,frozen_tflops,dense_ms,dense_tflops\n");
  std::printf("%-16s %6s | %8s %7s | %9s %7s | %9s %7s | %8s %7s | fwd/dense\n", "shape", "T", "fwd ms", "TF/s",
              "f+b ms", "TF/s", "frozen ms", "TF/s", "dense ms", "TF/s");
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    const Shape& s = shapes[i];
    const double f = 6.0 * r.T * s.k * s.H * s.I / 1e9;  // GFLOP; / ms = TFLOP/s
    const double tf = f / r.fwd_ms, tfb = 3 * f / r.fwdbwd_ms, tfz = 2 * f / r.frozen_ms, td = f / r.dense_ms;
    std::printf("%-16s %6lld | %8.3f %7.1f | %9.3f %7.1f | %9.3f %7.1f | %8.3f %7.1f | %.2f\n", r.shape.c_str(),
                static_cast<long long>(r.T), r.fwd_ms, tf, r.fwdbwd_ms, tfb, r.frozen_ms, tfz, r.dense_ms, td,
                tf / td);
    if (csv)
      std::fprintf(csv, "%s,%lld,%.4f,%.1f,%.4f,%.1f,%.4f,%.1f,%.4f,%.1f\n", r.shape.c_str(),
                   static_cast<long long>(r.T), r.fwd_ms, tf, r.fwdbwd_ms, tfb, r.frozen_ms, tfz, r.dense_ms, td);
  }
  if (csv) std::fclose(csv);
  return 0;
}
