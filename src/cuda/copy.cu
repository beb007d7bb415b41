// Strided copy with a cast: how adapters given in another layout or dtype reach the kernels (core/block.cpp).
// Dims that are contiguous with each other on both sides are merged first, so PEFT's lora_B [out, r*E] read as
// [E, out, r] (E fastest; the kernels read r fastest) becomes a plain transpose of [out*r, E]. A transpose moves
// 64 x 64 tiles through shared memory, reading along src's densest dim and writing along dst's: with 16-byte loads
// and stores where both densest dims have stride 1 and every size, stride and base allows them (PEFT's adapters at
// model sizes), else one element at a time with each thread's 16 loads issued before any is used (a 32 x 32 tile
// loaded in a loop took 17.6 µs per B at the 30B shape, this 13.4); a copy whose two sides are densest along the
// same dim runs one thread per element along it.
#include <algorithm>

#include "core/backend.h"
#include "cuda/common.cuh"

namespace moefuse::cuda {
namespace {

constexpr int kTile = 64, kRows = 8, kThreads = 256;  // a transpose block: 32 x kRows threads

// The copy's dims reordered: x is src's densest; transposing, y is dst's densest; z the rest.
struct Dims {
  std::int64_t n[3], src[3], dst[3];
};

template <class S, class D>
__global__ void copy_along_kernel(const S* __restrict__ src, D* __restrict__ dst, Dims g) {
  const std::int64_t total = g.n[0] * g.n[1] * g.n[2];
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t x = i % g.n[0], y = i / g.n[0] % g.n[1], z = i / g.n[0] / g.n[1];
    const float v = to_f32(src[x * g.src[0] + y * g.src[1] + z * g.src[2]]);
    dst[x * g.dst[0] + y * g.dst[1] + z * g.dst[2]] = from_f32<D>(v);
  }
}

template <class S, class D>
__global__ void transpose_kernel(const S* __restrict__ src, D* __restrict__ dst, Dims g, std::int64_t tiles_x) {
  constexpr int kPerThread = kTile / kRows * 2;  // (x, x + 32) in kTile / kRows rows
  __shared__ float tile[kTile][kTile + 1];
  const std::int64_t x0 = blockIdx.x % tiles_x * kTile, y0 = blockIdx.x / tiles_x * kTile;
  for (std::int64_t z = blockIdx.y; z < g.n[2]; z += gridDim.y) {
    // Thread (tx, ty) reads x = x0 + tx (+ 32), y = y0 + ty (+ kRows ...), and writes with x and y swapped.
    const int nx = static_cast<int>(std::min<std::int64_t>(g.n[0] - x0, kTile));
    const int ny = static_cast<int>(std::min<std::int64_t>(g.n[1] - y0, kTile));
    const S* s = src + z * g.src[2] + (x0 + threadIdx.x) * g.src[0] + (y0 + threadIdx.y) * g.src[1];
    D* d = dst + z * g.dst[2] + (x0 + threadIdx.y) * g.dst[0] + (y0 + threadIdx.x) * g.dst[1];
    float v[kPerThread];
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {  // consecutive threads read consecutive x
      const int i = threadIdx.y + k / 2 * kRows, j = threadIdx.x + k % 2 * 32;
      v[k] = j < nx && i < ny ? to_f32(s[k % 2 * 32 * g.src[0] + k / 2 * kRows * g.src[1]]) : 0.f;
    }
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) tile[threadIdx.y + k / 2 * kRows][threadIdx.x + k % 2 * 32] = v[k];
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {  // and write consecutive y
      const int i = threadIdx.y + k / 2 * kRows, j = threadIdx.x + k % 2 * 32;
      if (i < nx && j < ny) d[k / 2 * kRows * g.dst[0] + k % 2 * 32 * g.dst[1]] = from_f32<D>(tile[j][i]);
    }
    __syncthreads();
  }
}

// The same transpose in 16-byte pieces: src's rows along x (stride 1) read VX elements at a time, dst's rows along y
// (stride 1) written VY at a time. Needs n[0] % VX == n[1] % VY == 0 and 16-byte aligned rows (vector_ok).
template <class S, class D>
__global__ void transpose_vec_kernel(const S* __restrict__ src, D* __restrict__ dst, Dims g, std::int64_t tiles_x) {
  constexpr int VX = 16 / sizeof(S), VY = 16 / sizeof(D);
  __shared__ float tile[kTile][kTile + 1];  // [x][y]
  const std::int64_t x0 = blockIdx.x % tiles_x * kTile, y0 = blockIdx.x / tiles_x * kTile;
  const int nx = static_cast<int>(std::min<std::int64_t>(g.n[0] - x0, kTile));
  const int ny = static_cast<int>(std::min<std::int64_t>(g.n[1] - y0, kTile));
  for (std::int64_t z = blockIdx.y; z < g.n[2]; z += gridDim.y) {
    const S* s = src + z * g.src[2] + x0 + y0 * g.src[1];
    D* d = dst + z * g.dst[2] + x0 * g.dst[0] + y0;
#pragma unroll
    for (int i = threadIdx.x; i < kTile * kTile / VX; i += kThreads) {  // a warp reads whole rows of src
      const int y = i / (kTile / VX), x = i % (kTile / VX) * VX;
      if (x < nx && y < ny) {
        const uint4 v = *reinterpret_cast<const uint4*>(s + y * g.src[1] + x);
        const S* e = reinterpret_cast<const S*>(&v);
#pragma unroll
        for (int j = 0; j < VX; ++j) tile[x + j][y] = to_f32(e[j]);
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = threadIdx.x; i < kTile * kTile / VY; i += kThreads) {  // and writes whole rows of dst
      const int x = i / (kTile / VY), y = i % (kTile / VY) * VY;
      if (x < nx && y < ny) {
        uint4 v;
        D* e = reinterpret_cast<D*>(&v);
#pragma unroll
        for (int j = 0; j < VY; ++j) e[j] = from_f32<D>(tile[x][y + j]);
        *reinterpret_cast<uint4*>(d + x * g.dst[0] + y) = v;
      }
    }
    __syncthreads();
  }
}

template <class S, class D>
bool vector_ok(const Dims& g, const void* src, const void* dst) {
  constexpr int VX = 16 / sizeof(S), VY = 16 / sizeof(D);
  const auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  return g.src[0] == 1 && g.dst[1] == 1 && g.n[0] % VX == 0 && g.n[1] % VY == 0 && g.src[1] % VX == 0 &&
         g.src[2] % VX == 0 && g.dst[0] % VY == 0 && g.dst[2] % VY == 0 && aligned(src) && aligned(dst);
}

struct Dim {
  std::int64_t n, src, dst;
};

}  // namespace

void copy_strided(const TensorView& src, const TensorView& dst, void* stream) {
  if (src.numel() == 0) return;
  DeviceGuard guard(src.device);
  // Size-1 dims dropped, the rest outermost first in dst's order, neighbours contiguous on both sides merged.
  Dim v[3];
  int k = 0;
  for (int d = 0; d < 3; ++d)
    if (src.shape[d] != 1) v[k++] = {src.shape[d], src.stride[d], dst.stride[d]};
  std::sort(v, v + k, [](const Dim& a, const Dim& b) { return a.dst > b.dst; });
  int m = 0;
  for (int i = 0; i < k; ++i) {
    if (m > 0 && v[m - 1].src == v[i].n * v[i].src && v[m - 1].dst == v[i].n * v[i].dst)
      v[m - 1] = {v[m - 1].n * v[i].n, v[i].src, v[i].dst};
    else
      v[m++] = v[i];
  }
  for (; m < 3; ++m) v[m] = {1, 0, 0};
  const int x = static_cast<int>(std::min_element(v, v + 3, [](const Dim& a, const Dim& b) {
                                   return a.n > 1 && (b.n == 1 || a.src < b.src);
                                 }) - v);
  const int y = static_cast<int>(std::min_element(v, v + 3, [](const Dim& a, const Dim& b) {
                                   return a.n > 1 && (b.n == 1 || a.dst < b.dst);
                                 }) - v);
  const bool transpose = x != y && v[x].n > 1 && v[y].n > 1;
  const int yy = transpose ? y : (x + 1) % 3, z = 3 - x - yy;
  const int order[3] = {x, yy, z};
  Dims g;
  for (int i = 0; i < 3; ++i) g.n[i] = v[order[i]].n, g.src[i] = v[order[i]].src, g.dst[i] = v[order[i]].dst;
  dispatch_float(src.dtype, [&](auto s) {
    dispatch_float(dst.dtype, [&](auto t) {
      using S = decltype(s);
      using D = decltype(t);
      if (transpose) {
        const std::int64_t tiles_x = ceil_div<std::int64_t>(g.n[0], kTile);
        const std::int64_t tiles = tiles_x * ceil_div<std::int64_t>(g.n[1], kTile);
        if (tiles > 0x7fffffff) throw Error("moefuse: copy_strided: too many tiles for one grid");
        const dim3 grid(static_cast<unsigned>(tiles),
                        static_cast<unsigned>(std::min<std::int64_t>(g.n[2], 65535)));
        if (vector_ok<S, D>(g, src.data, dst.data))
          transpose_vec_kernel<S, D><<<grid, kThreads, 0, as_stream(stream)>>>(src.ptr<S>(), dst.ptr<D>(), g, tiles_x);
        else
          transpose_kernel<S, D><<<grid, dim3(32, kRows), 0, as_stream(stream)>>>(src.ptr<S>(), dst.ptr<D>(), g,
                                                                                    tiles_x);
      } else {
        const std::int64_t blocks = std::min<std::int64_t>(ceil_div<std::int64_t>(src.numel(), kThreads), 1 << 16);
        copy_along_kernel<S, D><<<static_cast<unsigned>(blocks), kThreads, 0, as_stream(stream)>>>(src.ptr<S>(),
                                                                                                  dst.ptr<D>(), g);
      }
    });
  });
  MOEFUSE_CUDA_LAUNCH_CHECK();
}

}  // namespace moefuse::cuda
