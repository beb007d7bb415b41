// One-block exclusive prefix sum over n ints (n may exceed the block: it walks in block-sized steps with a carry).
#pragma once

#include "cuda/common.cuh"

namespace moefuse::cuda {

// in(i) gives element i; out(i, prefix) receives the exclusive prefix. Every thread of the block must call it;
// all get the total back.
template <int THREADS, class In, class Out>
__device__ int block_exclusive_scan(int n, In in, Out out) {
  static_assert(THREADS % 32 == 0 && THREADS <= 1024, "block of whole warps");
  constexpr int kWarps = THREADS / 32;
  __shared__ int warp_sums[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int carry = 0;
  for (int base = 0; base < n; base += THREADS) {
    const int i = base + threadIdx.x;
    const int v = i < n ? in(i) : 0;
    int x = v;  // inclusive scan within the warp
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, x, off);
      if (lane >= off) x += y;
    }
    if (lane == 31) warp_sums[warp] = x;
    __syncthreads();
    if (warp == 0) {
      int w = lane < kWarps ? warp_sums[lane] : 0;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, w, off);
        if (lane >= off) w += y;
      }
      if (lane < kWarps) warp_sums[lane] = w;
    }
    __syncthreads();
    if (i < n) out(i, carry + x - v + (warp > 0 ? warp_sums[warp - 1] : 0));
    carry += warp_sums[kWarps - 1];
    __syncthreads();  // warp_sums is rewritten by the next step
  }
  return carry;
}

}  // namespace moefuse::cuda
