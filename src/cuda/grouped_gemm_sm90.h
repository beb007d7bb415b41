// Hopper grouped GEMM: CUTLASS 3's ptr-array kernel (TMA loads, wgmma, warp-specialised persistent cooperative
// schedule, group tile scheduler) over dense per-expert operands, bf16. A small kernel writes each expert's
// problem shape and pointers from the plan's offsets on the device, so nothing waits for the host (the way
// torch._grouped_mm works). TMA cannot gather rows, so callers gather into workspace first; scales and row dots
// stay with the callers too. Built only where CUTLASS was found (MOEFUSE_SM90_GEMM); otherwise never enabled.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/gemm_kind.h"
#include "moefuse/tensor.h"

namespace moefuse::cuda {

// Dense operands of one grouped GEMM, rows of expert e being the plan's [offsets[e], offsets[e+1]):
//   fwd:   D[s, n] = sum_k A[s, k] B[e][n, k]     A [M, k], B [E, n, k], D [M, n]
//   dgrad: D[s, n] = sum_k A[s, k] B[e][k, n]     A [M, k], B [E, k, n], D [M, n]
//   wgrad: D[e][m, n] = sum_s A[s, m] B[s, n]     A [M, m], B [M, n],    D [E, m, n]; experts without rows get zeros
// Rows of experts past offsets[E] (placeholders) are not written. Every size a multiple of 8, pointers 16-byte
// aligned.
struct Sm90Gemm {
  GemmKind kind = GemmKind::fwd;
  const void* a = nullptr;
  const void* b = nullptr;
  void* d = nullptr;
  const int* offsets = nullptr;
  int experts = 0;
  int m = 0, n = 0, k = 0;  // m for wgrad, k for fwd/dgrad
};

// The forward GEMM with the gather in its loads (gather_gemm_sm90.cu), rows of expert e as above:
//   plain:  out[s, :] = x[src(s)] . W[e]^T                              W [E, n, k], out [M, n]
//   SwiGLU: (act set) h = out [M, 2n] as plain with W [E, 2n, k] = [gate; up], and
//           act[s, j] = silu(h[s, j]) h[s, n + j]
//   dgrad:  (dgrad set) out[s, :] = x[src(s)] . W[e]                    W [E, k, n], out [M, n]; plain only
// src(s) = pairs[s] / top_k (x in token order), or s itself when pairs is null (x already in sorted order).
// With lora_p set (a LoRA adapter, rank a multiple of 8 up to 64) every row also gets low[s] . lora_f[e]^T before the
// activation, low[s] = lora_scale * x[src(s)] . lora_p[e]^T being formed in the same k-loop: lora_p [E, rank, k],
// lora_f [E, rows of W, rank]; dgrad: low[s] = lora_scale * x[src(s)] . lora_p[e] and low[s] . lora_f[e], with
// lora_p [E, k, rank], lora_f [E, rank, n]. low's sorted rows [M, rank] are stored in lora_low when it is set;
// it must be when n spans more than one tile (the later n-tiles read low there).
// bf16 or f16; k and n multiples of 8, x, W, out and act 16-byte aligned. tile_offsets: M-tiles of 128 rows before
// each expert (expert_tile_offsets with bm = 128).
struct Sm90GatherGemm {
  const void* x = nullptr;
  const void* w = nullptr;
  void* out = nullptr;
  void* act = nullptr;
  const int* pairs = nullptr;
  const int* offsets = nullptr;
  const int* tile_offsets = nullptr;
  int top_k = 1, experts = 0;
  std::int64_t rows = 0;  // M, bounding the tile count
  int n = 0, k = 0;
  const void* lora_p = nullptr;
  const void* lora_f = nullptr;
  void* lora_low = nullptr;
  int rank = 0;
  float lora_scale = 1.f;
  bool dgrad = false;
};
constexpr int kSm90GatherTileM = 128;

#if MOEFUSE_SM90_GEMM
// bf16 on a device of compute capability 9.x, unless MOEFUSE_SM90=0 in the environment (for A/B timing).
bool sm90_enabled(DType dtype, const Device& device);
std::size_t sm90_workspace_bytes(GemmKind kind, int experts, const Device& device);
void run_grouped_gemm_sm90(const Sm90Gemm& g, const Device& device, void* workspace, cudaStream_t stream);
// bf16 or f16 on a device of compute capability 9.x, unless MOEFUSE_SM90=0.
bool sm90_gather_enabled(DType dtype, const Device& device);
void run_gather_gemm_sm90(const Sm90GatherGemm& g, DType dtype, cudaStream_t stream);
#else
inline bool sm90_enabled(DType, const Device&) { return false; }
inline std::size_t sm90_workspace_bytes(GemmKind, int, const Device&) { return 0; }
inline void run_grouped_gemm_sm90(const Sm90Gemm&, const Device&, void*, cudaStream_t) {}
inline bool sm90_gather_enabled(DType, const Device&) { return false; }
inline void run_gather_gemm_sm90(const Sm90GatherGemm&, DType, cudaStream_t) {}
#endif

}  // namespace moefuse::cuda
