// Grouped GEMM over experts, with per-expert sizes read on the device (no host sync, graph-capturable).
//
// Every problem is C[m, n] = sum_k A(m, k) * B(n, k) for one expert e. Three kinds cover moe_linear:
//   fwd:   A = activations [rows s, K] (k inner),  B = W[e] [N, K] (k inner)      -> rows s of C
//   dgrad: A = activations [rows s, K] (k inner),  B = W[e] [K, N] (n inner)      -> rows s of C
//   wgrad: A = G [rows s, M] (m inner),            B = X [rows s, N] (n inner)    -> dW[e] [M, N], k runs over rows s
// "Rows s" are the plan's sorted rows of expert e, [offsets[e], offsets[e+1]); an operand stored in token order is
// read at row pairs[s] / top_k (the gather is fused into the tile loads).
//
// Two kernels share the tile schedule and the epilogue:
//   - tensor cores (bf16/f16, inner dims multiple of 8, 16-byte aligned): 128x128x64 tiles, 8 warps of 64x32
//     (128x32 or 32x128 when N or wgrad's M is at most 32: LoRA's rank side; wgrad's 128x64 or 64x128 up to 64),
//     mma.sync m16n8k16 with f32 accumulators, ldmatrix from XOR-swizzled shared memory, 3-stage cp.async pipeline;
//   - SIMT (f32 or unaligned shapes): 64x64x16 tiles, 4x4 outputs per thread.
// Grids are sized by upper bounds; surplus blocks exit at once.
#pragma once

#include <cstdint>

#include "cuda/async_copy.cuh"
#include "cuda/common.cuh"
#include "cuda/gemm_kind.h"
#include "cuda/scan.cuh"
#include "moefuse/ops.h"

namespace moefuse::cuda {

struct GemmOperand {
  const void* ptr = nullptr;
  std::int64_t ld = 0;             // elements between rows
  std::int64_t expert_stride = 0;  // elements between experts' matrices (weights); 0 for activations
  bool gather = false;             // sorted row s lives at row pairs[s] / top_k
};

struct GemmEpilogue {
  void* out = nullptr;  // null: only the row dot products are wanted
  std::int64_t ldo = 0;
  std::int64_t expert_stride = 0;    // wgrad: elements between experts' dW
  const float* row_scale = nullptr;  // fwd/dgrad: stored row s is scaled by row_scale[pairs[s]]
  float alpha = 1.f;                 // fwd/dgrad: and by alpha
  bool accumulate = false;           // fwd/dgrad: added to what out holds
  // fwd/dgrad: partial[s * ldp + slot] = sum over this block's columns of C[s, n] * dot_x[row(s), n] (unscaled C).
  const void* dot_x = nullptr;
  std::int64_t ldx = 0;
  bool dot_gather = false;
  float* partial = nullptr;
  int ldp = 0;
};

struct GemmParams {
  GemmOperand a, b;
  GemmEpilogue epi;
  const int* pairs = nullptr;  // plan.sorted_pairs
  int top_k = 1;
  const int* offsets = nullptr;       // [E+1]
  const int* tile_offsets = nullptr;  // [E+1] fwd/dgrad: M-tiles before each expert
  const float* k_scale = nullptr;     // wgrad: sorted row s (along k) scaled by k_scale[pairs[s]]
  // wgrad: blocks run expert by expert by default (the ones running together read the same rows). token_major runs
  // the experts fastest instead, so blocks running together read one column slice of the operand for every expert:
  // for a gathered operand each token's slice is then wanted by its top_k experts at about the same time, and L2
  // serves all but the first read (LoRA's rank side, where that operand is all the traffic).
  bool token_major = false;
  int experts = 0;
  int m = 0;  // wgrad only: rows of dW (fwd/dgrad rows come from offsets)
  int n = 0;
  int k = 0;  // fwd/dgrad only (wgrad k comes from offsets)
};

// ---------------------------------------------------------------------------------------------------------------------
// Shared pieces

__device__ __forceinline__ std::int64_t row_of(const GemmParams& p, bool gather, int s) {
  return gather ? p.pairs[s] / p.top_k : s;
}

struct Tile {
  int e, m0, m_end, n0, k0, k_end;
};

// Decodes blockIdx.x; false for a surplus block. fwd/dgrad: x = m_tile * n_tiles + n_tile (n fastest, so blocks
// running together share A rows); wgrad: x = (e * m_tiles + m_tile) * n_tiles + n_tile, or with token_major
// (m_tile * n_tiles + n_tile) * experts + e.
template <GemmKind KIND, int BM, int BN>
__device__ __forceinline__ bool decode_tile(const GemmParams& p, Tile& t) {
  const int n_tiles = (p.n + BN - 1) / BN;
  const int id = blockIdx.x;
  if constexpr (KIND == GemmKind::wgrad) {
    const int mn_tiles = (p.m + BM - 1) / BM * n_tiles;
    t.e = p.token_major ? id % p.experts : id / mn_tiles;
    const int mn = p.token_major ? id / p.experts : id % mn_tiles;
    t.m0 = (mn / n_tiles) * BM;
    t.n0 = (mn % n_tiles) * BN;
    t.m_end = p.m;
    t.k0 = p.offsets[t.e];
    t.k_end = p.offsets[t.e + 1];
  } else {
    t.n0 = (id % n_tiles) * BN;
    const int mt = id / n_tiles;
    if (mt >= p.tile_offsets[p.experts]) return false;
    t.e = expert_of_tile(p.tile_offsets, p.experts, mt);
    t.m0 = p.offsets[t.e] + (mt - p.tile_offsets[t.e]) * BM;
    t.m_end = p.offsets[t.e + 1];
    t.k0 = 0;
    t.k_end = p.k;
  }
  return true;
}

// dst[0], dst[1] = v0, v1; for 16-bit types one 4-byte store (columns are even and rows a multiple of 8 elements
// wherever the pair form runs).
template <class T>
__device__ __forceinline__ void store2(T* dst, float v0, float v1) {
  if constexpr (sizeof(T) == 2) {
    using T2 = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
    T2 v;
    v.x = from_f32<T>(v0);
    v.y = from_f32<T>(v1);
    *reinterpret_cast<T2*>(dst) = v;
  } else {
    dst[0] = from_f32<T>(v0);
    dst[1] = from_f32<T>(v1);
  }
}

// Row-wise part of the fwd/dgrad epilogue for sorted row s.
template <class T>
struct EpilogueRow {
  T* out = nullptr;
  const T* x = nullptr;
  float scale = 1.f;
  bool accumulate = false;

  __device__ __forceinline__ EpilogueRow(const GemmParams& p, int s) {
    const GemmEpilogue& ep = p.epi;
    if (ep.out) out = static_cast<T*>(ep.out) + static_cast<std::int64_t>(s) * ep.ldo;
    if (ep.partial) x = static_cast<const T*>(ep.dot_x) + row_of(p, ep.dot_gather, s) * ep.ldx;
    scale = ep.alpha * (ep.row_scale ? ep.row_scale[p.pairs[s]] : 1.f);
    accumulate = ep.accumulate;
  }
  // The SIMT epilogue's form: out[col] (+)= scale * v.
  __device__ __forceinline__ void put(int col, float v) const {
    v *= scale;
    if (accumulate) v += to_f32(out[col]);
    out[col] = from_f32<T>(v);
  }
  // The tensor-core epilogue's form: out[col], out[col + 1] = scale * v (+ held, the pair out held, read beforehand).
  __device__ __forceinline__ void put_pair(int col, float v0, float v1, std::uint32_t held) const {
    if (accumulate) {
      const T* h = reinterpret_cast<const T*>(&held);
      v0 = scale * v0 + to_f32(h[0]);
      v1 = scale * v1 + to_f32(h[1]);
    } else {
      v0 *= scale;
      v1 *= scale;
    }
    store2(out + col, v0, v1);
  }
};

// ---------------------------------------------------------------------------------------------------------------------
// Tensor-core kernel

namespace tc {

constexpr int BK = 64, THREADS = 256;

// A block tile of BM x BN over 8 warps laid out WARPS_M x WARPS_N, each warp MI x NI mma tiles of 16 x 8, with a
// STAGES-deep cp.async pipeline and at least MIN_BLOCKS blocks per SM. Wide serves the layer's GEMMs; the narrow ones
// serve LoRA's rank-r side (N = r, or wgrad's M = r), where a 128-wide tile would spend most of its MMAs on padding
// and leave the memory pipe idle.
template <int BM_, int BN_, int WARPS_M_, int STAGES_ = 3, int MIN_BLOCKS_ = 2>
struct Config {
  static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = 8 / WARPS_M_;
  static constexpr int STAGES = STAGES_, MIN_BLOCKS = MIN_BLOCKS_;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N, MI = WM / 16, NI = WN / 8;
  // Shared-memory row width of a tile stored m or n inner (dgrad's B, wgrad's A and B): the swizzle needs 64.
  static constexpr int RA = BM < 64 ? 64 : BM, RB = BN < 64 ? 64 : BN;
  static_assert(BM % 32 == 0 && BN % 32 == 0 && MI >= 1 && NI % 2 == 0, "tile shape");

  template <GemmKind KIND>
  static constexpr std::size_t smem_bytes() {
    const int a = KIND == GemmKind::wgrad ? BK * RA : BM * BK, b = KIND == GemmKind::fwd ? BN * BK : BK * RB;
    return STAGES * (a + b) * 2 + STAGES * BK * sizeof(float);
  }
};
using Wide = Config<128, 128, 2>;
using NarrowN = Config<128, 32, 8>;
// The rank-side wgrads stream each expert's rows through a block with almost no math per byte: 4 blocks of 2 stages
// per SM beat 2 of 3 by 10 % on the H100 and 3 of 3 by 16 % on the H200, where the fwd/dgrad forms lose 4 % by it
// (bench/RESULTS.md, 2026-11-28 and 2026-11-29 second).
using NarrowWgradN = Config<128, 32, 8, 2, 4>;
using NarrowWgradM = Config<32, 128, 1, 2, 4>;
// Ranks 33-64 took the wide tile, half of whose MMAs and loads then fell on padding: 64-wide tiles with 2-D warp
// grids took the two gathered wgrads of the 30B layer from 496 to 311 µs at r = 64 (H200; all warps along one
// dimension, as above: 336 µs, with a few bytes of spills; bench/RESULTS.md, 2026-11-29 fifth).
using NarrowWgradN64 = Config<128, 64, 4, 2, 4>;
using NarrowWgradM64 = Config<64, 128, 2, 2, 4>;

template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&r)[4], const void* p) {
  if constexpr (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

template <class T>
__device__ __forceinline__ void mma16816(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                         std::uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <class T>
__device__ __forceinline__ void scale_pair(std::uint32_t& r, std::uint32_t s) {
  using T2 = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
  T2 v = __hmul2(*reinterpret_cast<T2*>(&r), *reinterpret_cast<T2*>(&s));
  r = *reinterpret_cast<std::uint32_t*>(&v);
}

// Stage load of a tile stored with k as its rows: BK rows from k0 (sorted rows, or W[e]'s rows in dgrad), columns
// [col0, col0 + W) of an operand with row stride ld, into a shared tile of row width R. Four threads share a row, each
// copy of the four covering 64 contiguous bytes of it, so that a thread looks a gathered row up (a load and a
// division) once per stage rather than once per 16 bytes: LoRA's rank-side wgrads are bound by instruction issue, not
// by memory (bench/RESULTS.md, 2026-11-29 second).
template <class T, int W, int R>
__device__ __forceinline__ void load_k_rows(T* dst, const GemmParams& p, bool gather, std::int64_t ld, const T* base,
                                            int k0, int k_end, int col0, int cols, int tid) {
  static_assert(THREADS == 4 * BK && W % 32 == 0, "four threads per k row");
  const int r = static_cast<unsigned>(tid) / 4, s = k0 + r;
  const std::int64_t row = s >= k_end ? -1 : gather ? p.pairs[s] / p.top_k : s;
#pragma unroll
  for (int i = 0; i < W / 32; ++i) {
    const int c = static_cast<unsigned>(tid) % 4 + 4 * i, col = col0 + c * 8;
    const bool ok = row >= 0 && col < cols;
    cp_async16(dst + swz<R>(r, c), ok ? base + row * ld + col : base, ok);
  }
}

template <class T, GemmKind KIND, class C>
__global__ void __launch_bounds__(THREADS, C::MIN_BLOCKS) grouped_gemm_tc(const GemmParams p) {
  constexpr bool kWgrad = KIND == GemmKind::wgrad;
  constexpr bool kBKInner = KIND == GemmKind::fwd;
  constexpr int BM = C::BM, BN = C::BN, WM = C::WM, WN = C::WN, MI = C::MI, NI = C::NI, STAGES = C::STAGES;
  constexpr int A_STAGE = kWgrad ? BK * C::RA : BM * BK, B_STAGE = kBKInner ? BN * BK : BK * C::RB;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sa = reinterpret_cast<T*>(smem);
  T* sb = sa + STAGES * A_STAGE;
  float* sscale = reinterpret_cast<float*>(sb + STAGES * B_STAGE);

  Tile tl;
  if (!decode_tile<KIND, BM, BN>(p, tl)) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / C::WARPS_N, wn = warp % C::WARPS_N;
  const T* a_base = static_cast<const T*>(p.a.ptr) + tl.e * p.a.expert_stride;
  const T* b_base = static_cast<const T*>(p.b.ptr) + tl.e * p.b.expert_stride;
  const bool scaled = kWgrad && p.k_scale != nullptr;

  // Rows that stay fixed over the k loop (fwd/dgrad A; fwd B): chunk tid & 7 of rows tid/8 + 32i.
  const T* a_rows[BM / 32] = {};
  const T* b_rows[BN / 32] = {};
  if constexpr (!kWgrad) {
#pragma unroll
    for (int i = 0; i < BM / 32; ++i) {
      const int s = tl.m0 + (tid >> 3) + 32 * i;
      if (s < tl.m_end) a_rows[i] = a_base + row_of(p, p.a.gather, s) * p.a.ld;
    }
    if constexpr (kBKInner) {
#pragma unroll
      for (int i = 0; i < BN / 32; ++i) {
        const int n = tl.n0 + (tid >> 3) + 32 * i;
        if (n < p.n) b_rows[i] = b_base + static_cast<std::int64_t>(n) * p.b.ld;
      }
    }
  }

  auto load_stage = [&](int stage, int kt) {
    const int k0 = tl.k0 + kt * BK;
    T* sA = sa + stage * A_STAGE;
    T* sB = sb + stage * B_STAGE;
    if constexpr (!kWgrad) {
      const int c = tid & 7, kc = k0 + c * 8;
      const bool k_ok = kc < tl.k_end;
#pragma unroll
      for (int i = 0; i < BM / 32; ++i) {
        const bool ok = k_ok && a_rows[i] != nullptr;
        cp_async16(sA + swz<BK>((tid >> 3) + 32 * i, c), ok ? a_rows[i] + kc : a_base, ok);
      }
      if constexpr (kBKInner) {
#pragma unroll
        for (int i = 0; i < BN / 32; ++i) {
          const bool ok = k_ok && b_rows[i] != nullptr;
          cp_async16(sB + swz<BK>((tid >> 3) + 32 * i, c), ok ? b_rows[i] + kc : b_base, ok);
        }
      } else {  // dgrad: W[e] rows along k, n inner
        load_k_rows<T, BN, C::RB>(sB, p, false, p.b.ld, b_base, k0, tl.k_end, tl.n0, p.n, tid);
      }
    } else {  // wgrad: both operands are sorted rows along k
      load_k_rows<T, BM, C::RA>(sA, p, p.a.gather, p.a.ld, a_base, k0, tl.k_end, tl.m0, p.m, tid);
      load_k_rows<T, BN, C::RB>(sB, p, p.b.gather, p.b.ld, b_base, k0, tl.k_end, tl.n0, p.n, tid);
      if (scaled && tid < BK) {
        const int s = k0 + tid;
        sscale[stage * BK + tid] = s < tl.k_end ? p.k_scale[p.pairs[s]] : 0.f;
      }
    }
  };

  float acc[MI][NI][4] = {};
  const int nk = (tl.k_end - tl.k0 + BK - 1) / BK;
  // Narrow tiles skip the mma tiles wholly past the problem's rows or columns (LoRA's rank side pads r = 16 to 32).
  constexpr bool kSkip = BM < 64 || BN < 64;
  const int m_left = (kWgrad ? p.m : tl.m_end) - tl.m0 - wm * WM, n_left = p.n - tl.n0 - wn * WN;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nk) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < nk; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // stage kt is visible to all; everyone is done with stage kt - 1, which is refilled next
    if (kt + STAGES - 1 < nk) load_stage((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
    cp_async_commit();

    const int stage = kt % STAGES;
    const T* sA = sa + stage * A_STAGE;
    const T* sB = sb + stage * B_STAGE;
    const int k_left = tl.k_end - tl.k0 - kt * BK;  // past it the tile holds zeros: K = r skips 3 of 4 slices
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      if (kk * 16 >= k_left) break;
      std::uint32_t af[MI][4], bf[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        if (kSkip && mi * 16 >= m_left) break;
        const int m = wm * WM + mi * 16;
        if constexpr (!kWgrad) {
          const int r = m + (lane & 15);
          ldmatrix_x4<false>(af[mi], sA + swz<BK>(r, kk * 2 + (lane >> 4)));
        } else {
          const int r = kk * 16 + (lane & 7) + ((lane >> 4) << 3);
          ldmatrix_x4<true>(af[mi], sA + swz<C::RA>(r, (m >> 3) + ((lane >> 3) & 1)));
        }
      }
      if (scaled) {  // per-k weights: registers 0,1 hold k = 2t, 2t+1; registers 2,3 hold k = 2t+8, 2t+9
        const float* sc = sscale + stage * BK + kk * 16 + (lane & 3) * 2;
        const std::uint32_t lo = pack2<T>(sc[0], sc[1]), hi = pack2<T>(sc[8], sc[9]);
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          if (kSkip && mi * 16 >= m_left) break;
          scale_pair<T>(af[mi][0], lo);
          scale_pair<T>(af[mi][1], lo);
          scale_pair<T>(af[mi][2], hi);
          scale_pair<T>(af[mi][3], hi);
        }
      }
#pragma unroll
      for (int nj = 0; nj < NI / 2; ++nj) {
        const int n = wn * WN + nj * 16;
        std::uint32_t r4[4];
        if constexpr (kBKInner) {
          const int r = n + (lane & 7) + ((lane >> 4) << 3);
          ldmatrix_x4<false>(r4, sB + swz<BK>(r, kk * 2 + ((lane >> 3) & 1)));
        } else {
          const int r = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
          ldmatrix_x4<true>(r4, sB + swz<C::RB>(r, (n >> 3) + (lane >> 4)));
        }
        bf[2 * nj][0] = r4[0];
        bf[2 * nj][1] = r4[1];
        bf[2 * nj + 1][0] = r4[2];
        bf[2 * nj + 1][1] = r4[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
          if (!kSkip || (mi * 16 < m_left && ni * 8 < n_left)) mma16816<T>(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
    }
  }
  cp_async_wait<0>();

  // Epilogue: accumulator (mi, ni, h*2 + j) is row wm*WM + mi*16 + lane/4 + 8h, column wn*WN + ni*8 + 2*(lane%4) + j.
  const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = tl.m0 + wm * WM + mi * 16 + g + 8 * h;
      const bool row_ok = row < tl.m_end;
      if constexpr (kWgrad) {
        if (!row_ok) continue;
        T* out = static_cast<T*>(p.epi.out) + tl.e * p.epi.expert_stride + static_cast<std::int64_t>(row) * p.epi.ldo;
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
          const int col = tl.n0 + wn * WN + ni * 8 + t4 * 2;
          if (col < p.n) store2(out + col, acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
        }
      } else {
        float dot = 0.f;
        if (row_ok) {
          const EpilogueRow<T> er(p, row);
          std::uint32_t held[NI] = {};  // accumulating: the row's pairs, all loads issued before any store
          if (er.accumulate) {
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
              const int col = tl.n0 + wn * WN + ni * 8 + t4 * 2;
              if (col < p.n) held[ni] = *reinterpret_cast<const std::uint32_t*>(er.out + col);
            }
          }
#pragma unroll
          for (int ni = 0; ni < NI; ++ni) {
            const int col = tl.n0 + wn * WN + ni * 8 + t4 * 2;
            if (col >= p.n) continue;
            const float v0 = acc[mi][ni][2 * h], v1 = acc[mi][ni][2 * h + 1];
            if (er.x) dot += v0 * to_f32(er.x[col]) + v1 * to_f32(er.x[col + 1]);
            if (er.out) er.put_pair(col, v0, v1, held[ni]);
          }
        }
        if (p.epi.partial) {  // the 4 lanes of a row hold its WN columns of this warp
          dot += __shfl_xor_sync(0xffffffffu, dot, 1);
          dot += __shfl_xor_sync(0xffffffffu, dot, 2);
          if (row_ok && t4 == 0)
            p.epi.partial[static_cast<std::int64_t>(row) * p.epi.ldp + (tl.n0 / BN) * C::WARPS_N + wn] = dot;
        }
      }
    }
  }
}

}  // namespace tc

// ---------------------------------------------------------------------------------------------------------------------
// SIMT kernel (f32, and 16-bit shapes the tensor-core loads cannot take)

namespace simt {

constexpr int BM = 64, BN = 64, BK = 16, THREADS = 256;

template <class T, GemmKind KIND>
__global__ void __launch_bounds__(THREADS) grouped_gemm_simt(const GemmParams p) {
  constexpr bool kWgrad = KIND == GemmKind::wgrad;
  __shared__ float sA[BK][BM + 4];
  __shared__ float sB[BK][BN + 4];
  __shared__ float sdot[BM][BN / 4 + 1];

  Tile tl;
  if (!decode_tile<KIND, BM, BN>(p, tl)) return;
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const T* a_base = static_cast<const T*>(p.a.ptr) + tl.e * p.a.expert_stride;
  const T* b_base = static_cast<const T*>(p.b.ptr) + tl.e * p.b.expert_stride;

  float acc[4][4] = {};
  for (int k0 = tl.k0; k0 < tl.k_end; k0 += BK) {
#pragma unroll
    for (int i = 0; i < BM * BK / THREADS; ++i) {
      const int idx = tid + i * THREADS;
      float va = 0.f, vb = 0.f;
      if constexpr (!kWgrad) {
        const int m = idx / BK, kx = idx % BK, s = tl.m0 + m, k = k0 + kx;
        if (s < tl.m_end && k < tl.k_end) va = to_f32(a_base[row_of(p, p.a.gather, s) * p.a.ld + k]);
        sA[kx][m] = va;
        if constexpr (KIND == GemmKind::fwd) {
          const int n = tl.n0 + m;  // same index split: n outer, k inner
          if (n < p.n && k < tl.k_end) vb = to_f32(b_base[static_cast<std::int64_t>(n) * p.b.ld + k]);
          sB[kx][m] = vb;
        } else {
          const int kb = k0 + idx / BN, nb = idx % BN, n = tl.n0 + nb;
          if (n < p.n && kb < tl.k_end) vb = to_f32(b_base[static_cast<std::int64_t>(kb) * p.b.ld + n]);
          sB[idx / BN][nb] = vb;
        }
      } else {
        const int kx = idx / BM, mn = idx % BM, s = k0 + kx;
        if (s < tl.k_end) {
          const int pair = p.pairs[s];
          const std::int64_t ra = p.a.gather ? pair / p.top_k : s, rb = p.b.gather ? pair / p.top_k : s;
          const float scale = p.k_scale ? p.k_scale[pair] : 1.f;
          if (tl.m0 + mn < p.m) va = to_f32(a_base[ra * p.a.ld + tl.m0 + mn]) * scale;
          if (tl.n0 + mn < p.n) vb = to_f32(b_base[rb * p.b.ld + tl.n0 + mn]);
        }
        sA[kx][mn] = va;
        sB[kx][mn] = vb;
      }
    }
    __syncthreads();
#pragma unroll
    for (int kx = 0; kx < BK; ++kx) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = sA[kx][ty * 4 + i], b[i] = sB[kx][tx * 4 + i];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = tl.m0 + ty * 4 + i;
    float dot = 0.f;
    if (row < tl.m_end) {
      if constexpr (kWgrad) {
        T* out = static_cast<T*>(p.epi.out) + tl.e * p.epi.expert_stride + static_cast<std::int64_t>(row) * p.epi.ldo;
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (tl.n0 + tx * 4 + j < p.n) out[tl.n0 + tx * 4 + j] = from_f32<T>(acc[i][j]);
      } else {
        const EpilogueRow<T> er(p, row);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int col = tl.n0 + tx * 4 + j;
          if (col >= p.n) continue;
          if (er.x) dot += acc[i][j] * to_f32(er.x[col]);
          if (er.out) er.put(col, acc[i][j]);
        }
      }
    }
    if (!kWgrad && p.epi.partial) sdot[ty * 4 + i][tx] = dot;
  }
  if (!kWgrad && p.epi.partial) {
    __syncthreads();
    const int row = tl.m0 + tid;
    if (tid < BM && row < tl.m_end) {
      float dot = 0.f;
      for (int j = 0; j < BN / 4; ++j) dot += sdot[tid][j];
      p.epi.partial[static_cast<std::int64_t>(row) * p.epi.ldp + tl.n0 / BN] = dot;
    }
  }
}

}  // namespace simt

// ---------------------------------------------------------------------------------------------------------------------
// Host side

// The tensor-core kernel loads 16-byte chunks along the inner dimension of every operand: 16-bit data, both
// weight dims (out, in) multiples of 8, every pointer 16-byte aligned.
inline bool tensor_cores_ok(DType dtype, std::int64_t out, std::int64_t in, std::initializer_list<const void*> ptrs) {
  if (dtype == DType::f32 || out % 8 != 0 || in % 8 != 0) return false;
  for (const void* p : ptrs)
    if (p && !aligned16(p)) return false;
  return true;
}

// Column slots of the row-dot partials for n output columns: enough for either kernel (a GEMM with partials always
// takes the wide tile).
inline int dot_partial_slots(std::int64_t n) {
  return static_cast<int>(ceil_div<std::int64_t>(n, tc::Wide::BN) * tc::Wide::WARPS_N);
}

// Parameters filled from the plan; tiles: E+1 ints of workspace for the fwd/dgrad tile schedule.
inline GemmParams plan_params(const Plan& plan, const TensorView& tiles) {
  GemmParams p;
  p.pairs = plan.sorted_pairs.ptr<int>();
  p.top_k = plan.top_k;
  p.offsets = plan.offsets.ptr<int>();
  p.tile_offsets = tiles.ptr<int>();
  p.experts = plan.experts;
  return p;
}

// tile_offsets[e] = sum over e' < e of ceil(count[e'] / bm).
static __global__ void expert_tile_offsets(const int* __restrict__ offsets, int experts, int bm,
                                           int* __restrict__ tiles) {
  const int total = block_exclusive_scan<1024>(
      experts, [&](int e) { return (offsets[e + 1] - offsets[e] + bm - 1) / bm; },
      [&](int e, int prefix) { tiles[e] = prefix; });
  if (threadIdx.x == 0) tiles[experts] = total;
}

// Blocks of a grid over bm x bn tiles, sized by upper bounds; fwd/dgrad also fill p.tile_offsets for this bm.
template <GemmKind KIND>
std::int64_t grid_blocks(const GemmParams& p, std::int64_t rows, int bm, int bn, cudaStream_t stream) {
  const std::int64_t n_tiles = ceil_div<std::int64_t>(p.n, bn);
  std::int64_t blocks;
  if constexpr (KIND == GemmKind::wgrad) {
    blocks = static_cast<std::int64_t>(p.experts) * ceil_div<std::int64_t>(p.m, bm) * n_tiles;
  } else {
    expert_tile_offsets<<<1, 1024, 0, stream>>>(p.offsets, p.experts, bm, const_cast<int*>(p.tile_offsets));
    MOEFUSE_CUDA_LAUNCH_CHECK();
    blocks = (ceil_div<std::int64_t>(rows, bm) + p.experts) * n_tiles;
  }
  if (blocks > 0x7fffffff) throw Error("moefuse: grouped GEMM grid too large");
  return blocks;
}

template <class T, GemmKind KIND, class C>
void launch_tc(const GemmParams& p, std::int64_t rows, cudaStream_t stream) {
  const std::int64_t blocks = grid_blocks<KIND>(p, rows, C::BM, C::BN, stream);
  if (blocks == 0) return;
  constexpr std::size_t smem = C::template smem_bytes<KIND>();
  auto kernel = tc::grouped_gemm_tc<T, KIND, C>;
  set_smem_limit(kernel, smem);
  kernel<<<static_cast<unsigned>(blocks), tc::THREADS, smem, stream>>>(p);
  MOEFUSE_CUDA_LAUNCH_CHECK();
}

// Runs one grouped GEMM. rows: the plan's M (bounds the fwd/dgrad tile count). p.tile_offsets must point at E+1
// ints of workspace (fwd/dgrad).
template <class T, GemmKind KIND>
void run_grouped_gemm(const GemmParams& p, std::int64_t rows, bool tensor_cores, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    if (tensor_cores) {
      if constexpr (KIND == GemmKind::wgrad) {
        if (p.n <= tc::NarrowWgradN::BN) return launch_tc<T, KIND, tc::NarrowWgradN>(p, rows, stream);
        if (p.m <= tc::NarrowWgradM::BM) return launch_tc<T, KIND, tc::NarrowWgradM>(p, rows, stream);
        if (p.n <= tc::NarrowWgradN64::BN) return launch_tc<T, KIND, tc::NarrowWgradN64>(p, rows, stream);
        if (p.m <= tc::NarrowWgradM64::BM) return launch_tc<T, KIND, tc::NarrowWgradM64>(p, rows, stream);
      } else if (p.n <= tc::NarrowN::BN && !p.epi.partial) {
        return launch_tc<T, KIND, tc::NarrowN>(p, rows, stream);
      }
      return launch_tc<T, KIND, tc::Wide>(p, rows, stream);
    }
  }
  const std::int64_t blocks = grid_blocks<KIND>(p, rows, simt::BM, simt::BN, stream);
  if (blocks == 0) return;
  simt::grouped_gemm_simt<T, KIND><<<static_cast<unsigned>(blocks), simt::THREADS, 0, stream>>>(p);
  MOEFUSE_CUDA_LAUNCH_CHECK();
}

}  // namespace moefuse::cuda
