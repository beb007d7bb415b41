// Routing plan on the device, deterministic and without atomics in global memory:
//   1. each chunk of 256 pairs histograms its buckets (experts 0..E-1, bucket E = placeholders, E+1 = negatives);
//   2. per bucket, an exclusive scan over chunks gives each chunk's start within the bucket, and the bucket totals;
//   3. one block scans the totals into expert offsets;
//   4. each chunk walks its pairs warp by warp in pair order and scatters them: a stable counting sort.
#include "core/backend.h"
#include "core/workspace.h"
#include "cuda/common.cuh"
#include "cuda/scan.cuh"

namespace moefuse::cuda {
namespace {

constexpr int kChunk = 256;  // pairs per chunk = threads per block in steps 1 and 4
constexpr int kScanThreads = 1024;

__device__ __forceinline__ int bucket_of(int id, int experts) { return id >= 0 && id < experts ? id : experts; }

__global__ void plan_histogram(const int* __restrict__ ids, int m, int experts, int* __restrict__ hist) {
  extern __shared__ int h[];  // [E + 2]
  const int cols = experts + 2;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) h[c] = 0;
  __syncthreads();
  const int p = blockIdx.x * kChunk + threadIdx.x;
  if (p < m) {
    const int id = ids[p];
    atomicAdd(&h[bucket_of(id, experts)], 1);
    if (id < 0) atomicAdd(&h[experts + 1], 1);
  }
  __syncthreads();
  for (int c = threadIdx.x; c < cols; c += blockDim.x) hist[static_cast<std::int64_t>(blockIdx.x) * cols + c] = h[c];
}

// One block per bucket: hist[:, c] becomes the exclusive prefix over chunks; totals[c] the bucket size.
__global__ void plan_chunk_scan(int* __restrict__ hist, int chunks, int experts, int* __restrict__ totals,
                                int* __restrict__ counts, int* __restrict__ invalid) {
  const int c = blockIdx.x, cols = experts + 2;
  const int total = block_exclusive_scan<kScanThreads>(
      chunks, [&](int i) { return hist[static_cast<std::int64_t>(i) * cols + c]; },
      [&](int i, int prefix) { hist[static_cast<std::int64_t>(i) * cols + c] = prefix; });
  if (threadIdx.x == 0) {
    totals[c] = total;
    if (c < experts) counts[c] = total;
    if (c == experts + 1) invalid[0] = total;
  }
}

__global__ void plan_offsets(const int* __restrict__ totals, int experts, int* __restrict__ offsets) {
  const int total = block_exclusive_scan<kScanThreads>(
      experts, [&](int e) { return totals[e]; }, [&](int e, int prefix) { offsets[e] = prefix; });
  if (threadIdx.x == 0) offsets[experts] = total;
}

__global__ void plan_scatter(const int* __restrict__ ids, int m, int experts, const int* __restrict__ hist,
                             const int* __restrict__ offsets, int* __restrict__ sorted_pairs,
                             int* __restrict__ pair_positions) {
  extern __shared__ int next[];  // [E + 1]: next free sorted position of each bucket for this chunk
  const int cols = experts + 2;
  for (int c = threadIdx.x; c <= experts; c += blockDim.x)
    next[c] = offsets[c] + hist[static_cast<std::int64_t>(blockIdx.x) * cols + c];
  __syncthreads();
  const int p = blockIdx.x * kChunk + threadIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int bucket = p < m ? bucket_of(ids[p], experts) : -1;
  for (int w = 0; w < kChunk / 32; ++w) {  // warps in pair order keep the sort stable
    if (warp == w) {
      const unsigned same = __match_any_sync(0xffffffffu, bucket);
      if (bucket >= 0) {
        const int pos = next[bucket] + __popc(same & ((1u << lane) - 1));
        sorted_pairs[pos] = p;
        pair_positions[p] = pos;
      }
      __syncwarp();
      if (bucket >= 0 && lane == __ffs(same) - 1) next[bucket] += __popc(same);
    }
    __syncthreads();
  }
}

struct PlanWorkspace {
  TensorView hist, totals;
};

PlanWorkspace carve(detail::Carver& c, const Plan& plan) {
  const std::int64_t chunks = ceil_div<std::int64_t>(plan.tokens * plan.top_k, kChunk);
  PlanWorkspace w;
  w.hist = c.take(DType::i32, {chunks * (plan.experts + 2)});
  w.totals = c.take(DType::i32, {plan.experts + 2});
  return w;
}

}  // namespace

std::size_t routing_plan_workspace_bytes(const Plan& plan) {
  detail::Carver c(plan.counts.device);
  carve(c, plan);
  return c.bytes();
}

void routing_plan(const TensorView& topk_ids, const Plan& plan, const TensorView& workspace, void* stream) {
  detail::Carver c(workspace);
  const PlanWorkspace w = carve(c, plan);
  const cudaStream_t s = as_stream(stream);
  const int m = static_cast<int>(plan.tokens * plan.top_k), experts = plan.experts;
  const int chunks = ceil_div(m, kChunk);
  const std::size_t hist_smem = sizeof(int) * (experts + 2);
  int* hist = w.hist.ptr<int>();
  int* totals = w.totals.ptr<int>();
  if (chunks > 0) {
    plan_histogram<<<chunks, kChunk, hist_smem, s>>>(topk_ids.ptr<int>(), m, experts, hist);
    MOEFUSE_CUDA_LAUNCH_CHECK();
  }
  plan_chunk_scan<<<experts + 2, kScanThreads, 0, s>>>(hist, chunks, experts, totals, plan.counts.ptr<int>(),
                                                       plan.invalid.ptr<int>());
  MOEFUSE_CUDA_LAUNCH_CHECK();
  plan_offsets<<<1, kScanThreads, 0, s>>>(totals, experts, plan.offsets.ptr<int>());
  MOEFUSE_CUDA_LAUNCH_CHECK();
  if (chunks > 0) {
    plan_scatter<<<chunks, kChunk, hist_smem, s>>>(topk_ids.ptr<int>(), m, experts, hist, plan.offsets.ptr<int>(),
                                                   plan.sorted_pairs.ptr<int>(), plan.pair_positions.ptr<int>());
    MOEFUSE_CUDA_LAUNCH_CHECK();
  }
}

int plan_invalid_count(const Plan& plan, void* stream) {
  int invalid = 0;
  const cudaStream_t s = as_stream(stream);
  MOEFUSE_CUDA_CHECK(cudaMemcpyAsync(&invalid, plan.invalid.data, sizeof(int), cudaMemcpyDeviceToHost, s));
  MOEFUSE_CUDA_CHECK(cudaStreamSynchronize(s));
  return invalid;
}

}  // namespace moefuse::cuda
