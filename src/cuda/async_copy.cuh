// Pieces shared by the tile loaders of the portable and Hopper grouped GEMMs: cp.async, the XOR swizzle of
// shared-memory tiles, and the expert that owns an M-tile of the fwd/dgrad schedule.
#pragma once

#include <cstdint>

namespace moefuse::cuda {

__device__ __forceinline__ std::uint32_t smem_addr(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; zero-fills when !pred (src must still be a valid address).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(pred ? 16 : 0));
}
// 4-byte async copy (through L1), zero-filling when !pred.
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool pred) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(pred ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Shared-memory tiles hold rows of 64 (k inner) or 128 (m/n inner) elements in 16-byte chunks; chunk c of row r
// sits at chunk c ^ (r & 7), so the 8 rows an ldmatrix reads (and the rows cp.async writes) hit distinct banks.
// For 16-bit rows of 64 this is Hopper's 128-byte swizzle (TMA SWIZZLE_128B, wgmma) on a 1024-byte aligned tile.
template <int ROW>
__device__ __forceinline__ int swz(int r, int chunk) {
  return r * ROW + ((chunk ^ (r & 7)) << 3);
}

// The expert owning M-tile mt, given tile_offsets[e] = M-tiles before expert e (mt < tile_offsets[experts]): the last
// expert whose first tile is <= mt, which has rows since the next one starts later.
__device__ __forceinline__ int expert_of_tile(const int* __restrict__ tile_offsets, int experts, int mt) {
  int lo = 0, hi = experts;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (tile_offsets[mid] <= mt) lo = mid; else hi = mid - 1;
  }
  return lo;
}

}  // namespace moefuse::cuda
