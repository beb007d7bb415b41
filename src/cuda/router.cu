// Router: one warp per token. Probabilities live in shared memory (E floats per warp); top-k is k rounds of a
// warp argmax in the CPU backend's ranking, so choices come out sorted by descending weight.
#include <climits>

#include "core/backend.h"
#include "cuda/common.cuh"

namespace moefuse::cuda {
namespace {

constexpr int kWarps = 8;

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Writes softmax(logits[t]) into p[0..E). Called by a whole warp.
template <class T>
__device__ void softmax_row(const T* __restrict__ row, int experts, float* p) {
  const int lane = threadIdx.x & 31;
  float mx = -INFINITY;
  for (int e = lane; e < experts; e += 32) {
    p[e] = to_f32(row[e]);
    mx = fmaxf(mx, p[e]);
  }
  mx = warp_max(mx);
  float sum = 0.f;
  for (int e = lane; e < experts; e += 32) {
    p[e] = expf(p[e] - mx);
    sum += p[e];
  }
  sum = warp_sum(sum);
  for (int e = lane; e < experts; e += 32) p[e] = p[e] / sum;
  __syncwarp();
}

// Larger probability first, ties to the lower id; NaN ranks above every number (as on the CPU), so a NaN row still
// picks k distinct in-range ids.
__device__ __forceinline__ bool ranks_before(float p, int e, float q, int f) {
  if (isnan(p) || isnan(q)) return isnan(p) && (!isnan(q) || e < f);
  return p > q || (p == q && e < f);
}

template <class T>
__global__ void router_forward_kernel(const T* __restrict__ logits, std::int64_t tokens, int experts, int top_k,
                                      bool renormalize, int* __restrict__ ids, float* __restrict__ weights) {
  extern __shared__ float smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const std::int64_t t = static_cast<std::int64_t>(blockIdx.x) * kWarps + warp;
  if (t >= tokens) return;
  float* p = smem + static_cast<std::size_t>(warp) * experts;
  softmax_row(logits + t * experts, experts, p);
  float picked = 0.f;
  for (int j = 0; j < top_k; ++j) {
    float best = -INFINITY;
    int best_id = INT_MAX;
    for (int e = lane; e < experts; e += 32)
      if (ranks_before(p[e], e, best, best_id)) best = p[e], best_id = e;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float b = __shfl_xor_sync(0xffffffffu, best, o);
      const int id = __shfl_xor_sync(0xffffffffu, best_id, o);
      if (ranks_before(b, id, best, best_id)) best = b, best_id = id;
    }
    if (lane == 0) {
      ids[t * top_k + j] = best_id;
      weights[t * top_k + j] = best;
      p[best_id] = -INFINITY;  // taken: ranks below every probability and NaN
    }
    picked += best;
    __syncwarp();
  }
  if (renormalize && lane == 0)
    for (int j = 0; j < top_k; ++j) weights[t * top_k + j] /= picked;
}

// d logits = softmax' (d p), where d p is non-zero only at the chosen experts:
//   renormalised: w_j = p_j / S, so d p_j = (g_j - sum_i g_i w_i) / S;  otherwise d p_j = g_j.
//   d logit_e = p_e (d p_e - sum_j p_j d p_j).
template <class L, class G>
__global__ void router_backward_kernel(const L* __restrict__ logits, const int* __restrict__ ids,
                                       const float* __restrict__ grad_w, const G* __restrict__ extra,
                                       std::int64_t tokens, int experts, int top_k, bool renormalize,
                                       G* __restrict__ grad_logits) {
  extern __shared__ float smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const std::int64_t t = static_cast<std::int64_t>(blockIdx.x) * kWarps + warp;
  if (t >= tokens) return;
  float* p = smem + static_cast<std::size_t>(warp) * experts;
  softmax_row(logits + t * experts, experts, p);
  const int* id = ids + t * top_k;
  const float* g = grad_w + t * top_k;
  auto chosen = [&](int j) { return id[j] >= 0 && id[j] < experts; };
  float picked = 0.f, gw = 0.f;
  if (renormalize) {
    for (int j = 0; j < top_k; ++j)
      if (chosen(j)) picked += p[id[j]];
    for (int j = 0; j < top_k; ++j)
      if (chosen(j)) gw += g[j] * p[id[j]] / picked;
  }
  auto dp = [&](int j) { return renormalize ? (g[j] - gw) / picked : g[j]; };
  float dot = 0.f;
  for (int j = 0; j < top_k; ++j)
    if (chosen(j)) dot += p[id[j]] * dp(j);
  for (int e = lane; e < experts; e += 32) {
    float d = 0.f;
    for (int j = 0; j < top_k; ++j)
      if (id[j] == e) d += dp(j);
    float v = p[e] * (d - dot);
    if (extra) v += to_f32(extra[t * experts + e]);
    grad_logits[t * experts + e] = from_f32<G>(v);
  }
}

std::size_t router_smem(int experts) { return sizeof(float) * kWarps * static_cast<std::size_t>(experts); }

}  // namespace

void router_forward(const TensorView& logits, int top_k, bool renormalize, const TensorView& topk_ids,
                    const TensorView& topk_weights, void* stream) {
  DeviceGuard guard(logits.device);
  const std::int64_t tokens = logits.shape[0];
  const int experts = static_cast<int>(logits.shape[1]);
  if (tokens == 0) return;
  const auto blocks = static_cast<unsigned>(ceil_div<std::int64_t>(tokens, kWarps));
  const std::size_t smem = router_smem(experts);
  dispatch_float(logits.dtype, [&](auto tag) {
    using T = decltype(tag);
    set_smem_limit(router_forward_kernel<T>, smem);
    router_forward_kernel<T><<<blocks, kWarps * 32, smem, as_stream(stream)>>>(
        logits.ptr<T>(), tokens, experts, top_k, renormalize, topk_ids.ptr<int>(), topk_weights.ptr<float>());
  });
  MOEFUSE_CUDA_LAUNCH_CHECK();
}

void router_backward(const TensorView& logits, const TensorView& topk_ids, bool renormalize,
                     const TensorView& grad_topk_weights, const TensorView& extra_grad_logits,
                     const TensorView& grad_logits, void* stream) {
  DeviceGuard guard(logits.device);
  const std::int64_t tokens = logits.shape[0];
  const int experts = static_cast<int>(logits.shape[1]), top_k = static_cast<int>(topk_ids.shape[1]);
  if (tokens == 0) return;
  const auto blocks = static_cast<unsigned>(ceil_div<std::int64_t>(tokens, kWarps));
  const std::size_t smem = router_smem(experts);
  dispatch_float(logits.dtype, [&](auto ltag) {
    dispatch_float(grad_logits.dtype, [&](auto gtag) {
      using L = decltype(ltag);
      using G = decltype(gtag);
      set_smem_limit(router_backward_kernel<L, G>, smem);
      router_backward_kernel<L, G><<<blocks, kWarps * 32, smem, as_stream(stream)>>>(
          logits.ptr<L>(), topk_ids.ptr<int>(), grad_topk_weights.ptr<float>(),
          extra_grad_logits.defined() ? extra_grad_logits.ptr<G>() : nullptr, tokens, experts, top_k, renormalize,
          grad_logits.ptr<G>());
    });
  });
  MOEFUSE_CUDA_LAUNCH_CHECK();
}

}  // namespace moefuse::cuda
