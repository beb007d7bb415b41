// Stacked LoRA on the CUDA backend: small grouped GEMMs over the plan's sorted rows, the rank being their narrow
// dimension (grouped_gemm.cuh: the tensor-core kernel gathers token rows in its loads and keeps each expert's factor
// tile in shared memory), and one row kernel. With s the adapter's scale and w the combine weights:
//   u = s * x . A[e]^T                   fwd GEMM, N = r (into lora.u when given; the backward then reads it)
//   forward   out += u . B[e]^T          fwd GEMM, K = r, accumulating epilogue
//   backward  gb = g . B[e]              dgrad GEMM, N = r
//             lora_rows                  grad_cw += <gb, u>; then uw = w * u, gb *= s * w
//             dB[e] = g^T . uw           wgrad GEMM (experts without rows get zeros)
//             dA[e] = gb^T . x           wgrad GEMM
//             grad_x += gb . A[e]        dgrad GEMM, K = r, accumulating epilogue
// A result in token order (forward with combine, grad_x with gather) is written as sorted rows into workspace first,
// then summed per token (rows.cuh), which keeps every sum in a fixed order. u and gb are stored in the weight dtype.
// On Hopper the base GEMM forms u or gb in its own k-loop and runs the K = r GEMM as one more k-block (linear.cu,
// lora.h); the wgrads stay here.
#include "core/backend.h"
#include "core/workspace.h"
#include "cuda/common.cuh"
#include "cuda/grouped_gemm.cuh"
#include "cuda/lora.h"
#include "cuda/rows.cuh"

namespace moefuse::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// One warp per sorted row s, with u = s * x . A[e]^T and gb = g . B[e]: gcw[pair] += <gb[s], u[s]>; then
// uw[s] = cw[pair] * u[s] and gb[s] *= scale * cw[pair], each where given (cw absent: weights of 1). uw may be u.
template <class T>
__global__ void lora_rows(const T* u, T* uw, T* __restrict__ gb, int rank, const int* __restrict__ offsets,
                          int experts, const int* __restrict__ sorted_pairs, const float* __restrict__ cw,
                          float* __restrict__ gcw, float scale) {
  const std::int64_t s = static_cast<std::int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (s >= offsets[experts]) return;
  const int lane = threadIdx.x & 31, pair = sorted_pairs[s];
  const T* us = u + s * rank;
  T* gs = gb ? gb + s * rank : nullptr;
  if (gcw) {
    float dot = 0.f;
    for (int j = lane; j < rank; j += 32) dot += to_f32(gs[j]) * to_f32(us[j]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    if (lane == 0) gcw[pair] += dot;
  }
  const float w = cw ? cw[pair] : 1.f;
  for (int j = lane; j < rank; j += 32) {
    if (uw) uw[s * rank + j] = from_f32<T>(to_f32(us[j]) * w);
    if (gs) gs[j] = from_f32<T>(to_f32(gs[j]) * scale * w);
  }
}

// Workspace: the fwd/dgrad tile schedule, u [M, r] and in backward gb [M, r], and for a token-order result its
// sorted rows [M, n].
struct Workspace {
  TensorView tiles, u, gb, rows;
};

Workspace carve(detail::Carver& c, const Plan& plan, const Lora& lora, bool gather, bool combine, bool backward) {
  const std::int64_t m = plan.tokens * plan.top_k, r = lora.a.shape[1];
  Workspace w;
  w.tiles = c.take(DType::i32, {plan.experts + 1});
  w.u = c.take(lora.a.dtype, {m, r});
  if (backward) w.gb = c.take(lora.a.dtype, {m, r});
  if (backward ? gather : combine)
    w.rows = c.take(lora.a.dtype, {m, backward ? lora.a.shape[2] : lora.b.shape[1]});
  return w;
}

// Every GEMM below takes the tensor-core kernel when all three sizes (r, in, out) and every pointer allow it.
bool use_tensor_cores(const Lora& lora, std::initializer_list<const void*> ptrs) {
  return tensor_cores_ok(lora.a.dtype, lora.a.shape[1], lora.a.shape[2], ptrs) && lora.b.shape[1] % 8 == 0;
}

unsigned blocks(std::int64_t n, std::int64_t per_block) {
  return static_cast<unsigned>(ceil_div<std::int64_t>(n, per_block));
}

// dst (+)= scale * low . F[e] with F = B [E, out, r] (fwd GEMM, K = r) or A [E, r, in] (dgrad GEMM, K = r); dst in
// token order goes through `rows` and the weighted per-token sum (weights cw, absent: 1).
template <class T>
void add_lowrank(const Plan& plan, const Workspace& ws, const TensorView& low, const TensorView& factor, bool is_b,
                 bool token_order, const float* cw, float scale, const TensorView& dst, bool tc, cudaStream_t s) {
  const std::int64_t m = plan.tokens * plan.top_k, r = low.shape[1];
  const std::int64_t n = is_b ? factor.shape[1] : factor.shape[2];
  const TensorView& out = token_order ? ws.rows : dst;
  GemmParams p = plan_params(plan, ws.tiles);
  p.a = {low.data, r, 0, false};
  p.b = {factor.data, is_b ? r : n, r * n, false};
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(r);
  p.epi.out = out.data;
  p.epi.ldo = n;
  p.epi.alpha = token_order ? 1.f : scale;
  p.epi.accumulate = !token_order;
  if (is_b)
    run_grouped_gemm<T, GemmKind::fwd>(p, m, tc, s);
  else
    run_grouped_gemm<T, GemmKind::dgrad>(p, m, tc, s);
  if (token_order) launch_gather_sum<T>(ws.rows, plan, cw, scale, true, dst, s);
}

// low [M, r] = alpha * rows(src) . F on the rank side: F = A[e]^T (fwd GEMM; A [E, r, in], src [., in]) or B[e]
// (dgrad GEMM; B [E, out, r], src [., out]); src rows gathered from token order when `gather`.
template <class T, GemmKind KIND>
void to_rank(const Plan& plan, const TensorView& tiles, const TensorView& src, bool gather, const TensorView& factor,
             float alpha, const TensorView& low, bool tc, cudaStream_t s) {
  const std::int64_t r = low.shape[1], k = src.shape[1];
  GemmParams p = plan_params(plan, tiles);
  p.a = {src.data, k, 0, gather};
  p.b = {factor.data, KIND == GemmKind::fwd ? k : r, r * k, false};
  p.n = static_cast<int>(r);
  p.k = static_cast<int>(k);
  p.epi.out = low.data;
  p.epi.ldo = r;
  p.epi.alpha = alpha;
  run_grouped_gemm<T, KIND>(p, plan.tokens * plan.top_k, tc, s);
}

// u = s * rows(x) . A[e]^T, into lora.u when given (the backward reads it there; placeholder rows zeroed, as on the
// CPU), else into the workspace.
template <class T>
TensorView project_u(const Plan& plan, const TensorView& tiles, const TensorView& x, bool gather, const Lora& lora,
                     const TensorView& ws_u, bool tc, cudaStream_t s) {
  const TensorView u = lora.u.defined() ? lora.u : ws_u;
  to_rank<T, GemmKind::fwd>(plan, tiles, x, gather, lora.a, lora.scale, u, tc, s);
  if (lora.u.defined()) launch_zero_placeholders<T>(u, plan, s);
  return u;
}

template <class T>
void launch_lora_rows(const Plan& plan, const TensorView& u, const TensorView& uw, const TensorView& gb,
                      const TensorView& cw, const TensorView& gcw, float scale, cudaStream_t s) {
  const std::int64_t m = plan.tokens * plan.top_k;
  if (m == 0) return;
  lora_rows<T><<<blocks(m, kWarps), kThreads, 0, s>>>(
      u.ptr<T>(), uw.defined() ? uw.ptr<T>() : nullptr, gb.defined() ? gb.ptr<T>() : nullptr,
      static_cast<int>(u.shape[1]), plan.offsets.ptr<int>(), plan.experts, plan.sorted_pairs.ptr<int>(),
      cw.defined() ? cw.ptr<float>() : nullptr, gcw.defined() ? gcw.ptr<float>() : nullptr, scale);
  MOEFUSE_CUDA_LAUNCH_CHECK();
}

// grad[e] [rows, cols] = sum over e's sorted rows of a_row^T . b_row (experts without rows get zeros); token-major
// when an operand is gathered (GemmParams::token_major).
template <class T>
void grad_factor(const Plan& plan, GemmOperand a, GemmOperand b, std::int64_t rows, std::int64_t cols,
                 const TensorView& grad, bool tc, cudaStream_t s) {
  GemmParams p = plan_params(plan, TensorView{});
  p.a = a;
  p.b = b;
  p.token_major = a.gather || b.gather;
  p.m = static_cast<int>(rows);
  p.n = static_cast<int>(cols);
  p.epi.out = grad.data;
  p.epi.ldo = cols;
  p.epi.expert_stride = rows * cols;
  run_grouped_gemm<T, GemmKind::wgrad>(p, plan.tokens * plan.top_k, tc, s);
}

template <class T>
void forward_impl(const Plan& plan, const TensorView& x, const Lora& lora, bool gather, const TensorView& cw,
                  const TensorView& out, const TensorView& workspace, cudaStream_t s) {
  detail::Carver c(workspace);
  const Workspace ws = carve(c, plan, lora, gather, cw.defined(), false);
  const bool tc = use_tensor_cores(lora, {x.data, lora.a.data, lora.b.data, out.data, lora.u.data});
  const TensorView u = project_u<T>(plan, ws.tiles, x, gather, lora, ws.u, tc, s);
  add_lowrank<T>(plan, ws, u, lora.b, true, cw.defined(), cw.defined() ? cw.ptr<float>() : nullptr, 1.f, out, tc, s);
}

// grad_B[e] = g^T . uw and grad_A[e] = gb^T . x, each where wanted; g and x gathered from token order where said.
template <class T>
void factor_grads(const Plan& plan, const Lora& lora, const TensorView& g, bool gather_g, const TensorView& uw,
                  const TensorView& gb, const TensorView& x, bool gather_x, const LoraGrads& grad_lora, bool tc,
                  cudaStream_t s) {
  const std::int64_t r = lora.a.shape[1], in = lora.a.shape[2], out = lora.b.shape[1];
  if (grad_lora.b.defined())
    grad_factor<T>(plan, {g.data, out, 0, gather_g}, {uw.data, r, 0, false}, out, r, grad_lora.b, tc, s);
  if (grad_lora.a.defined())
    grad_factor<T>(plan, {gb.data, r, 0, false}, {x.data, in, 0, gather_x}, r, in, grad_lora.a, tc, s);
}

// See the CPU backend for the algebra: u = s * x.A^T (lora.u when given), du = s * w * g.B, grad_B[e] = g^T . (w * u),
// grad_A[e] = du^T . x, grad_x rows += du . A[e], grad_cw += <g.B, u>. backward_factors does all but grad_x's part and
// leaves gb (= du after lora_rows) in the workspace.
template <class T>
void backward_factors(const Plan& plan, const Workspace& ws, const TensorView& x, const Lora& lora, bool gather,
                      const TensorView& cw, const TensorView& grad_out, const LoraGrads& grad_lora,
                      const TensorView& grad_cw, bool tc, cudaStream_t s) {
  const bool combine = cw.defined();
  const TensorView u = lora.u.defined() ? lora.u : project_u<T>(plan, ws.tiles, x, gather, lora, ws.u, tc, s);
  to_rank<T, GemmKind::dgrad>(plan, ws.tiles, grad_out, combine, lora.b, 1.f, ws.gb, tc, s);
  const TensorView uw = combine ? ws.u : u;  // lora.u is the forward's: weighted into the workspace, not in place
  launch_lora_rows<T>(plan, u, combine ? uw : TensorView{}, ws.gb, cw, grad_cw, lora.scale, s);
  factor_grads<T>(plan, lora, grad_out, combine, uw, ws.gb, x, gather, grad_lora, tc, s);
}

template <class T>
void backward_impl(const Plan& plan, const TensorView& x, const Lora& lora, bool gather, const TensorView& cw,
                   const TensorView& grad_out, const TensorView& grad_x, const LoraGrads& grad_lora,
                   const TensorView& grad_cw, const TensorView& workspace, cudaStream_t s) {
  detail::Carver c(workspace);
  const Workspace ws = carve(c, plan, lora, gather, cw.defined(), true);
  const bool tc = use_tensor_cores(lora, {x.data, lora.a.data, lora.b.data, lora.u.data, grad_out.data, grad_x.data,
                                          grad_lora.a.data, grad_lora.b.data});
  backward_factors<T>(plan, ws, x, lora, gather, cw, grad_out, grad_lora, grad_cw, tc, s);
  if (grad_x.defined()) add_lowrank<T>(plan, ws, ws.gb, lora.a, false, gather, nullptr, 1.f, grad_x, tc, s);
}

// LoRA inside swiglu_linear_backward's Hopper form (lora.h): every operand is in sorted order.
struct SortedWorkspace {
  TensorView tiles, gb, uw;
};

SortedWorkspace carve_sorted(detail::Carver& c, const Plan& plan, const Lora& lora) {
  const std::int64_t m = plan.tokens * plan.top_k, r = lora.a.shape[1];
  return {c.take(DType::i32, {plan.experts + 1}), c.take(lora.a.dtype, {m, r}), c.take(lora.a.dtype, {m, r})};
}

template <class T>
void sorted_grads_impl(const Plan& plan, const Lora& lora, const TensorView& g, bool gather_g, const TensorView& wa,
                       const TensorView& cw, const LoraGrads& grad_lora, const SortedWorkspace& ws, bool uw_formed,
                       cudaStream_t s) {
  const bool tc = use_tensor_cores(lora, {g.data, wa.data, lora.a.data, grad_lora.a.data, grad_lora.b.data});
  if (grad_lora.b.defined() && !uw_formed) {
    // uw = s * wa . A[e]^T: the forward's u weighted, or from wa
    if (lora.u.defined())
      launch_lora_rows<T>(plan, lora.u, ws.uw, TensorView{}, cw, TensorView{}, 1.f, s);
    else
      to_rank<T, GemmKind::fwd>(plan, ws.tiles, wa, false, lora.a, lora.scale, ws.uw, tc, s);
  }
  factor_grads<T>(plan, lora, g, gather_g, ws.uw, ws.gb, wa, false, grad_lora, tc, s);
}

}  // namespace

std::size_t moe_lora_workspace_bytes(const Plan& plan, const TensorView&, const Lora& lora, bool gather,
                                     const TensorView& combine_weights) {
  detail::Carver c(plan.counts.device);
  carve(c, plan, lora, gather, combine_weights.defined(), false);
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

std::size_t moe_lora_backward_workspace_bytes(const Plan& plan, const TensorView&, const Lora& lora, bool gather,
                                              const TensorView& combine_weights) {
  detail::Carver c(plan.counts.device);
  carve(c, plan, lora, gather, combine_weights.defined(), true);
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

LoraRows lora_forward_workspace(const Plan& plan, const Lora& lora, bool gather, bool combine,
                                const TensorView& workspace) {
  detail::Carver c(workspace);
  const Workspace ws = carve(c, plan, lora, gather, combine, false);
  return {ws.tiles, ws.u, ws.rows};
}

LoraRows lora_backward_workspace(const Plan& plan, const Lora& lora, bool gather, const TensorView& workspace) {
  detail::Carver c(workspace);
  const Workspace ws = carve(c, plan, lora, gather, false, true);
  return {ws.tiles, ws.gb, ws.rows};
}

void lora_backward_grads(const Plan& plan, const TensorView& x, const Lora& lora, bool gather,
                         const TensorView& grad_out, const LoraGrads& grad_lora, const TensorView& workspace,
                         cudaStream_t stream) {
  detail::Carver c(workspace);
  const Workspace ws = carve(c, plan, lora, gather, false, true);
  dispatch_float(lora.a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool tc = use_tensor_cores(
        lora, {x.data, lora.a.data, lora.b.data, lora.u.data, grad_out.data, grad_lora.a.data, grad_lora.b.data});
    const TensorView u = !grad_lora.b.defined() || lora.u.defined()
                             ? lora.u
                             : project_u<T>(plan, ws.tiles, x, gather, lora, ws.u, tc, stream);
    factor_grads<T>(plan, lora, grad_out, false, u, ws.gb, x, gather, grad_lora, tc, stream);
  });
}

std::size_t lora_sorted_workspace_bytes(const Plan& plan, const Lora& lora) {
  detail::Carver c(plan.counts.device);
  carve_sorted(c, plan, lora);
  return c.bytes();
}

LoraSortedRows lora_sorted_rows(const Plan& plan, const Lora& lora, const TensorView& workspace) {
  detail::Carver c(workspace);
  const SortedWorkspace ws = carve_sorted(c, plan, lora);
  return {ws.gb, ws.uw};
}

void lora_sorted_grads(const Plan& plan, const Lora& lora, const TensorView& g, bool gather_g, const TensorView& wa,
                       const TensorView& combine_weights, const LoraGrads& grad_lora, const TensorView& workspace,
                       bool uw_formed, cudaStream_t stream) {
  detail::Carver c(workspace);
  const SortedWorkspace ws = carve_sorted(c, plan, lora);
  dispatch_float(lora.a.dtype, [&](auto tag) {
    sorted_grads_impl<decltype(tag)>(plan, lora, g, gather_g, wa, combine_weights, grad_lora, ws, uw_formed, stream);
  });
}

}  // namespace moefuse::cuda
