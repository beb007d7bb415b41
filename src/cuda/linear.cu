// moe_linear forward and backward: grouped GEMMs over the plan's sorted rows plus the deterministic per-token
// gather-sums (combine in forward, grad_x with gather in backward) and row-dot reductions.
#include "core/backend.h"
#include "core/workspace.h"
#include "cuda/common.cuh"
#include "cuda/grouped_gemm.cuh"

namespace moefuse::cuda {
namespace {

constexpr int kThreads = 256;

// out[t, :] = sum_j w[t, j] * rows[pair_positions[t*k + j], :] over the token's routed pairs (w = 1 when absent).
// VEC elements per thread; cols % VEC == 0.
template <class T, int VEC>
__global__ void gather_sum_rows(const T* __restrict__ rows, const int* __restrict__ pair_positions,
                                const float* __restrict__ w, const int* __restrict__ offsets, int experts,
                                std::int64_t tokens, int top_k, std::int64_t cols, T* __restrict__ out) {
  const std::int64_t per_row = cols / VEC;
  const std::int64_t idx = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= tokens * per_row) return;
  const std::int64_t t = idx / per_row, c = (idx % per_row) * VEC;
  const int routed = offsets[experts];  // sorted rows past this are placeholders
  float acc[VEC] = {};
  for (int j = 0; j < top_k; ++j) {
    const std::int64_t pair = t * top_k + j;
    const int pos = pair_positions[pair];
    if (pos >= routed) continue;
    const float wj = w ? w[pair] : 1.f;
    const T* src = rows + pos * cols + c;
    if constexpr (VEC > 1) {
      const Vec<T> v = *reinterpret_cast<const Vec<T>*>(src);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += wj * to_f32(v.v[i]);
    } else {
      acc[0] += wj * to_f32(src[0]);
    }
  }
  T* dst = out + t * cols + c;
  if constexpr (VEC > 1) {
    Vec<T> v;
#pragma unroll
    for (int i = 0; i < VEC; ++i) v.v[i] = from_f32<T>(acc[i]);
    *reinterpret_cast<Vec<T>*>(dst) = v;
  } else {
    dst[0] = from_f32<T>(acc[0]);
  }
}

// Zeroes sorted rows [offsets[E], m) (placeholder pairs). The grid is fixed; work scales with the placeholders.
template <class T>
__global__ void zero_placeholder_rows(T* __restrict__ out, const int* __restrict__ offsets, int experts,
                                      std::int64_t m, std::int64_t cols) {
  const std::int64_t begin = offsets[experts] * cols, end = m * cols;
  for (std::int64_t i = begin + static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < end;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    out[i] = from_f32<T>(0.f);
}

// grad_w[pair] = sum of the row-dot partials of its sorted row; zero for placeholders.
__global__ void reduce_row_dots(const float* __restrict__ partial, int ldp, int slots,
                                const int* __restrict__ pair_positions, const int* __restrict__ offsets, int experts,
                                std::int64_t m, float* __restrict__ grad_w) {
  const std::int64_t pair = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pair >= m) return;
  const int pos = pair_positions[pair];
  float sum = 0.f;
  if (pos < offsets[experts])
    for (int i = 0; i < slots; ++i) sum += partial[static_cast<std::int64_t>(pos) * ldp + i];
  grad_w[pair] = sum;
}

template <class T>
void launch_gather_sum(const TensorView& rows, const Plan& plan, const float* w, const TensorView& out,
                       cudaStream_t s) {
  const std::int64_t tokens = plan.tokens, cols = out.shape[1];
  auto launch = [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    const std::int64_t threads = tokens * (cols / VEC);
    if (threads == 0) return;
    gather_sum_rows<T, VEC><<<static_cast<unsigned>(ceil_div<std::int64_t>(threads, kThreads)), kThreads, 0, s>>>(
        rows.ptr<T>(), plan.pair_positions.ptr<int>(), w, plan.offsets.ptr<int>(), plan.experts, tokens,
        plan.top_k, cols, out.ptr<T>());
    MOEFUSE_CUDA_LAUNCH_CHECK();
  };
  constexpr int kVec = Vec<T>::n;
  const bool vec_ok = cols % kVec == 0 && (reinterpret_cast<std::uintptr_t>(rows.data) & 15) == 0 &&
                      (reinterpret_cast<std::uintptr_t>(out.data) & 15) == 0;
  if (vec_ok)
    launch(std::integral_constant<int, kVec>{});
  else
    launch(std::integral_constant<int, 1>{});
}

template <class T>
void launch_zero_placeholders(const TensorView& out, const Plan& plan, cudaStream_t s) {
  const std::int64_t m = plan.tokens * plan.top_k, cols = out.shape[1];
  if (m * cols == 0) return;
  zero_placeholder_rows<T><<<256, kThreads, 0, s>>>(out.ptr<T>(), plan.offsets.ptr<int>(), plan.experts, m, cols);
  MOEFUSE_CUDA_LAUNCH_CHECK();
}

bool aligned(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15) == 0; }

// The tensor-core kernel loads 16-byte chunks along the inner dimension of every operand.
bool use_tensor_cores(const TensorView& x, const TensorView& weight, std::initializer_list<const void*> ptrs) {
  if (x.dtype == DType::f32) return false;
  if (weight.shape[1] % 8 != 0 || weight.shape[2] % 8 != 0) return false;
  for (const void* p : ptrs)
    if (p && !aligned(p)) return false;
  return true;
}

GemmParams plan_params(const Plan& plan, const TensorView& tiles) {
  GemmParams p;
  p.pairs = plan.sorted_pairs.ptr<int>();
  p.top_k = plan.top_k;
  p.offsets = plan.offsets.ptr<int>();
  p.tile_offsets = tiles.ptr<int>();
  p.experts = plan.experts;
  return p;
}

// Workspace layouts: the same function sizes (Carver without base) and lays out.
struct ForwardWorkspace {
  TensorView tiles;  // [E+1] i32
  TensorView rows;   // [M, out] with combine: the un-combined rows
};

ForwardWorkspace carve_forward(detail::Carver& c, const Plan& plan, const TensorView& weight, bool combine) {
  ForwardWorkspace w;
  w.tiles = c.take(DType::i32, {plan.experts + 1});
  if (combine) w.rows = c.take(weight.dtype, {plan.tokens * plan.top_k, weight.shape[1]});
  return w;
}

struct BackwardWorkspace {
  TensorView tiles;    // [E+1] i32
  TensorView dx_rows;  // [M, in] with gather: grad_x rows before the per-token sum
  TensorView partial;  // [M, slots] f32 with combine: row-dot partials
};

BackwardWorkspace carve_backward(detail::Carver& c, const Plan& plan, const TensorView& weight, bool gather,
                                 bool combine) {
  const std::int64_t m = plan.tokens * plan.top_k, in = weight.shape[2];
  BackwardWorkspace w;
  w.tiles = c.take(DType::i32, {plan.experts + 1});
  if (gather) w.dx_rows = c.take(weight.dtype, {m, in});
  if (combine) w.partial = c.take(DType::f32, {m, dot_partial_slots(in)});
  return w;
}

template <class T>
void forward_impl(const Plan& plan, const TensorView& x, const TensorView& weight, bool gather,
                  const TensorView& combine_weights, const TensorView& out, const TensorView& workspace,
                  cudaStream_t s) {
  const bool combine = combine_weights.defined();
  detail::Carver c(workspace);
  const ForwardWorkspace ws = carve_forward(c, plan, weight, combine);
  const std::int64_t m = plan.tokens * plan.top_k, n = weight.shape[1], k = weight.shape[2];
  const TensorView& rows = combine ? ws.rows : out;

  GemmParams p = plan_params(plan, ws.tiles);
  p.a = {x.data, k, 0, gather};
  p.b = {weight.data, k, n * k, false};
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.epi.out = rows.data;
  p.epi.ldo = n;
  run_grouped_gemm<T, GemmKind::fwd>(p, m, use_tensor_cores(x, weight, {x.data, weight.data, rows.data}), s);

  if (combine)
    launch_gather_sum<T>(rows, plan, combine_weights.ptr<float>(), out, s);
  else
    launch_zero_placeholders<T>(out, plan, s);
}

template <class T>
void backward_impl(const Plan& plan, const TensorView& x, const TensorView& weight, bool gather,
                   const TensorView& combine_weights, const TensorView& grad_out, const TensorView& grad_x,
                   const TensorView& grad_weight, const TensorView& grad_cw, const TensorView& workspace,
                   cudaStream_t s) {
  const bool combine = combine_weights.defined();
  detail::Carver c(workspace);
  const BackwardWorkspace ws = carve_backward(c, plan, weight, gather, combine);
  const std::int64_t m = plan.tokens * plan.top_k, out_f = weight.shape[1], in_f = weight.shape[2];
  const bool tensor_cores =
      use_tensor_cores(x, weight, {x.data, weight.data, grad_out.data, grad_x.data, grad_weight.data});

  // dgrad: rows of grad_out . W[e] (grad_out gathered per token when combined), feeding grad_x and grad_cw.
  if (grad_x.defined() || grad_cw.defined()) {
    GemmParams p = plan_params(plan, ws.tiles);
    p.a = {grad_out.data, out_f, 0, combine};
    p.b = {weight.data, in_f, out_f * in_f, false};
    p.n = static_cast<int>(in_f);
    p.k = static_cast<int>(out_f);
    if (grad_x.defined()) {
      p.epi.out = gather ? ws.dx_rows.data : grad_x.data;
      p.epi.ldo = in_f;
      if (combine) p.epi.row_scale = combine_weights.ptr<float>();
    }
    if (grad_cw.defined()) {
      p.epi.dot_x = x.data;
      p.epi.ldx = in_f;
      p.epi.dot_gather = gather;
      p.epi.partial = ws.partial.ptr<float>();
      p.epi.ldp = dot_partial_slots(in_f);
    }
    run_grouped_gemm<T, GemmKind::dgrad>(p, m, tensor_cores, s);

    if (grad_x.defined()) {
      if (gather)
        launch_gather_sum<T>(ws.dx_rows, plan, nullptr, grad_x, s);
      else
        launch_zero_placeholders<T>(grad_x, plan, s);
    }
    if (grad_cw.defined() && m > 0) {
      const int slots = tensor_cores ? dot_partial_slots(in_f) : static_cast<int>(ceil_div<std::int64_t>(in_f, simt::BN));
      reduce_row_dots<<<static_cast<unsigned>(ceil_div<std::int64_t>(m, kThreads)), kThreads, 0, s>>>(
          ws.partial.ptr<float>(), dot_partial_slots(in_f), slots, plan.pair_positions.ptr<int>(),
          plan.offsets.ptr<int>(), plan.experts, m, grad_cw.ptr<float>());
      MOEFUSE_CUDA_LAUNCH_CHECK();
    }
  }

  // wgrad: dW[e] = sum over e's rows of (w * grad_out row)^T . x row.
  if (grad_weight.defined()) {
    GemmParams p = plan_params(plan, ws.tiles);
    p.a = {grad_out.data, out_f, 0, combine};
    p.b = {x.data, in_f, 0, gather};
    if (combine) p.k_scale = combine_weights.ptr<float>();
    p.m = static_cast<int>(out_f);
    p.n = static_cast<int>(in_f);
    p.epi.out = grad_weight.data;
    p.epi.ldo = in_f;
    p.epi.expert_stride = out_f * in_f;
    run_grouped_gemm<T, GemmKind::wgrad>(p, m, tensor_cores, s);
  }
}

}  // namespace

std::size_t moe_linear_workspace_bytes(const Plan& plan, const TensorView&, const TensorView& weight, bool,
                                       const TensorView& combine_weights) {
  detail::Carver c(plan.counts.device);
  carve_forward(c, plan, weight, combine_weights.defined());
  return c.bytes();
}

void moe_linear_forward(const Plan& plan, const TensorView& x, const TensorView& weight, bool gather,
                        const TensorView& combine_weights, const TensorView& out, const TensorView& workspace,
                        void* stream) {
  DeviceGuard guard(plan.counts.device);
  dispatch_float(weight.dtype, [&](auto tag) {
    forward_impl<decltype(tag)>(plan, x, weight, gather, combine_weights, out, workspace, as_stream(stream));
  });
}

std::size_t moe_linear_backward_workspace_bytes(const Plan& plan, const TensorView&, const TensorView& weight,
                                                bool gather, const TensorView& combine_weights) {
  detail::Carver c(plan.counts.device);
  carve_backward(c, plan, weight, gather, combine_weights.defined());
  return c.bytes();
}

void moe_linear_backward(const Plan& plan, const TensorView& x, const TensorView& weight, bool gather,
                         const TensorView& combine_weights, const TensorView& grad_out, const TensorView& grad_x,
                         const TensorView& grad_weight, const TensorView& grad_combine_weights,
                         const TensorView& workspace, void* stream) {
  DeviceGuard guard(plan.counts.device);
  dispatch_float(weight.dtype, [&](auto tag) {
    backward_impl<decltype(tag)>(plan, x, weight, gather, combine_weights, grad_out, grad_x, grad_weight,
                                 grad_combine_weights, workspace, as_stream(stream));
  });
}

}  // namespace moefuse::cuda
