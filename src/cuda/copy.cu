// Strided copy with a cast: how adapters given in another layout or dtype reach the kernels (core/block.cpp).
// A block moves a 32 x 32 tile through shared memory; the tile spans the dim along which src is densest and the one
// along which dst is, so both sides move in runs even when the copy transposes (PEFT's lora_B [out, r*E] read as
// [E, out, r] has E fastest; the kernels read it with r fastest).
#include <algorithm>

#include "core/backend.h"
#include "cuda/common.cuh"

namespace moefuse::cuda {
namespace {

constexpr int kTile = 32, kRows = 8;

// The copy's dims reordered: x is src's densest, y dst's densest (another dim when that is x too), z the third.
struct Dims {
  std::int64_t n[3], src[3], dst[3];
};

template <class S, class D, bool TRANSPOSE>
__global__ void copy_strided_kernel(const S* __restrict__ src, D* __restrict__ dst, Dims g, std::int64_t tiles_x) {
  __shared__ float tile[kTile][kTile + 1];
  const std::int64_t x0 = blockIdx.x % tiles_x * kTile, y0 = blockIdx.x / tiles_x * kTile;
  for (std::int64_t z = blockIdx.y; z < g.n[2]; z += gridDim.y) {
    const S* s = src + z * g.src[2];
    D* d = dst + z * g.dst[2];
    for (int i = threadIdx.y; i < kTile; i += kRows) {
      const std::int64_t x = x0 + threadIdx.x, y = y0 + i;
      if (x < g.n[0] && y < g.n[1]) tile[i][threadIdx.x] = to_f32(s[x * g.src[0] + y * g.src[1]]);
    }
    __syncthreads();
    for (int i = threadIdx.y; i < kTile; i += kRows) {
      // Transposing, consecutive threads write consecutive y (dst's densest dim); otherwise consecutive x.
      const std::int64_t x = x0 + (TRANSPOSE ? i : threadIdx.x), y = y0 + (TRANSPOSE ? threadIdx.x : i);
      if (x < g.n[0] && y < g.n[1])
        d[x * g.dst[0] + y * g.dst[1]] = from_f32<D>(TRANSPOSE ? tile[threadIdx.x][i] : tile[i][threadIdx.x]);
    }
    __syncthreads();
  }
}

// The dim of smallest stride among those of size > 1, skipping `not_this`.
int densest(const TensorView& t, int not_this = -1) {
  int best = -1;
  for (int d = 0; d < 3; ++d)
    if (d != not_this && t.shape[d] > 1 && (best < 0 || t.stride[d] < t.stride[best])) best = d;
  return best >= 0 ? best : (not_this == 0 ? 1 : 0);
}

}  // namespace

void copy_strided(const TensorView& src, const TensorView& dst, void* stream) {
  if (src.numel() == 0) return;
  DeviceGuard guard(src.device);
  const int x = densest(src), d = densest(dst), y = d != x ? d : densest(dst, x), z = 3 - x - y;
  const int order[3] = {x, y, z};
  Dims g;
  for (int i = 0; i < 3; ++i) {
    g.n[i] = src.shape[order[i]];
    g.src[i] = src.stride[order[i]];
    g.dst[i] = dst.stride[order[i]];
  }
  const std::int64_t tiles_x = ceil_div<std::int64_t>(g.n[0], kTile), tiles_y = ceil_div<std::int64_t>(g.n[1], kTile);
  const dim3 grid(static_cast<unsigned>(tiles_x * tiles_y), static_cast<unsigned>(std::min<std::int64_t>(g.n[2], 65535)));
  dispatch_float(src.dtype, [&](auto s) {
    dispatch_float(dst.dtype, [&](auto t) {
      using S = decltype(s);
      using D = decltype(t);
      auto kernel = d != x ? copy_strided_kernel<S, D, true> : copy_strided_kernel<S, D, false>;
      kernel<<<grid, dim3(kTile, kRows), 0, as_stream(stream)>>>(src.ptr<S>(), dst.ptr<D>(), g, tiles_x);
    });
  });
  MOEFUSE_CUDA_LAUNCH_CHECK();
}

}  // namespace moefuse::cuda
