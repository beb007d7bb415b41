// Stacked LoRA on the CUDA backend: deterministic kernels (no float atomics, every sum in a fixed order), sized by
// host-side upper bounds and reading per-expert sizes on the device. The rank is small (8-64): kernels keep a chunk
// of kRankChunk rank columns in registers and loop over chunks beyond it.
//   project      low[s, :] = row(s) . F[e]^T        a warp per kRowsPerWarp sorted rows; rows of one expert share
//                                                    every factor load
//   add_lowrank  dst row += sum over its pairs of w * low[pos] . F[e]     a thread per column over a chunk of
//                rows; the chunk's weighted low rows in shared memory, the expert's factor column in registers
//   lora_rows    (backward) grad_cw += scale * <g.B, u>; u and g.B scaled by scale * combine weight
//   grad_factor  G[e](j, c) = sum over e's rows s of row(s)[c] * low[s, j]     a block per (column tile, rank
//                chunk, expert); four row groups accumulate in registers and are summed in a fixed order
// F is A [E, r, in] or B [E, out, r], both read as [r, n] through strides. u and g.B stay in f32.
#include <algorithm>

#include "core/backend.h"
#include "core/workspace.h"
#include "cuda/common.cuh"

namespace moefuse::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRankChunk = 16;    // rank columns a thread keeps in registers
constexpr int kRowsPerWarp = 2;   // project: sorted rows per warp
constexpr int kAddRows = 32;      // add_lowrank: output rows per block (fewer when the staged rows do not fit)
constexpr int kAddSmem = 48 * 1024; // add_lowrank: staged bytes per block that set the rows per block
constexpr int kAddUnroll = 8;     // add_lowrank: output rows whose loads a thread issues together
constexpr int kFactorCols = 64;   // grad_factor: columns per block, kThreads / kFactorCols row groups
constexpr int kRowGroups = kThreads / kFactorCols;
constexpr int kStageRows = 32;    // grad_factor: rows staged per step
constexpr int kMaxGrid = 65535;   // grid y / z limit: columns or experts beyond it loop inside the block

// One expert's adapter factor read as [r, n]: element (j, c) of expert e at e * expert_stride + j * sj + c * sc.
template <class T>
struct Factor {
  const T* data;
  std::int64_t expert_stride, sj, sc;
  __device__ __forceinline__ float at(int e, int j, std::int64_t c) const {
    return to_f32(data[e * expert_stride + j * sj + c * sc]);
  }
  // F(j, c..c+VEC): one 16-byte load when VEC > 1 (columns contiguous, as in A; see col_vectors).
  template <int VEC>
  __device__ __forceinline__ void cols(int e, int j, std::int64_t c, float (&v)[VEC]) const {
    load_vec<T, VEC>(data + e * expert_stride + j * sj + c, v);
  }
  // F(j0..j0+nj, c) into v[0..nj): 16-byte loads when RANKV (rank contiguous, as in B; see rank_vectors).
  template <bool RANKV>
  __device__ __forceinline__ void col(int e, int j0, int nj, std::int64_t c, float (&v)[kRankChunk]) const {
    if constexpr (RANKV) {
      constexpr int V = Vec<T>::n;
#pragma unroll
      for (int jj = 0; jj < kRankChunk; jj += V)
        if (jj < nj) {
          float t[V];
          load_vec<T, V>(data + e * expert_stride + (j0 + jj) + c * sc, t);
#pragma unroll
          for (int u = 0; u < V; ++u) v[jj + u] = t[u];
        }
    } else {
#pragma unroll
      for (int jj = 0; jj < kRankChunk; ++jj)
        if (jj < nj) v[jj] = at(e, j0 + jj, c);
    }
  }
};

// Factor loads that may be vectorised: along the columns (A) or along the rank (B).
template <class T>
bool col_vectors(const Factor<T>& f, std::int64_t n) {
  constexpr int V = Vec<T>::n;
  return f.sc == 1 && n % V == 0 && aligned16(f.data) && f.sj % V == 0 && f.expert_stride % V == 0;
}
template <class T>
bool rank_vectors(const Factor<T>& f, int rank) {
  constexpr int V = Vec<T>::n;
  return f.sj == 1 && rank % V == 0 && aligned16(f.data) && f.sc % V == 0 && f.expert_stride % V == 0;
}

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


// VEC > 1: columns per lane, 16-byte loads of the rows and of F (col_vectors); else a column per lane, with F's
// rank chunk in 16-byte loads when RANKV (rank_vectors).
template <class T, int VEC, bool RANKV>
__global__ void project(Rows<T> in, Factor<T> f, int rank, const int* __restrict__ offsets, int experts,
                        const int* __restrict__ sorted_pairs, int top_k, float* __restrict__ low) {
  const int lane = threadIdx.x & 31;
  const std::int64_t s0 = (static_cast<std::int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5)) * kRowsPerWarp;
  const int routed = offsets[experts];
  if (s0 >= routed) return;
  const int nrows = routed - s0 < kRowsPerWarp ? static_cast<int>(routed - s0) : kRowsPerWarp;
  const T* x[kRowsPerWarp];
  int e[kRowsPerWarp];
  e[0] = expert_of(offsets, experts, static_cast<int>(s0));
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int s = static_cast<int>(s0) + min(i, nrows - 1);  // rows past nrows repeat the last one, unused
    if (i > 0) {
      e[i] = e[i - 1];
      while (offsets[e[i] + 1] <= s) ++e[i];  // sorted rows: the owner only moves forward
    }
    x[i] = in.row(sorted_pairs, top_k, s);
  }
  for (int j0 = 0; j0 < rank; j0 += kRankChunk) {
    const int nj = min(kRankChunk, rank - j0);
    // Rows [i0, i1) share one expert and each factor load.
    for (int i0 = 0; i0 < nrows;) {
      int ee = e[0], i1 = nrows;
#pragma unroll
      for (int i = 1; i < kRowsPerWarp; ++i) ee = i == i0 ? e[i] : ee;
#pragma unroll
      for (int i = kRowsPerWarp - 1; i > 0; --i)
        if (i > i0 && i < nrows && e[i] != ee) i1 = i;
      float acc[kRowsPerWarp][kRankChunk] = {};
      for (std::int64_t c = lane * VEC; c < in.n; c += 32 * VEC) {
        float xv[kRowsPerWarp][VEC];
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) {
          if (i >= i0 && i < i1) {
            load_vec<T, VEC>(x[i] + c, xv[i]);
          } else {
#pragma unroll
            for (int v = 0; v < VEC; ++v) xv[i][v] = 0.f;
          }
        }
        if constexpr (VEC > 1) {
#pragma unroll
          for (int jj = 0; jj < kRankChunk; ++jj) {
            if (jj >= nj) break;
            float fv[VEC];
            f.template cols<VEC>(ee, j0 + jj, c, fv);
#pragma unroll
            for (int v = 0; v < VEC; ++v)
#pragma unroll
              for (int i = 0; i < kRowsPerWarp; ++i) acc[i][jj] += xv[i][v] * fv[v];
          }
        } else {
          float fc[kRankChunk];
          f.template col<RANKV>(ee, j0, nj, c, fc);
#pragma unroll
          for (int jj = 0; jj < kRankChunk; ++jj)
            if (jj < nj)
#pragma unroll
              for (int i = 0; i < kRowsPerWarp; ++i) acc[i][jj] += xv[i][0] * fc[jj];
        }
      }
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
        for (int jj = 0; jj < kRankChunk; ++jj) {
          const float v = warp_sum(acc[i][jj]);
          if (lane == 0 && i >= i0 && i < i1 && jj < nj) low[(s0 + i) * rank + j0 + jj] = v;
        }
      i0 = i1;
    }
  }
}

// dst[row] += sum over the row's pairs of scale * cw[pair] * low[pos] . F[e] (cw absent: 1), rounded once.
// TOKEN: rows are tokens and their pairs are t*k + j, in j order; else rows are sorted rows, one pair each, and
// placeholder rows are left as they are. grid: (row chunks of `rows_per_block`, column tiles of kThreads; wider
// outputs loop).
template <class T, bool TOKEN, bool RANKV>
__global__ void add_lowrank(const float* __restrict__ low, Factor<T> f, int rank, std::int64_t rows, std::int64_t n,
                            int rows_per_block, const int* __restrict__ offsets, int experts,
                            const int* __restrict__ pair_positions, int top_k, const float* __restrict__ cw,
                            float scale, T* __restrict__ dst) {
  extern __shared__ float smem[];  // [rows_per_block * pairs, rank] weighted low rows, then their experts (-1: none)
  const int pairs = TOKEN ? top_k : 1;
  const int staged = rows_per_block * pairs;
  int* expert = reinterpret_cast<int*>(smem + static_cast<std::int64_t>(staged) * rank);
  const std::int64_t row0 = static_cast<std::int64_t>(blockIdx.x) * rows_per_block;
  const int nrows = rows - row0 < rows_per_block ? static_cast<int>(rows - row0) : rows_per_block;
  const int routed = offsets[experts];
  for (int i = threadIdx.x; i < nrows * pairs; i += blockDim.x) {
    const std::int64_t row = row0 + i / pairs;
    const int pos = TOKEN ? pair_positions[row * top_k + i % pairs] : static_cast<int>(row);
    expert[i] = pos < routed ? expert_of(offsets, experts, pos) : -1;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < nrows * pairs * rank; i += blockDim.x) {
    const int p = i / rank;
    if (expert[p] < 0) continue;
    const std::int64_t row = row0 + p / pairs, pair = row * top_k + p % pairs;
    const std::int64_t pos = TOKEN ? pair_positions[pair] : row;
    const float w = scale * (TOKEN && cw ? cw[pair] : 1.f);
    smem[i] = w * low[pos * rank + i % rank];
  }
  __syncthreads();
  const int nj = min(kRankChunk, rank);
  for (std::int64_t c = static_cast<std::int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; c < n;
       c += static_cast<std::int64_t>(gridDim.y) * blockDim.x) {
    float fc[kRankChunk];  // F[cached](0..nj, c)
    int cached = -1;
    for (int r0 = 0; r0 < nrows; r0 += kAddUnroll) {
      float d[kAddUnroll];  // the group's dst values, loaded together (in flight at once)
#pragma unroll
      for (int u = 0; u < kAddUnroll; ++u)
        if (r0 + u < nrows) d[u] = to_f32(dst[(row0 + r0 + u) * n + c]);
#pragma unroll
      for (int u = 0; u < kAddUnroll; ++u) {
        const int r = r0 + u;
        if (r >= nrows) break;
        bool any = false;
        for (int jp = 0; jp < pairs; ++jp) {
          const int p = r * pairs + jp, e = expert[p];
          if (e < 0) continue;
          any = true;
          if (e != cached) {
            f.template col<RANKV>(e, 0, nj, c, fc);
            cached = e;
          }
          const float* l = smem + static_cast<std::int64_t>(p) * rank;
          float acc = 0.f;
#pragma unroll
          for (int jj = 0; jj < kRankChunk; ++jj)
            if (jj < nj) acc += l[jj] * fc[jj];
          for (int j = kRankChunk; j < rank; ++j) acc += l[j] * f.at(e, j, c);
          d[u] += acc;
        }
        // A placeholder sorted row is not this op's to write; token rows are always written.
        if (TOKEN || any) dst[(row0 + r) * n + c] = from_f32<T>(d[u]);
      }
    }
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
// experts without rows get zeros. grid: (column tiles of kFactorCols, rank chunks, experts). Row group g of the
// block takes rows g, g + kRowGroups, ... of each staged step; the groups' sums are added in order g = 0, 1, ...
template <class T>
__global__ void grad_factor(Rows<T> in, const float* __restrict__ low, int rank, const int* __restrict__ offsets,
                            int experts, const int* __restrict__ sorted_pairs, int top_k, T* __restrict__ grad,
                            std::int64_t expert_stride, std::int64_t sj, std::int64_t sc) {
  __shared__ const T* row_ptr[kStageRows];
  __shared__ float low_s[kStageRows][kRankChunk];
  __shared__ float part[kRowGroups - 1][kRankChunk][kFactorCols];
  const int col = threadIdx.x % kFactorCols, g = threadIdx.x / kFactorCols;
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * kFactorCols + col;
  const int j0 = blockIdx.y * kRankChunk, nj = min(kRankChunk, rank - j0);
  for (int e = blockIdx.z; e < experts; e += gridDim.z) {
    const int begin = offsets[e], end = offsets[e + 1];
    float acc[kRankChunk] = {};
    for (int s0 = begin; s0 < end; s0 += kStageRows) {
      const int n_stage = min(kStageRows, end - s0);
      __syncthreads();  // the previous step's reads are done
      for (int i = threadIdx.x; i < n_stage * kRankChunk; i += blockDim.x) {
        const int r = i / kRankChunk, jj = i % kRankChunk;
        low_s[r][jj] = jj < nj ? low[static_cast<std::int64_t>(s0 + r) * rank + j0 + jj] : 0.f;
        if (jj == 0) row_ptr[r] = in.row(sorted_pairs, top_k, s0 + r);
      }
      __syncthreads();
      if (c < in.n) {
#pragma unroll 8
        for (int r = g; r < n_stage; r += kRowGroups) {
          const float v = to_f32(row_ptr[r][c]);
#pragma unroll
          for (int jj = 0; jj < kRankChunk; ++jj) acc[jj] += v * low_s[r][jj];
        }
      }
    }
    if (g > 0)
#pragma unroll
      for (int jj = 0; jj < kRankChunk; ++jj) part[g - 1][jj][col] = acc[jj];
    __syncthreads();
    if (g == 0 && c < in.n)
      for (int jj = 0; jj < nj; ++jj) {
        float v = acc[jj];
        for (int h = 0; h < kRowGroups - 1; ++h) v += part[h][jj][col];
        grad[e * expert_stride + (j0 + jj) * sj + c * sc] = from_f32<T>(v);
      }
    __syncthreads();  // part is reused by the next expert
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
  auto launch = [&](auto kernel) {
    kernel<<<blocks(m, kWarps * kRowsPerWarp), kThreads, 0, s>>>(in, f, rank, plan.offsets.ptr<int>(), plan.experts,
                                                                 plan.sorted_pairs.ptr<int>(), plan.top_k, low);
    MOEFUSE_CUDA_LAUNCH_CHECK();
  };
  if (in.n % Vec<T>::n == 0 && aligned16(in.data) && col_vectors(f, in.n))
    launch(project<T, Vec<T>::n, false>);
  else if (rank_vectors(f, rank))
    launch(project<T, 1, true>);
  else
    launch(project<T, 1, false>);
}

template <class T>
void launch_add_lowrank(const Plan& plan, bool token_order, const float* low, Factor<T> f, int rank,
                        const float* cw, float scale, const TensorView& dst, cudaStream_t s) {
  const std::int64_t rows = dst.shape[0], n = dst.shape[1];
  if (rows == 0 || n == 0) return;
  const int pairs = token_order ? plan.top_k : 1;
  const std::size_t per_row = static_cast<std::size_t>(pairs) * (rank * sizeof(float) + sizeof(int));
  const int rows_per_block = static_cast<int>(std::clamp<std::size_t>(kAddSmem / per_row, 1, kAddRows));
  const std::size_t smem = rows_per_block * per_row;
  const dim3 grid(blocks(rows, rows_per_block), std::min<unsigned>(blocks(n, kThreads), kMaxGrid));
  auto launch = [&](auto kernel) {
    set_smem_limit(kernel, smem);
    kernel<<<grid, kThreads, smem, s>>>(low, f, rank, rows, n, rows_per_block, plan.offsets.ptr<int>(),
                                        plan.experts, plan.pair_positions.ptr<int>(), plan.top_k, cw, scale,
                                        dst.ptr<T>());
    MOEFUSE_CUDA_LAUNCH_CHECK();
  };
  const bool rv = rank_vectors(f, rank);
  if (token_order)
    rv ? launch(add_lowrank<T, true, true>) : launch(add_lowrank<T, true, false>);
  else
    rv ? launch(add_lowrank<T, false, true>) : launch(add_lowrank<T, false, false>);
}

template <class T>
void launch_grad_factor(const Plan& plan, Rows<T> in, const float* low, int rank, const TensorView& grad,
                        Factor<T> layout, cudaStream_t s) {
  if (in.n == 0) return;
  const dim3 grid(blocks(in.n, kFactorCols), blocks(rank, kRankChunk), std::min(plan.experts, kMaxGrid));
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
