// Stacked LoRA on the CUDA backend: simple, deterministic kernels (the rank is small, 8-64), all sized by upper bounds
// on the host and reading per-expert sizes on the device:
//   project      low[s, :] = row(s) . F[e]^T         one block per sorted row, a warp per rank column
//   add_lowrank  dst row += sum over its pairs of w * low[pos] . F[e]     one block per output row, pairs in j order
//   lora_rows    (backward) grad_cw += scale * <g.B, u>; u and g.B scaled by scale * combine weight
//   grad_factor  G[e](j, c) = sum over e's rows s of row(s)[c] * low[s, j]     one block per (expert, column tile,
//                rank chunk), rows in sorted order
// F is A [E, r, in] or B [E, out, r], both read as [r, n] through strides. u and g.B stay in f32.
#include <algorithm>

#include "core/backend.h"
#include "core/workspace.h"
#include "cuda/common.cuh"

namespace moefuse::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRankChunk = 16;    // rank columns accumulated per thread in grad_factor
constexpr int kMaxGridZ = 65535;  // experts beyond this loop inside the block

// One expert's adapter factor read as [r, n]: element (j, c) of expert e at e * expert_stride + j * sj + c * sc.
template <class T>
struct Factor {
  const T* data;
  std::int64_t expert_stride, sj, sc;
  __device__ __forceinline__ float at(int e, int j, std::int64_t c) const {
    return to_f32(data[e * expert_stride + j * sj + c * sc]);
  }
};

// A [E, r, in] is already [r, in]; B [E, out, r] is read transposed.
template <class T>
Factor<T> factor_a(const Lora& lora) {
  const std::int64_t r = lora.a.shape[1], in = lora.a.shape[2];
  return {lora.a.ptr<T>(), r * in, in, 1};
}
template <class T>
Factor<T> factor_b(const Lora& lora) {
  const std::int64_t out = lora.b.shape[1], r = lora.b.shape[2];
  return {lora.b.ptr<T>(), out * r, 1, r};
}

// Rows of an [*, n] operand in sorted order: row s is the token's row when by_token, else row s itself.
template <class T>
struct Rows {
  const T* data;
  std::int64_t n;
  bool by_token;
  __device__ __forceinline__ const T* row(const int* sorted_pairs, int top_k, int s) const {
    return data + (by_token ? sorted_pairs[s] / top_k : s) * n;
  }
};

// The expert owning sorted row s < offsets[E]: the last e with offsets[e] <= s (an empty expert shares its offset
// with the next one, which is the owner).
__device__ __forceinline__ int expert_of(const int* offsets, int experts, int s) {
  int lo = 0, hi = experts - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= s)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <class T>
__global__ void project(Rows<T> in, Factor<T> f, int rank, const int* __restrict__ offsets, int experts,
                        const int* __restrict__ sorted_pairs, int top_k, float* __restrict__ low) {
  const int s = blockIdx.x;
  if (s >= offsets[experts]) return;
  const int e = expert_of(offsets, experts, s);
  const T* x = in.row(sorted_pairs, top_k, s);
  const int lane = threadIdx.x & 31;
  for (int j = threadIdx.x >> 5; j < rank; j += kWarps) {
    float acc = 0.f;
    for (std::int64_t c = lane; c < in.n; c += 32) acc += to_f32(x[c]) * f.at(e, j, c);
    acc = warp_sum(acc);
    if (lane == 0) low[static_cast<std::int64_t>(s) * rank + j] = acc;
  }
}

// dst[row] += sum over the row's pairs of scale * cw[pair] * low[pos] . F[e] (cw absent: 1), rounded once.
// TOKEN: rows are tokens and their pairs are t*k + j, in j order; else rows are sorted rows, one pair each, and
// placeholder rows are left as they are.
template <class T, bool TOKEN>
__global__ void add_lowrank(const float* __restrict__ low, Factor<T> f, int rank, std::int64_t n,
                            const int* __restrict__ offsets, int experts, const int* __restrict__ pair_positions,
                            int top_k, const float* __restrict__ cw, float scale, T* __restrict__ dst) {
  extern __shared__ float smem[];  // [pairs, rank] weighted low rows, then [pairs] experts (-1: placeholder)
  const int pairs = TOKEN ? top_k : 1;
  int* expert = reinterpret_cast<int*>(smem + pairs * rank);
  const std::int64_t row = blockIdx.x;
  const int routed = offsets[experts];
  if (!TOKEN && row >= routed) return;
  for (int jp = threadIdx.x; jp < pairs; jp += blockDim.x) {
    const int pos = TOKEN ? pair_positions[row * top_k + jp] : static_cast<int>(row);
    expert[jp] = pos < routed ? expert_of(offsets, experts, pos) : -1;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < pairs * rank; i += blockDim.x) {
    const int jp = i / rank;
    if (expert[jp] < 0) continue;
    const std::int64_t pos = TOKEN ? pair_positions[row * top_k + jp] : row;
    const float w = scale * (TOKEN && cw ? cw[row * top_k + jp] : 1.f);
    smem[i] = w * low[pos * rank + i % rank];
  }
  __syncthreads();
  for (std::int64_t c = threadIdx.x; c < n; c += blockDim.x) {
    float acc = 0.f;
    for (int jp = 0; jp < pairs; ++jp) {
      const int e = expert[jp];
      if (e < 0) continue;
      for (int j = 0; j < rank; ++j) acc += smem[jp * rank + j] * f.at(e, j, c);
    }
    T* d = dst + row * n + c;
    *d = from_f32<T>(to_f32(*d) + acc);
  }
}

// One warp per sorted row s: gcw[pair] += scale * <gb[s], u[s]>; then u[s] and gb[s] *= scale * cw[pair].
__global__ void lora_rows(float* __restrict__ u, float* __restrict__ gb, int rank, const int* __restrict__ offsets,
                          int experts, const int* __restrict__ sorted_pairs, const float* __restrict__ cw,
                          float* __restrict__ gcw, float scale) {
  const std::int64_t s = static_cast<std::int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (s >= offsets[experts]) return;
  const int lane = threadIdx.x & 31, pair = sorted_pairs[s];
  float* us = u + s * rank;
  float* gs = gb + s * rank;
  if (gcw) {
    float dot = 0.f;
    for (int j = lane; j < rank; j += 32) dot += gs[j] * us[j];
    dot = warp_sum(dot);
    if (lane == 0) gcw[pair] += scale * dot;
  }
  const float w = scale * (cw ? cw[pair] : 1.f);
  for (int j = lane; j < rank; j += 32) {
    us[j] *= w;
    gs[j] *= w;
  }
}

// grad[e](j, c) = sum over expert e's sorted rows s of in.row(s)[c] * low[s, j], stored through the strides of F;
// experts without rows get zeros. grid: (column tiles, rank chunks, experts).
template <class T>
__global__ void grad_factor(Rows<T> in, const float* __restrict__ low, int rank, const int* __restrict__ offsets,
                            int experts, const int* __restrict__ sorted_pairs, int top_k, T* __restrict__ grad,
                            std::int64_t expert_stride, std::int64_t sj, std::int64_t sc) {
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int j0 = blockIdx.y * kRankChunk, nj = min(kRankChunk, rank - j0);
  if (c >= in.n) return;
  for (int e = blockIdx.z; e < experts; e += gridDim.z) {
    float acc[kRankChunk] = {};
    for (int s = offsets[e]; s < offsets[e + 1]; ++s) {
      const float v = to_f32(in.row(sorted_pairs, top_k, s)[c]);
      const float* l = low + static_cast<std::int64_t>(s) * rank + j0;
#pragma unroll
      for (int jj = 0; jj < kRankChunk; ++jj)
        if (jj < nj) acc[jj] += v * l[jj];
    }
#pragma unroll
    for (int jj = 0; jj < kRankChunk; ++jj)
      if (jj < nj) grad[e * expert_stride + (j0 + jj) * sj + c * sc] = from_f32<T>(acc[jj]);
  }
}

// Workspace: u = x.A^T [M, r] and, in backward, g.B [M, r], both f32.
struct Workspace {
  TensorView u, gb;
};

Workspace carve(detail::Carver& c, const Plan& plan, const Lora& lora, bool backward) {
  const std::int64_t m = plan.tokens * plan.top_k, r = lora.a.shape[1];
  Workspace w;
  w.u = c.take(DType::f32, {m, r});
  if (backward) w.gb = c.take(DType::f32, {m, r});
  return w;
}

unsigned blocks(std::int64_t n, std::int64_t per_block) {
  return static_cast<unsigned>(ceil_div<std::int64_t>(n, per_block));
}

template <class T>
void launch_project(const Plan& plan, Rows<T> in, Factor<T> f, int rank, float* low, cudaStream_t s) {
  const std::int64_t m = plan.tokens * plan.top_k;
  if (m == 0) return;
  project<T><<<static_cast<unsigned>(m), kThreads, 0, s>>>(in, f, rank, plan.offsets.ptr<int>(), plan.experts,
                                                            plan.sorted_pairs.ptr<int>(), plan.top_k, low);
  MOEFUSE_CUDA_LAUNCH_CHECK();
}

template <class T>
void launch_add_lowrank(const Plan& plan, bool token_order, const float* low, Factor<T> f, int rank,
                        const float* cw, float scale, const TensorView& dst, cudaStream_t s) {
  const std::int64_t rows = dst.shape[0], n = dst.shape[1];
  if (rows == 0 || n == 0) return;
  const int pairs = token_order ? plan.top_k : 1;
  const std::size_t smem = static_cast<std::size_t>(pairs) * (rank * sizeof(float) + sizeof(int));
  auto launch = [&](auto kernel) {
    set_smem_limit(kernel, smem);
    kernel<<<static_cast<unsigned>(rows), kThreads, smem, s>>>(low, f, rank, n, plan.offsets.ptr<int>(),
                                                               plan.experts, plan.pair_positions.ptr<int>(),
                                                               plan.top_k, cw, scale, dst.ptr<T>());
    MOEFUSE_CUDA_LAUNCH_CHECK();
  };
  if (token_order)
    launch(add_lowrank<T, true>);
  else
    launch(add_lowrank<T, false>);
}

template <class T>
void launch_grad_factor(const Plan& plan, Rows<T> in, const float* low, int rank, const TensorView& grad,
                        Factor<T> layout, cudaStream_t s) {
  if (in.n == 0) return;
  const dim3 grid(blocks(in.n, kThreads), blocks(rank, kRankChunk), std::min(plan.experts, kMaxGridZ));
  grad_factor<T><<<grid, kThreads, 0, s>>>(in, low, rank, plan.offsets.ptr<int>(), plan.experts,
                                            plan.sorted_pairs.ptr<int>(), plan.top_k, grad.ptr<T>(),
                                            layout.expert_stride, layout.sj, layout.sc);
  MOEFUSE_CUDA_LAUNCH_CHECK();
}

template <class T>
void forward_impl(const Plan& plan, const TensorView& x, const Lora& lora, bool gather, const TensorView& cw,
                  const TensorView& out, const TensorView& workspace, cudaStream_t s) {
  detail::Carver c(workspace);
  const Workspace ws = carve(c, plan, lora, false);
  const int rank = static_cast<int>(lora.a.shape[1]);
  float* u = ws.u.ptr<float>();
  launch_project<T>(plan, {x.ptr<T>(), x.shape[1], gather}, factor_a<T>(lora), rank, u, s);
  launch_add_lowrank<T>(plan, cw.defined(), u, factor_b<T>(lora), rank, cw.defined() ? cw.ptr<float>() : nullptr,
                        lora.scale, out, s);
}

// See the CPU backend for the algebra: du = scale * w * g.B, grad_B[e] = g^T . (scale * w * u), grad_A[e] = du^T . x,
// grad_x rows += du . A[e], grad_cw += scale * <g.B, u>.
template <class T>
void backward_impl(const Plan& plan, const TensorView& x, const Lora& lora, bool gather, const TensorView& cw,
                   const TensorView& grad_out, const TensorView& grad_x, const LoraGrads& grad_lora,
                   const TensorView& grad_cw, const TensorView& workspace, cudaStream_t s) {
  detail::Carver c(workspace);
  const Workspace ws = carve(c, plan, lora, true);
  const int rank = static_cast<int>(lora.a.shape[1]);
  const std::int64_t m = plan.tokens * plan.top_k;
  const bool combine = cw.defined();
  float* u = ws.u.ptr<float>();
  float* gb = ws.gb.ptr<float>();
  const Rows<T> xr{x.ptr<T>(), x.shape[1], gather}, gr{grad_out.ptr<T>(), grad_out.shape[1], combine};

  launch_project<T>(plan, xr, factor_a<T>(lora), rank, u, s);
  launch_project<T>(plan, gr, factor_b<T>(lora), rank, gb, s);
  if (m > 0) {
    lora_rows<<<blocks(m, kWarps), kThreads, 0, s>>>(u, gb, rank, plan.offsets.ptr<int>(), plan.experts,
                                                     plan.sorted_pairs.ptr<int>(),
                                                     combine ? cw.ptr<float>() : nullptr,
                                                     grad_cw.defined() ? grad_cw.ptr<float>() : nullptr, lora.scale);
    MOEFUSE_CUDA_LAUNCH_CHECK();
  }
  if (grad_lora.b.defined()) launch_grad_factor<T>(plan, gr, u, rank, grad_lora.b, factor_b<T>(lora), s);
  if (grad_lora.a.defined()) launch_grad_factor<T>(plan, xr, gb, rank, grad_lora.a, factor_a<T>(lora), s);
  if (grad_x.defined()) launch_add_lowrank<T>(plan, gather, gb, factor_a<T>(lora), rank, nullptr, 1.f, grad_x, s);
}

}  // namespace

std::size_t moe_lora_workspace_bytes(const Plan& plan, const TensorView&, const Lora& lora, bool,
                                     const TensorView&) {
  detail::Carver c(plan.counts.device);
  carve(c, plan, lora, false);
  return c.bytes();
}

void moe_lora_forward_add(const Plan& plan, const TensorView& x, const Lora& lora, bool gather,
                          const TensorView& combine_weights, const TensorView& out, const TensorView& workspace,
                          void* stream) {
  DeviceGuard guard(plan.counts.device);
  dispatch_float(lora.a.dtype, [&](auto tag) {
    forward_impl<decltype(tag)>(plan, x, lora, gather, combine_weights, out, workspace, as_stream(stream));
  });
}

std::size_t moe_lora_backward_workspace_bytes(const Plan& plan, const TensorView&, const Lora& lora, bool,
                                              const TensorView&) {
  detail::Carver c(plan.counts.device);
  carve(c, plan, lora, true);
  return c.bytes();
}

void moe_lora_backward_add(const Plan& plan, const TensorView& x, const Lora& lora, bool gather,
                           const TensorView& combine_weights, const TensorView& grad_out, const TensorView& grad_x,
                           const LoraGrads& grad_lora, const TensorView& grad_combine_weights,
                           const TensorView& workspace, void* stream) {
  DeviceGuard guard(plan.counts.device);
  dispatch_float(lora.a.dtype, [&](auto tag) {
    backward_impl<decltype(tag)>(plan, x, lora, gather, combine_weights, grad_out, grad_x, grad_lora,
                                 grad_combine_weights, workspace, as_stream(stream));
  });
}

}  // namespace moefuse::cuda
