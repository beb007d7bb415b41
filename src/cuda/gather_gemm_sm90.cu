// Hopper forward grouped GEMM with the token gather in its loads (or rows already sorted) and, optionally, SwiGLU in
// its epilogue (grouped_gemm_sm90.h: run_gather_gemm_sm90). Compiled for sm_90a only.
//
// One 128x256 output tile per block, three warpgroups:
//   - warpgroup 0 loads: every thread cp.asyncs 8 of the tile's gathered x rows (16 bytes each) into 128-byte
//     swizzled shared memory, and thread 0 brings the weight tile (and a LoRA factor's) with TMA loads;
//   - warpgroups 1 and 2 run wgmma 64x256x16 on rows [0, 64) and [64, 128) of the tile, fp32 accumulators in registers.
// A 4-stage ring of full/empty mbarriers connects them; consumers keep one k-block of wgmma in flight. cp.async writes
// go through the generic proxy and wgmma reads through the async one, so the loader waits for its copies one stage
// late, fences, then arrives on the full barrier.
// DGRAD reads the weight as [k, n] (the backward's grad_in = grad_out . W[e]): its tile is n-major in shared memory,
// 64-column chunks of 64 k-rows each, one TMA load per chunk, and wgmma takes it MN-major.
// With SwiGLU the weight is [gate; up] (2n rows) and a tile's 256 columns are gate columns [j, j+128) followed by the
// same up columns: every thread holds each gate value and its up partner, so h and a = silu(gate) * up are written
// from registers.
// A LoRA adapter of rank up to RN is two more products. Its rank-side one, low = s . x . P[e] (P = A[e]^T, DGRAD B[e]),
// runs beside W's in every k-block into a second, RN-column accumulator, P's tile coming by TMA with W's; so x is
// read once for both. Then low, rounded, becomes the A operand of one more k-block [low | F[e]] (F = B[e],
// DGRAD A[e]), whose product reaches the epilogue (the activation, or the plain rows) without a pass over the output.
// Every n-tile block of an m-tile would form the same low, so with more than one n-tile the GEMM runs as two
// launches: the first n-tile's blocks form low and store it, then the other blocks load it (block_tile). Forming it
// in every block cost the LoRA forms 6-9 % of their time; the two launches save 4 % (bench/RESULTS.md, 2026-11-29
// second), the rest going to the second launch's start and tail and to A rows no longer shared by all n-tiles. The
// second launch is the first's programmatic dependent, so its blocks fill the first's tail (about 1 % of the LoRA
// step, RESULTS 2026-11-29 third). Measured slower (RESULTS 2026-11-29 seventh): one launch, the first n-tile's block
// flagging low for the m-tile's others, however its blocks were ordered; and the two launches with the second
// waiting for its own m-tile's flag instead of for the whole first launch.
#include <cudaTypedefs.h>

#include <array>

#include <cute/arch/mma_sm90_gmma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "cuda/async_copy.cuh"
#include "cuda/common.cuh"
#include "cuda/grouped_gemm_sm90.h"

namespace moefuse::cuda {
namespace {

using namespace cute;

constexpr int BM = 128, BN = 256, BK = 64, STAGES = 4;
constexpr int kThreads = 384;
constexpr int kConsumerWarps = 8;

template <class T, GMMA::Major MAJOR_B>
struct Gmma;
template <GMMA::Major MAJOR_B>
struct Gmma<__nv_bfloat16, MAJOR_B> {
  using Element = cutlass::bfloat16_t;
  using Op = SM90_64x256x16_F32BF16BF16_SS<GMMA::Major::K, MAJOR_B>;
};
template <GMMA::Major MAJOR_B>
struct Gmma<__half, MAJOR_B> {
  using Element = cutlass::half_t;
  using Op = SM90_64x256x16_F32F16F16_SS<GMMA::Major::K, MAJOR_B>;
};

template <class T, bool DGRAD, int RN>
struct Tiles {
  static constexpr GMMA::Major kMajorB = DGRAD ? GMMA::Major::MN : GMMA::Major::K;
  using E = typename Gmma<T, kMajorB>::Element;
  // Rows of 64 k-elements, 8-row atoms of 1024 bytes: the layout TMA's SWIZZLE_128B writes and swz<64> computes.
  using LayoutA = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, Shape<Int<BM>, Int<BK>, Int<STAGES>>{}));
  // DGRAD: rows of 64 n-elements, the 64 k-rows of a 64-column chunk contiguous (8 KB), chunks after one another.
  using LayoutB = std::conditional_t<
      DGRAD,
      decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<E>{}, Shape<Int<BN>, Int<BK>, Int<STAGES>>{},
                             Step<_2, _1, _3>{})),
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, Shape<Int<BN>, Int<BK>, Int<STAGES>>{}))>;
  using Mma = decltype(make_tiled_mma(typename Gmma<T, kMajorB>::Op{}, Layout<Shape<_2, _1, _1>>{}));
  // LoRA's rank-side factor P, a tile of kRn columns by BK as one TMA box writes it: A[e] [rank, k] as rows of 64 k
  // (K-major, 128-byte swizzle like the A tile); DGRAD B[e] [k, rank] as k-rows of kRn elements (MN-major, the
  // swizzle as wide as a row).
  static constexpr int kRn = RN > 0 ? RN : 16;
  using AtomF = std::conditional_t<
      !DGRAD, GMMA::Layout_K_SW128_Atom<E>,
      std::conditional_t<kRn == 16, GMMA::Layout_MN_SW32_Atom<E>,
                         std::conditional_t<kRn == 32, GMMA::Layout_MN_SW64_Atom<E>, GMMA::Layout_MN_SW128_Atom<E>>>>;
  using LayoutF = decltype(tile_to_shape(AtomF{}, Shape<Int<kRn>, Int<BK>, Int<STAGES>>{}));
  using MmaF = decltype(make_tiled_mma(
      GMMA::ss_op_selector<E, E, float, Shape<_64, Int<kRn>, _16>, GMMA::Major::K, kMajorB>(),
      Layout<Shape<_2, _1, _1>>{}));
};
constexpr int kChunkN = 64;  // DGRAD: columns of one TMA box / one 8 KB chunk of the B tile

template <class T, int RN>
struct alignas(1024) Smem {
  T a[STAGES][BM * BK];
  T b[STAGES][BN * BK];
  T f[STAGES][(RN > 0 ? RN : 8) * BK];  // LoRA: P's tile
  std::uint64_t full[STAGES], empty[STAGES];
  int tokens[BM];  // the tile's source rows of x; -1 past the expert's rows
};
template <int RN>
constexpr std::size_t kSmemBytes = sizeof(Smem<__nv_bfloat16, RN>) + 1024;  // + alignment slack

struct Args {
  const void* x;
  void* out;  // plain: [M, n]; SwiGLU: h [M, 2n]
  void* act;  // SwiGLU: a [M, n]
  const int* pairs;  // null: x is in sorted order
  const int* offsets;
  const int* tile_offsets;
  int top_k, experts, n, k;
  const void* lora_p;  // LoRA: A [E, rank, k]; DGRAD: B [E, k, rank]. Null without an adapter
  const void* lora_f;  // LoRA: B [E, rows of W, rank]; DGRAD: A [E, rank, n]
  void* lora_low;      // LoRA: where low's rows [M, rank] are kept, or null
  int rank;
  float lora_scale;
  int phase;  // block_tile
};

// The block's (m-tile, n-tile). Phase 0: every tile, n fastest (so that blocks running together share A rows).
// Phase 1: the first n-tile of every m-tile; phase 2: the others, n fastest, after phase 1 stored low.
__device__ __forceinline__ void block_tile(int phase, int n_tiles, int& mt, int& nt) {
  const int b = blockIdx.x, others = n_tiles - 1;
  mt = phase == 0 ? b / n_tiles : phase == 1 ? b : b / others;
  nt = phase == 0 ? b % n_tiles : phase == 1 ? 0 : 1 + b % others;
}

__device__ __forceinline__ void tma_load_4d(const CUtensorMap* map, std::uint64_t* bar, void* dst, int c0, int c1,
                                            int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];\n" ::"r"(smem_addr(dst)),
      "l"(map), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

using Barrier = cutlass::arch::ClusterBarrier;
using TxBarrier = cutlass::arch::ClusterTransactionBarrier;

// The B operand of the LoRA k-block, by the 128 loader threads: the tile's rows of F = B[e] (gate rows then up rows
// with SwiGLU), each row's first RN k-elements, zero past rank; DGRAD: F = A[e]'s rank rows [e][q][col0, col0 + BN)
// in the n-major chunks, zero rows from rank to RN. (Its A operand, low, the consumers write.)
template <class T, bool SWIGLU, bool DGRAD, int RN>
__device__ __forceinline__ void load_lora_block(const Args& p, T* sb, int e, int nt, int t) {
  constexpr int kHalfRows = SWIGLU ? BN / 2 : BN;
  const int col0 = nt * kHalfRows;
  const T* f = static_cast<const T*>(p.lora_f) + static_cast<std::int64_t>(e) * (SWIGLU ? 2 : 1) * p.n * p.rank;
  if constexpr (DGRAD) {
    constexpr int kPieces = BN / 8;  // 16-byte pieces of one factor row in the tile
#pragma unroll 1
    for (int i = t; i < RN * kPieces; i += 128) {
      const int q = i / kPieces, piece = i % kPieces, j = col0 + piece * 8;
      const bool ok = q < p.rank && j < p.n;
      cp_async16(sb + piece / 8 * (kChunkN * BK) + swz<BK>(q, piece % 8),
                 ok ? f + static_cast<std::int64_t>(q) * p.n + j : f, ok);
    }
  } else {
#pragma unroll 1
    for (int i = t; i < BN * (RN / 8); i += 128) {
      const int r = i / (RN / 8), c = i % (RN / 8), j = col0 + r % kHalfRows;  // smem row r: half r / kHalfRows
      const bool ok = c * 8 < p.rank && j < p.n;
      const std::int64_t wrow = (r / kHalfRows) * static_cast<std::int64_t>(p.n) + j;
      cp_async16(sb + swz<BK>(r, c), ok ? f + wrow * p.rank + c * 8 : f, ok);
    }
  }
}

template <class T, bool SWIGLU, int RN, bool DGRAD>
__global__ void __launch_bounds__(kThreads, 1) gather_gemm(const __grid_constant__ CUtensorMap wmap,
                                                            const __grid_constant__ CUtensorMap fmap, const Args p) {
  static_assert(!(SWIGLU && DGRAD));
  constexpr bool LORA = RN > 0;
  constexpr int kTileN = SWIGLU ? BN / 2 : BN;  // output columns per tile
  // Phase 2 is launched as phase 1's programmatic dependent (launch): its blocks may start once every phase 1 block
  // runs, taking the SMs that phase 1's tail frees, and wait for phase 1 (griddepcontrol.wait) only at their last
  // k-block, before they read low. Every phase 2 block with rows waits, so phase 2 ends after phase 1 whenever phase 1
  // has rows to write, and the kernels after it see both.
  if (p.phase == 1) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  int mt, nt;
  block_tile(p.phase, (p.n + kTileN - 1) / kTileN, mt, nt);
  if (mt >= p.tile_offsets[p.experts]) return;
  const bool form_low = LORA && p.phase != 2;  // else low comes from p.lora_low
  const int e = expert_of_tile(p.tile_offsets, p.experts, mt);
  const int m0 = p.offsets[e] + (mt - p.tile_offsets[e]) * BM, m_end = p.offsets[e + 1];

  extern __shared__ unsigned char raw[];
  auto& sm = *reinterpret_cast<Smem<T, RN>*>((reinterpret_cast<std::uintptr_t>(raw) + 1023) & ~std::uintptr_t{1023});
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      reinterpret_cast<TxBarrier&>(sm.full[s]).init(BM + 1);  // the loaders' arrivals + the TMA transaction
      reinterpret_cast<Barrier&>(sm.empty[s]).init(kConsumerWarps);
    }
    cutlass::arch::fence_barrier_init();
  }
  if (threadIdx.x < BM) {
    const int s = m0 + threadIdx.x;
    sm.tokens[threadIdx.x] = s >= m_end ? -1 : p.pairs ? p.pairs[s] / p.top_k : s;
  }
  __syncthreads();

  // With a LoRA adapter one more k-block follows W's: [low | F[e]], so the low-rank product lands in the same
  // accumulators.
  const int w_blocks = (p.k + BK - 1) / BK, k_blocks = w_blocks + LORA;
  if (threadIdx.x < 128) {
    cutlass::arch::warpgroup_reg_dealloc<40>();
    const int t = threadIdx.x, chunk = t % 8;
    const T* x = static_cast<const T*>(p.x);
    int tok[BM / 16];
#pragma unroll
    for (int i = 0; i < BM / 16; ++i) tok[i] = sm.tokens[t / 8 + 16 * i];
    // Stage kb's copies are issued, then kb - 1's awaited: its full barrier gets the loaders' arrivals one stage late.
    const auto issued = [&](int kb) {
      cp_async_commit();
      if (kb > 0) {
        cp_async_wait<1>();
        cutlass::arch::fence_view_async_shared();
        reinterpret_cast<Barrier&>(sm.full[(kb - 1) % STAGES]).arrive();
      }
    };
    for (int kb = 0; kb < w_blocks; ++kb) {
      const int s = kb % STAGES;
      reinterpret_cast<Barrier&>(sm.empty[s]).wait(((kb / STAGES) & 1) ^ 1);
      if (t == 0) {
        reinterpret_cast<TxBarrier&>(sm.full[s]).arrive_and_expect_tx((BN + (form_low ? RN : 0)) * BK * sizeof(T));
        if (form_low) tma_load_4d(&fmap, &sm.full[s], sm.f[s], DGRAD ? 0 : kb * BK, DGRAD ? kb * BK : 0, 0, e);
        if constexpr (DGRAD) {
#pragma unroll
          for (int c = 0; c < BN / kChunkN; ++c)
            tma_load_4d(&wmap, &sm.full[s], sm.b[s] + c * kChunkN * BK, nt * BN + c * kChunkN, kb * BK, 0, e);
        } else {
          tma_load_4d(&wmap, &sm.full[s], sm.b[s], kb * BK, nt * kTileN, 0, e);
        }
      }
      const int col = kb * BK + chunk * 8;
#pragma unroll
      for (int i = 0; i < BM / 16; ++i) {
        const bool ok = tok[i] >= 0 && col < p.k;
        cp_async16(sm.a[s] + swz<BK>(t / 8 + 16 * i, chunk), ok ? x + static_cast<std::int64_t>(tok[i]) * p.k + col : x,
                   ok);
      }
      issued(kb);
    }
    if constexpr (LORA) {
      const int s = w_blocks % STAGES;
      reinterpret_cast<Barrier&>(sm.empty[s]).wait(((w_blocks / STAGES) & 1) ^ 1);
      if (t == 0) reinterpret_cast<Barrier&>(sm.full[s]).arrive();  // no TMA in this stage
      load_lora_block<T, SWIGLU, DGRAD, RN>(p, sm.b[s], e, nt, t);
      issued(w_blocks);
    }
    cp_async_wait<0>();
    cutlass::arch::fence_view_async_shared();
    reinterpret_cast<Barrier&>(sm.full[(k_blocks - 1) % STAGES]).arrive();
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<232>();
  using TL = Tiles<T, DGRAD, RN>;
  using E = typename TL::E;
  typename TL::Mma mma;
  const int ct = threadIdx.x - 128;
  auto thr = mma.get_thread_slice(ct);
  Tensor sA = make_tensor(make_smem_ptr(reinterpret_cast<E*>(&sm.a[0][0])), typename TL::LayoutA{});
  Tensor sB = make_tensor(make_smem_ptr(reinterpret_cast<E*>(&sm.b[0][0])), typename TL::LayoutB{});
  Tensor tCrA = thr.make_fragment_A(thr.partition_A(sA));  // wgmma descriptors (MMA, MMA_M, MMA_K, STAGES)
  Tensor tCrB = thr.make_fragment_B(thr.partition_B(sB));
  Tensor acc = partition_fragment_C(mma, Shape<Int<BM>, Int<BN>>{});
  static_assert(decltype(size(acc))::value == 128);
  // LoRA's rank side: low = x . P[e] over the same A tiles (unused without an adapter).
  typename TL::MmaF mma_f;
  auto thr_f = mma_f.get_thread_slice(ct);
  Tensor sF = make_tensor(make_smem_ptr(reinterpret_cast<E*>(&sm.f[0][0])), typename TL::LayoutF{});
  Tensor tFrA = thr_f.make_fragment_A(thr_f.partition_A(sA));
  Tensor tFrF = thr_f.make_fragment_B(thr_f.partition_B(sF));
  Tensor acc_f = partition_fragment_C(mma_f, Shape<Int<BM>, Int<TL::kRn>>{});
  // Phase 2: this thread's 16-byte pieces of low (its warpgroup's 64 rows, RN columns, zero past m_end and the rank),
  // loaded in the last k-block (load_low) and written into the LoRA stage after the k-loop.
  constexpr int kLowPieces = LORA ? RN / 16 : 1;
  uint4 low_in[kLowPieces] = {};
  const auto low_piece = [&](int i, int& r, int& piece) {
    const int q = ct % 128 + 128 * i;
    r = ct / 128 * 64 + q / (TL::kRn / 8);
    piece = q % (TL::kRn / 8);
  };
  const auto load_low = [&] {
    asm volatile("griddepcontrol.wait;" ::: "memory");
#pragma unroll
    for (int i = 0; i < kLowPieces; ++i) {
      int r, piece;
      low_piece(i, r, piece);
      if (m0 + r < m_end && piece * 8 < p.rank)
        low_in[i] = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.lora_low) +
                                                    static_cast<std::int64_t>(m0 + r) * p.rank + piece * 8);
    }
  };

  mma.accumulate_ = GMMA::ScaleOut::Zero;
  mma_f.accumulate_ = GMMA::ScaleOut::Zero;
  for (int kb = 0; kb < w_blocks; ++kb) {
    const int s = kb % STAGES;
    reinterpret_cast<TxBarrier&>(sm.full[s]).wait((kb / STAGES) & 1);
    warpgroup_fence_operand(acc);
    if (form_low) warpgroup_fence_operand(acc_f);
    warpgroup_arrive();
    if (form_low) {
#pragma unroll
      for (int kk = 0; kk < size<2>(tFrA); ++kk) {
        cute::gemm(mma_f, tFrA(_, _, kk, s), tFrF(_, _, kk, s), acc_f);
        mma_f.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();  // its own batch, so that low is complete while W's last k-block still runs
    }
#pragma unroll
    for (int kk = 0; kk < size<2>(tCrA); ++kk) {
      cute::gemm(mma, tCrA(_, _, kk, s), tCrB(_, _, kk, s), acc);
      mma.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
    if (LORA && !form_low && kb == w_blocks - 1) load_low();  // its latency hidden by this k-block's wgmma
    // One k-block of wgmma stays in flight: the previous one is done, so its stage goes back to the loader.
    warpgroup_wait<1>();
    warpgroup_fence_operand(acc);
    if (kb > 0 && threadIdx.x % 32 == 0) reinterpret_cast<Barrier&>(sm.empty[(kb - 1) % STAGES]).arrive();
  }
  if constexpr (LORA) {
    // low = s . acc_f, rounded, into the A tile of the LoRA stage: each warpgroup writes the 64 rows its own wgmma
    // reads (that stage's last A tile is long consumed, and the loaders leave this one alone). The first n-tile's
    // blocks keep low's rows for the backward.
    const int s = w_blocks % STAGES;
    if (form_low) {
      warpgroup_fence_operand(acc_f);
      Tensor cf = thr_f.partition_C(make_identity_tensor(Shape<Int<BM>, Int<TL::kRn>>{}));
      T* low = nt == 0 ? static_cast<T*>(p.lora_low) : nullptr;
#pragma unroll
      for (int i = 0; i < size(acc_f); i += 2) {
        const int r = get<0>(cf(i)), c = get<1>(cf(i));
        const std::uint32_t v = pack2<T>(p.lora_scale * acc_f(i), p.lora_scale * acc_f(i + 1));
        *reinterpret_cast<std::uint32_t*>(sm.a[s] + swz<BK>(r, c / 8) + c % 8) = v;
        if (low && m0 + r < m_end && c < p.rank)
          *reinterpret_cast<std::uint32_t*>(low + static_cast<std::int64_t>(m0 + r) * p.rank + c) = v;
      }
    } else {
#pragma unroll
      for (int i = 0; i < kLowPieces; ++i) {
        int r, piece;
        low_piece(i, r, piece);
        *reinterpret_cast<uint4*>(sm.a[s] + swz<BK>(r, piece)) = low_in[i];
      }
    }
    cutlass::arch::fence_view_async_shared();  // generic-proxy writes, read by wgmma through the async proxy
    cutlass::arch::NamedBarrier::arrive_and_wait(128, ct / 128);
    reinterpret_cast<TxBarrier&>(sm.full[s]).wait((w_blocks / STAGES) & 1);
    warpgroup_arrive();
#pragma unroll
    for (int kk = 0; kk < TL::kRn / 16; ++kk) cute::gemm(mma, tCrA(_, _, kk, s), tCrB(_, _, kk, s), acc);
    warpgroup_commit_batch();
  }
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc);

  // Epilogue. Accumulator i holds (row, col) = coords(i); i and i + 1 are adjacent columns of one row, and with
  // SwiGLU i + 64 is column col + 128 (wgmma's accumulator layout: 8-column groups are the slowest index).
  // The tile goes through shared memory (the drained stages) so that the global stores are whole 16-byte chunks, a
  // warp's 512 contiguous bytes of a row (measured: the down forward with LoRA 18 % faster than 4-byte stores
  // straight from the accumulators). A staged row is [out's 256 columns | SwiGLU: a's 128], padded by 16 bytes so
  // that a warp's 4-byte writes (8 rows, 4 column pairs) fall in distinct banks.
  Tensor coords = thr.partition_C(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));
  constexpr int kPairs = SWIGLU ? 32 : 64;
  constexpr int kCols = BN + (SWIGLU ? BN / 2 : 0), kStride = kCols + 8, kChunks = kCols / 8;
  static_assert(BM * kStride * sizeof(T) <= sizeof(sm.a) + sizeof(sm.b));
  T* stage = reinterpret_cast<T*>(&sm.a[0][0]);
  using Epi = cutlass::arch::NamedBarrier;
  constexpr auto kEpi = cutlass::arch::ReservedNamedBarriers::EpilogueBarrier;
  Epi::arrive_and_wait(256, kEpi);  // the other warpgroup's last wgmma may still read the stages
#pragma unroll
  for (int i2 = 0; i2 < kPairs; ++i2) {
    const int i = 2 * i2;
    T* dst = stage + get<0>(coords(i)) * kStride + get<1>(coords(i));
    if constexpr (SWIGLU) {
      // a from the rounded h, as a recomputation from the saved h gives.
      const std::uint32_t g2 = pack2<T>(acc(i), acc(i + 1)), u2 = pack2<T>(acc(i + 64), acc(i + 65));
      const T* g = reinterpret_cast<const T*>(&g2);
      const T* u = reinterpret_cast<const T*>(&u2);
      float a[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) a[j] = to_f32(g[j]) * sigmoid(to_f32(g[j])) * to_f32(u[j]);
      *reinterpret_cast<std::uint32_t*>(dst) = g2;
      *reinterpret_cast<std::uint32_t*>(dst + BN / 2) = u2;
      *reinterpret_cast<std::uint32_t*>(dst + BN) = pack2<T>(a[0], a[1]);
    } else {
      *reinterpret_cast<std::uint32_t*>(dst) = pack2<T>(acc(i), acc(i + 1));
    }
  }
  Epi::arrive_and_wait(256, kEpi);
  T* out = static_cast<T*>(p.out);
#pragma unroll 4
  for (int f = ct; f < BM * kChunks; f += 256) {
    const int r = f / kChunks, q = f % kChunks;
    const std::int64_t row = m0 + r;
    // SwiGLU chunks: gate columns, up columns (h), then a; each part kTileN wide.
    const int part = SWIGLU ? q / (kTileN / 8) : 0, col = nt * kTileN + (q % (kTileN / 8)) * 8;
    if (row >= m_end || col >= p.n) continue;
    T* dst = !SWIGLU    ? out + row * p.n + col
             : part == 2 ? static_cast<T*>(p.act) + row * p.n + col
                         : out + row * 2 * p.n + part * p.n + col;
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(stage + r * kStride + q * 8);
  }
}

PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static const auto fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    MOEFUSE_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q));
    if (q != cudaDriverEntryPointSuccess || !f) throw Error("moefuse: the CUDA driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A 4-d tensor map of 16-bit elements over `base` (dims innermost first, byte strides of dims 1-3).
CUtensorMap tensor_map(const void* base, DType dtype, const std::array<cuuint64_t, 4>& dims,
                       const std::array<cuuint64_t, 3>& strides, const std::array<cuuint32_t, 4>& box, int swizzle,
                       const char* what) {
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUtensorMapSwizzle sw = swizzle == 128  ? CU_TENSOR_MAP_SWIZZLE_128B
                                : swizzle == 64 ? CU_TENSOR_MAP_SWIZZLE_64B
                                                : CU_TENSOR_MAP_SWIZZLE_32B;
  CUtensorMap map;
  const CUresult r = encode_tiled()(
      &map, dtype == DType::bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
      const_cast<void*>(base), dims.data(), strides.data(), box.data(), elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      sw, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw Error(std::string("moefuse: cuTensorMapEncodeTiled failed for ") + what + " (" +
                std::to_string(static_cast<int>(r)) + ")");
  return map;
}

// The weight [E, halves * rows, k] as (k, rows, halves, E), read in boxes of (BK, BN / halves, halves, 1): one box is
// a tile's 256 weight rows, plain or gate-then-up. DGRAD: the weight [E, k, n] as (n, k, 1, E) in boxes of
// (64, BK, 1, 1), one 64-column chunk of the tile.
CUtensorMap weight_map(const Sm90GatherGemm& g, DType dtype) {
  const cuuint32_t halves = g.act ? 2 : 1;
  const cuuint64_t es = 2, k = static_cast<cuuint64_t>(g.k), n = static_cast<cuuint64_t>(g.n);
  const cuuint64_t inner = g.dgrad ? n : k;
  return tensor_map(g.w, dtype, {inner, g.dgrad ? k : n, halves, static_cast<cuuint64_t>(g.experts)},
                    {inner * es, n * k * es, halves * n * k * es},
                    {static_cast<cuuint32_t>(g.dgrad ? kChunkN : BK),
                     static_cast<cuuint32_t>(g.dgrad ? BK : BN / halves), halves, 1},
                    128, "the expert weight");
}

// LoRA's P (see Tiles::LayoutF), zero-filled past rank and k: A [E, rank, k] as (k, rank, 1, E) in boxes of (BK, RN);
// DGRAD B [E, k, rank] as (rank, k, 1, E) in boxes of (RN, BK). Without an adapter, the weight's map stands in.
template <int RN>
CUtensorMap factor_map(const Sm90GatherGemm& g, DType dtype, const CUtensorMap& wmap) {
  if constexpr (RN == 0) {
    return wmap;
  } else {
    const cuuint64_t es = 2, k = static_cast<cuuint64_t>(g.k), r = static_cast<cuuint64_t>(g.rank);
    const cuuint64_t inner = g.dgrad ? r : k;
    return tensor_map(g.lora_p, dtype, {inner, g.dgrad ? k : r, 1, static_cast<cuuint64_t>(g.experts)},
                      {inner * es, r * k * es, r * k * es},
                      {static_cast<cuuint32_t>(g.dgrad ? RN : BK), static_cast<cuuint32_t>(g.dgrad ? BK : RN), 1, 1},
                      g.dgrad ? RN * 2 : 128, "a LoRA factor");
  }
}

template <class T, bool SWIGLU, int RN, bool DGRAD>
void launch(const Sm90GatherGemm& g, DType dtype, cudaStream_t stream) {
  const std::int64_t n_tiles = ceil_div<std::int64_t>(g.n, SWIGLU ? BN / 2 : BN);
  const std::int64_t m_tiles = ceil_div<std::int64_t>(g.rows, BM) + g.experts;  // a bound: tile_offsets has the count
  if (m_tiles * n_tiles > 0x7fffffff) throw Error("moefuse: grouped GEMM grid too large");
  const bool split = RN > 0 && n_tiles > 1;  // block_tile's phases 1 and 2
  if (split && !g.lora_low) throw Error("moefuse: the gather GEMM needs lora_low for an adapter over several n-tiles");
  const CUtensorMap wmap = weight_map(g, dtype), fmap = factor_map<RN>(g, dtype, wmap);
  auto kernel = gather_gemm<T, SWIGLU, RN, DGRAD>;
  set_smem_limit(kernel, kSmemBytes<RN>);
  const int phases[2] = {split ? 1 : 0, 2};
  for (int i = 0; i < (split ? 2 : 1); ++i) {
    const Args args{g.x, g.out, g.act, g.pairs, g.offsets, g.tile_offsets, g.top_k, g.experts, g.n, g.k,
                    g.lora_p, g.lora_f, g.lora_low, g.rank, g.lora_scale, phases[i]};
    const std::int64_t blocks = m_tiles * (phases[i] == 0 ? n_tiles : phases[i] == 1 ? 1 : n_tiles - 1);
    cudaLaunchAttribute after_phase_1{};
    after_phase_1.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    after_phase_1.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(static_cast<unsigned>(blocks));
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = kSmemBytes<RN>;
    cfg.stream = stream;
    cfg.attrs = &after_phase_1;
    cfg.numAttrs = phases[i] == 2 ? 1 : 0;
    MOEFUSE_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, wmap, fmap, args));
  }
}

// The form, then the adapter's rank rounded up to the rank-side accumulator's width (0: no adapter).
template <class T, int RN>
void launch_form(const Sm90GatherGemm& g, DType dtype, cudaStream_t stream) {
  if (g.dgrad)
    launch<T, false, RN, true>(g, dtype, stream);
  else if (g.act)
    launch<T, true, RN, false>(g, dtype, stream);
  else
    launch<T, false, RN, false>(g, dtype, stream);
}

}  // namespace

void run_gather_gemm_sm90(const Sm90GatherGemm& g, DType dtype, cudaStream_t stream) {
  if (g.dgrad && g.act) throw Error("moefuse: the gather GEMM's dgrad form runs only plain");
  if (g.lora_p && (g.rank <= 0 || g.rank > 64 || g.rank % 8))
    throw Error("moefuse: the gather GEMM takes LoRA ranks that are multiples of 8 up to 64");
  if (g.rows == 0 || g.experts == 0) return;
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>)
      with_rank(g.lora_p ? g.rank : 0, [&](auto rn) { launch_form<T, decltype(rn)::value>(g, dtype, stream); });
  });
}

}  // namespace moefuse::cuda
