// moe_linear forward and backward: grouped GEMMs over the plan's sorted rows plus the deterministic per-token
// gather-sums (combine in forward, grad_x with gather in backward) and row-dot reductions.
// On Hopper (sizes multiples of 8) our TMA + cp.async + wgmma kernel with the gather in its loads (gather_gemm_sm90.cu,
// bf16/f16) runs the forward with gather, every form with a LoRA adapter (its K = r product as one more k-block) and
// the down projection's dgrad without a weight gradient. The other GEMMs are CUTLASS's TMA + wgmma kernels
// (grouped_gemm_sm90.h, bf16), which take dense operands: their gathered operands are first copied into sorted
// order in workspace, and the dgrad row scale and row dots run as a row kernel after the GEMM. Elsewhere the
// portable kernel fuses both.
#include <algorithm>
#include <functional>
#include <mutex>
#include <string>

#include "core/backend.h"
#include "core/workspace.h"
#include "cuda/common.cuh"
#include "cuda/grouped_gemm.cuh"
#include "cuda/grouped_gemm_sm90.h"
#include "cuda/lora.h"
#include "cuda/rows.cuh"
#include "moefuse/tune.h"

namespace moefuse::cuda {
namespace {

constexpr int kThreads = 256;  // reduce_row_dots

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

// After the Hopper dgrad (rows = grad_out . W[e], not yet scaled): grad_cw[pair] = <rows[pos], x[row(pos)]>, zero for
// placeholders, and rows[pos] *= w[pair] when scale_rows. A warp per pair; cols a multiple of 8.
template <class T>
__global__ void dgrad_row_dots(T* __restrict__ rows, std::int64_t cols, const T* __restrict__ x, bool x_by_token,
                               const int* __restrict__ pair_positions, const int* __restrict__ offsets, int experts,
                               std::int64_t m, int top_k, const float* __restrict__ w, bool scale_rows,
                               float* __restrict__ grad_cw) {
  constexpr int VEC = Vec<T>::n;
  const std::int64_t pair = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (pair >= m) return;
  const std::int64_t pos = pair_positions[pair];
  if (pos >= offsets[experts]) {
    if (grad_cw && lane == 0) grad_cw[pair] = 0.f;
    return;
  }
  T* row = rows + pos * cols;
  const T* xr = x + (x_by_token ? pair / top_k : pos) * cols;
  const float scale = w[pair];
  float dot = 0.f, v[VEC], xv[VEC];
  for (std::int64_t c = lane * VEC; c < cols; c += 32 * VEC) {
    load_vec<T, VEC>(row + c, v);
    if (grad_cw) {
      load_vec<T, VEC>(xr + c, xv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) dot += v[i] * xv[i];
    }
    if (scale_rows) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[i] *= scale;
      store_vec<T, VEC>(row + c, v);
    }
  }
  if (!grad_cw) return;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
  if (lane == 0) grad_cw[pair] = dot;
}

// swiglu_linear_backward's row pass after the Hopper dgrad (rows = gathered grad_out . W[e], not yet scaled), a warp
// per pair with w its combine weight and a = swiglu(h) rounded as the forward stores it:
//   grad_cw[pair] = <rows[pos], a>;  grad_h[pos] = dswiglu(h[pos], w * rows[pos]);  rows[pos] = w * a (scale_a)
// Placeholder pairs get grad_cw = 0 and zero grad_h rows. inter (I) a multiple of 8.
template <class T>
__global__ void swiglu_dgrad_rows(T* __restrict__ rows, const T* __restrict__ h, std::int64_t inter,
                                  const int* __restrict__ pair_positions, const int* __restrict__ offsets,
                                  int experts, std::int64_t m, const float* __restrict__ w,
                                  T* __restrict__ grad_h, float* __restrict__ grad_cw, bool scale_a) {
  constexpr int VEC = Vec<T>::n;
  const std::int64_t pair = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (pair >= m) return;
  const std::int64_t pos = pair_positions[pair];
  if (pos >= offsets[experts]) {
    if (grad_cw && lane == 0) grad_cw[pair] = 0.f;
    if (grad_h) {
      const float zero[VEC] = {};
      for (std::int64_t c = lane * VEC; c < 2 * inter; c += 32 * VEC)
        store_vec<T, VEC>(grad_h + pos * 2 * inter + c, zero);
    }
    return;
  }
  T* row = rows + pos * inter;
  const T* hr = h + pos * 2 * inter;
  const float scale = w[pair];
  float dot = 0.f;
  for (std::int64_t c = lane * VEC; c < inter; c += 32 * VEC) {
    float v[VEC], g[VEC], u[VEC], a[VEC], dg[VEC], du[VEC];
    load_vec<T, VEC>(row + c, v);
    load_vec<T, VEC>(hr + c, g);
    load_vec<T, VEC>(hr + inter + c, u);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const DSwiglu d = dswiglu<T>(v[i], g[i], u[i], scale);
      dot += v[i] * d.a;
      dg[i] = d.dg;
      du[i] = d.du;
      a[i] = d.a * scale;
    }
    if (grad_h) {
      store_vec<T, VEC>(grad_h + pos * 2 * inter + c, dg);
      store_vec<T, VEC>(grad_h + pos * 2 * inter + inter + c, du);
    }
    if (scale_a) store_vec<T, VEC>(row + c, a);
  }
  if (!grad_cw) return;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
  if (lane == 0) grad_cw[pair] = dot;
}

bool use_tensor_cores(const TensorView& weight, std::initializer_list<const void*> ptrs) {
  return tensor_cores_ok(weight.dtype, weight.shape[1], weight.shape[2], ptrs);
}

// The Hopper path by shapes alone (what workspaces are sized for); at run time every pointer must be aligned too.
bool hopper_shapes(const TensorView& weight) {
  return sm90_enabled(weight.dtype, weight.device) && weight.shape[1] % 8 == 0 && weight.shape[2] % 8 == 0;
}

bool all_aligned(std::initializer_list<const void*> ptrs) {
  return std::all_of(ptrs.begin(), ptrs.end(), [](const void* p) { return !p || aligned16(p); });
}

bool use_hopper(const TensorView& weight, std::initializer_list<const void*> ptrs) {
  return hopper_shapes(weight) && all_aligned(ptrs);
}

// The Hopper forward with the gather in its loads; `out_cols` (the output row length) must be a multiple of 8.
bool use_hopper_gather(const TensorView& weight, std::int64_t out_cols, std::initializer_list<const void*> ptrs) {
  return sm90_gather_enabled(weight.dtype, weight.device) && weight.shape[2] % 8 == 0 && out_cols % 8 == 0 &&
         all_aligned(ptrs);
}

// LoRA's part of one gather GEMM (grouped_gemm_sm90.h): low = scale * x . P[e] in its k-loop, kept in `low` (the
// caller's u or gb, else workspace: the kernel's later n-tiles read low there), and the k-block low . F[e]. P and F
// are A and B forwards, B and A in a dgrad.
struct GatherLora {
  TensorView p, f, low;
  float scale = 1.f;
};

// A forward's: P = A, F = B, low kept in the caller's u when given, else in the workspace's rows.
GatherLora forward_gather_lora(const Lora& lora, const LoraRows& lw) {
  return {lora.a, lora.b, lora.u.defined() ? lora.u : lw.low, lora.scale};
}

// Runs it: out (plain) or h and act (SwiGLU, act set), x in token order (gather) or sorted, with a LoRA adapter when
// lora.p is defined; dgrad: out = x . W[e] (weight [E, k, n]). Placeholder rows are left unwritten.
template <class T>
void run_hopper_gather(const Plan& plan, const TensorView& x, bool gather, const TensorView& weight,
                       const TensorView& out, const TensorView& act, const TensorView& tiles, const GatherLora& lora,
                       cudaStream_t s, bool dgrad = false) {
  expert_tile_offsets<<<1, 1024, 0, s>>>(plan.offsets.ptr<int>(), plan.experts, kSm90GatherTileM, tiles.ptr<int>());
  MOEFUSE_CUDA_LAUNCH_CHECK();
  Sm90GatherGemm g;
  g.x = x.data;
  g.w = weight.data;
  g.out = out.data;
  g.act = act.data;
  g.pairs = gather ? plan.sorted_pairs.ptr<int>() : nullptr;
  g.offsets = plan.offsets.ptr<int>();
  g.tile_offsets = tiles.ptr<int>();
  g.top_k = plan.top_k;
  g.experts = plan.experts;
  g.rows = plan.tokens * plan.top_k;
  g.n = static_cast<int>(dgrad ? weight.shape[2] : act.defined() ? weight.shape[1] / 2 : weight.shape[1]);
  g.k = static_cast<int>(dgrad ? weight.shape[1] : weight.shape[2]);
  g.dgrad = dgrad;
  g.lora_p = lora.p.data;
  g.lora_f = lora.f.data;
  g.lora_low = lora.low.data;
  g.rank = lora.p.defined() ? static_cast<int>(lora.p.shape[dgrad ? 2 : 1]) : 0;
  g.lora_scale = lora.scale;
  run_gather_gemm_sm90(g, weight.dtype, s);
}

// ---- autotuning (moefuse/tune.h) --------------------------------------------------------------------------------
std::string gpu_name(int index) {
  static std::mutex mutex;
  static std::string names[64];
  std::lock_guard<std::mutex> lock(mutex);
  std::string& name = names[index % 64];
  if (name.empty()) {
    cudaDeviceProp prop{};
    MOEFUSE_CUDA_CHECK(cudaGetDeviceProperties(&prop, index));
    name = prop.name;
  }
  return name;
}

// Timing must not enter a CUDA graph being captured (nor wait on one).
bool may_time(cudaStream_t s) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(s, &status) != cudaSuccess) {
    cudaGetLastError();  // the legacy stream while another captures: treat as capturing
    return false;
  }
  return status == cudaStreamCaptureStatusNone;
}

// Microseconds of `run` on s: one warm-up, then the mean of three.
double time_us(cudaStream_t s, const std::function<void()>& run) {
  cudaEvent_t start, stop;
  MOEFUSE_CUDA_CHECK(cudaEventCreate(&start));
  MOEFUSE_CUDA_CHECK(cudaEventCreate(&stop));
  run();
  MOEFUSE_CUDA_CHECK(cudaEventRecord(start, s));
  for (int i = 0; i < 3; ++i) run();
  MOEFUSE_CUDA_CHECK(cudaEventRecord(stop, s));
  MOEFUSE_CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0.f;
  MOEFUSE_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return 1000.0 * ms / 3;
}

// A Hopper GEMM over rows already in sorted order runs on CUTLASS's grouped kernel (run(false), the default) or on
// the gather kernel (run(true)). CUTLASS is faster with many rows per expert, the gather kernel with few (RESULTS,
// 2026-11-29 fourteenth), so the first call of each shape times both, each writing the same output, and the
// choice is kept. Returns whether the gather kernel runs.
bool gather_kernel_wins(const char* gemm, const Plan& plan, const TensorView& weight, cudaStream_t s,
                        const std::function<void(bool)>& run) {
  const std::int64_t m = plan.tokens * plan.top_k;
  if (!autotune_enabled() || m == 0) return false;
  std::int64_t rows = 1;  // per expert, rounded up to a power of two
  while (rows < ceil_div<std::int64_t>(m, plan.experts)) rows *= 2;
  const std::string key = gpu_name(weight.device.index) + " sm90-" + gemm + " " + dtype_name(weight.dtype) +
                          " E=" + std::to_string(plan.experts) + " weight=" + std::to_string(weight.shape[1]) + "x" +
                          std::to_string(weight.shape[2]) + " rows=" + std::to_string(rows);
  return tune_cache().pick(key, 2, 0, may_time(s),
                           [&](int i) { return time_us(s, [&] { run(i == 1); }); }) == 1;
}

// Workspace layouts: the same function sizes (Carver without base) and lays out.
struct ForwardWorkspace {
  TensorView tiles;     // [E+1] i32
  TensorView rows;      // [M, out] with combine: the un-combined rows
  TensorView sm90;      // Hopper without gather: the grouped GEMM's arguments
};

ForwardWorkspace carve_forward(detail::Carver& c, const Plan& plan, const TensorView& weight, bool gather,
                               bool combine) {
  const std::int64_t m = plan.tokens * plan.top_k;
  ForwardWorkspace w;
  w.tiles = c.take(DType::i32, {plan.experts + 1});
  if (combine) w.rows = c.take(weight.dtype, {m, weight.shape[1]});
  if (hopper_shapes(weight) && !gather)
    w.sm90 = c.take_bytes(sm90_workspace_bytes(GemmKind::fwd, plan.experts, weight.device));
  return w;
}

struct BackwardWorkspace {
  TensorView tiles;     // [E+1] i32
  TensorView dx_rows;   // [M, in] with gather: grad_x rows before the per-token sum. Hopper with combine: also the
                        // dgrad rows when grad_x is absent; with gather, then the gathered x rows of wgrad
  TensorView partial;   // [M, slots] f32 with combine: row-dot partials
  TensorView gathered;  // [M, out] Hopper with combine: grad_out rows in sorted order (then scaled, for wgrad)
  TensorView sm90;      // Hopper: the grouped GEMMs' arguments (dgrad, then wgrad)
};

BackwardWorkspace carve_backward(detail::Carver& c, const Plan& plan, const TensorView& weight, bool gather,
                                 bool combine) {
  const std::int64_t m = plan.tokens * plan.top_k, out = weight.shape[1], in = weight.shape[2];
  const bool hopper = hopper_shapes(weight);
  BackwardWorkspace w;
  w.tiles = c.take(DType::i32, {plan.experts + 1});
  if (gather || (hopper && combine)) w.dx_rows = c.take(weight.dtype, {m, in});
  if (combine) w.partial = c.take(DType::f32, {m, dot_partial_slots(in)});
  if (hopper) {
    if (combine) w.gathered = c.take(weight.dtype, {m, out});
    w.sm90 = c.take_bytes(std::max(sm90_workspace_bytes(GemmKind::dgrad, plan.experts, weight.device),
                                   sm90_workspace_bytes(GemmKind::wgrad, plan.experts, weight.device)));
  }
  return w;
}

template <class T>
void forward_impl(const Plan& plan, const TensorView& x, const TensorView& weight, bool gather,
                  const TensorView& combine_weights, const TensorView& out, const TensorView& workspace,
                  cudaStream_t s) {
  const bool combine = combine_weights.defined();
  detail::Carver c(workspace);
  const ForwardWorkspace ws = carve_forward(c, plan, weight, gather, combine);
  const std::int64_t m = plan.tokens * plan.top_k, n = weight.shape[1], k = weight.shape[2];
  const TensorView& rows = combine ? ws.rows : out;

  if (gather && use_hopper_gather(weight, n, {x.data, weight.data, rows.data})) {
    run_hopper_gather<T>(plan, x, true, weight, rows, TensorView{}, ws.tiles, GatherLora{}, s);
  } else if (!gather && use_hopper(weight, {x.data, weight.data, rows.data, workspace.data})) {
    const auto run = [&](bool gather_kernel) {
      if (gather_kernel)
        return run_hopper_gather<T>(plan, x, false, weight, rows, TensorView{}, ws.tiles, GatherLora{}, s);
      const Sm90Gemm g{GemmKind::fwd, x.data, weight.data, rows.data, plan.offsets.ptr<int>(), plan.experts, 0,
                       static_cast<int>(n), static_cast<int>(k)};
      run_grouped_gemm_sm90(g, weight.device, ws.sm90.data, s);
    };
    run(use_hopper_gather(weight, n, {}) && gather_kernel_wins("fwd", plan, weight, s, run));
  } else {
    GemmParams p = plan_params(plan, ws.tiles);
    p.a = {x.data, k, 0, gather};
    p.b = {weight.data, k, n * k, false};
    p.n = static_cast<int>(n);
    p.k = static_cast<int>(k);
    p.epi.out = rows.data;
    p.epi.ldo = n;
    run_grouped_gemm<T, GemmKind::fwd>(p, m, use_tensor_cores(weight, {x.data, weight.data, rows.data}), s);
  }

  if (combine)
    launch_gather_sum<T>(rows, plan, combine_weights.ptr<float>(), 1.f, false, out, s);
  else
    launch_zero_placeholders<T>(out, plan, s);
}

// The Hopper backward: the same results as backward_impl's portable path, from dense operands.
template <class T>
void backward_hopper(const Plan& plan, const TensorView& x, const TensorView& weight, bool gather,
                     const TensorView& combine_weights, const TensorView& grad_out, const TensorView& grad_x,
                     const TensorView& grad_weight, const TensorView& grad_cw, const BackwardWorkspace& ws,
                     cudaStream_t s) {
  const bool combine = combine_weights.defined();
  const std::int64_t m = plan.tokens * plan.top_k, out_f = weight.shape[1], in_f = weight.shape[2];
  const int* offsets = plan.offsets.ptr<int>();

  // dgrad: rows of grad_out . W[e] (grad_out gathered per token when combined).
  if (grad_x.defined() || grad_cw.defined()) {
    if (combine) launch_gather_sorted<T>(grad_out, plan, nullptr, ws.gathered, s);
    const TensorView& rows = grad_x.defined() && !gather ? grad_x : ws.dx_rows;
    const auto run = [&](bool gather_kernel) {
      if (gather_kernel)
        return run_hopper_gather<T>(plan, grad_out, false, weight, rows, TensorView{}, ws.tiles, GatherLora{}, s,
                                    true);
      const Sm90Gemm g{GemmKind::dgrad, combine ? ws.gathered.data : grad_out.data, weight.data, rows.data, offsets,
                       plan.experts, 0, static_cast<int>(in_f), static_cast<int>(out_f)};
      run_grouped_gemm_sm90(g, weight.device, ws.sm90.data, s);
    };
    // With combine CUTLASS reads grad_out gathered into sorted order first: not timed against the gather kernel.
    run(!combine && use_hopper_gather(weight, in_f, {}) && gather_kernel_wins("dgrad", plan, weight, s, run));
    if (combine && m > 0) {
      constexpr int kWarpsPerBlock = kThreads / 32;
      dgrad_row_dots<T><<<static_cast<unsigned>(ceil_div<std::int64_t>(m, kWarpsPerBlock)), kThreads, 0, s>>>(
          rows.ptr<T>(), in_f, x.ptr<T>(), gather, plan.pair_positions.ptr<int>(), offsets, plan.experts, m,
          plan.top_k, combine_weights.ptr<float>(), grad_x.defined(),
          grad_cw.defined() ? grad_cw.ptr<float>() : nullptr);
      MOEFUSE_CUDA_LAUNCH_CHECK();
    }
    if (grad_x.defined()) {
      if (gather)
        launch_gather_sum<T>(ws.dx_rows, plan, nullptr, 1.f, false, grad_x, s);
      else
        launch_zero_placeholders<T>(grad_x, plan, s);
    }
  }

  // wgrad: dW[e] = sum over e's rows of (w * grad_out row)^T . x row; dx_rows is free again for the gathered x.
  if (grad_weight.defined()) {
    if (combine) launch_gather_sorted<T>(grad_out, plan, combine_weights.ptr<float>(), ws.gathered, s);
    if (gather) launch_gather_sorted<T>(x, plan, nullptr, ws.dx_rows, s);
    const Sm90Gemm g{GemmKind::wgrad, combine ? ws.gathered.data : grad_out.data, gather ? ws.dx_rows.data : x.data,
                     grad_weight.data, offsets, plan.experts, static_cast<int>(out_f), static_cast<int>(in_f), 0};
    run_grouped_gemm_sm90(g, weight.device, ws.sm90.data, s);
  }
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
  if (use_hopper(weight, {x.data, weight.data, grad_out.data, grad_x.data, grad_weight.data, workspace.data}))
    return backward_hopper<T>(plan, x, weight, gather, combine_weights, grad_out, grad_x, grad_weight, grad_cw, ws, s);
  const bool tensor_cores =
      use_tensor_cores(weight, {x.data, weight.data, grad_out.data, grad_x.data, grad_weight.data});

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
        launch_gather_sum<T>(ws.dx_rows, plan, nullptr, 1.f, false, grad_x, s);
      else
        launch_zero_placeholders<T>(grad_x, plan, s);
    }
    if (grad_cw.defined() && m > 0) {
      const int slots =
          tensor_cores ? dot_partial_slots(in_f) : static_cast<int>(ceil_div<std::int64_t>(in_f, simt::BN));
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

std::size_t moe_linear_workspace_bytes(const Plan& plan, const TensorView&, const TensorView& weight, bool gather,
                                       const TensorView& combine_weights) {
  detail::Carver c(plan.counts.device);
  carve_forward(c, plan, weight, gather, combine_weights.defined());
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

// The adapter's k-block fits the Hopper gather kernel for ranks that are multiples of 8 up to 64.
bool lora_k_block(const Lora& lora) {
  const std::int64_t r = lora.a.shape[1];
  return r % 8 == 0 && r <= 64;
}

// With an adapter the Hopper gather kernel serves the rows in sorted order too (the down projection): u = s * x .
// A[e]^T beside W's k-blocks (kept in lora.u for the backward when given), then [u | B[e]] into the same rows, so the
// low-rank part costs neither a pass over x nor an expansion into [M, out] rows nor a second per-token sum. The
// workspace is moe_lora_workspace_bytes' layout, which the core's check covers.
bool moe_linear_forward_fused(const Plan& plan, const TensorView& x, const TensorView& weight, const Lora& lora,
                              bool gather, const TensorView& combine_weights, const TensorView& out,
                              const TensorView& workspace, void* stream) {
  const bool combine = combine_weights.defined();
  if (!lora_k_block(lora) ||
      !use_hopper_gather(weight, weight.shape[1], {x.data, weight.data, out.data, lora.a.data, lora.b.data,
                                                   lora.u.data, workspace.data}))
    return false;
  DeviceGuard guard(plan.counts.device);
  const cudaStream_t s = as_stream(stream);
  const LoraRows lw = lora_forward_workspace(plan, lora, gather, combine, workspace);
  dispatch_float(weight.dtype, [&](auto tag) {
    using T = decltype(tag);
    const TensorView& rows = combine ? lw.rows : out;
    run_hopper_gather<T>(plan, x, gather, weight, rows, TensorView{}, lw.tiles, forward_gather_lora(lora, lw), s);
    if (lora.u.defined()) launch_zero_placeholders<T>(lora.u, plan, s);
    if (combine)
      launch_gather_sum<T>(rows, plan, combine_weights.ptr<float>(), 1.f, false, out, s);
    else
      launch_zero_placeholders<T>(out, plan, s);
  });
  return true;
}

// With an adapter of rank a multiple of 8 up to 64, the Hopper kernel forms u = s * x . A[e]^T beside W's k-blocks
// (kept in lora.u when given) and takes [u | B[e]] as one more k-block.
void moe_linear_swiglu_forward(const Plan& plan, const TensorView& x, const TensorView& weight, const Lora& lora,
                               const TensorView& h, const TensorView& a, const TensorView& workspace, void* stream) {
  const std::int64_t r = lora.defined() ? lora.a.shape[1] : 0;
  if ((r && !lora_k_block(lora)) ||
      !use_hopper_gather(weight, a.shape[1],
                         {x.data, weight.data, h.data, a.data, lora.a.data, lora.b.data, lora.u.data,
                          r ? workspace.data : nullptr})) {
    cuda::moe_linear_forward(plan, x, weight, true, TensorView{}, h, workspace, stream);
    if (lora.defined()) cuda::moe_lora_forward_add(plan, x, lora, true, TensorView{}, h, workspace, stream);
    return cuda::swiglu_forward(h, a, stream);
  }
  DeviceGuard guard(plan.counts.device);
  const cudaStream_t s = as_stream(stream);
  detail::Carver c(workspace);
  const LoraRows lw = r ? lora_forward_workspace(plan, lora, true, false, workspace)
                        : LoraRows{carve_forward(c, plan, weight, true, false).tiles, {}, {}};
  dispatch_float(weight.dtype, [&](auto tag) {
    using T = decltype(tag);
    run_hopper_gather<T>(plan, x, true, weight, h, a, lw.tiles, forward_gather_lora(lora, lw), s);
    if (lora.u.defined()) launch_zero_placeholders<T>(lora.u, plan, s);
    launch_zero_placeholders<T>(h, plan, s);
    launch_zero_placeholders<T>(a, plan, s);
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

// The up projection's backward with an adapter (no combine) on Hopper: one dgrad GEMM forms gb = s * grad_out . B[e]
// beside W's k-blocks and adds [gb | A[e]] into the grad_x rows, so the K = r products need neither a pass over
// grad_out, an expansion into [M, in] rows nor a second per-token sum; then the adapter's gradients (lora.h).
// Workspace: moe_lora_backward_workspace_bytes' layout.
bool moe_linear_backward_fused(const Plan& plan, const TensorView& x, const TensorView& weight, const Lora& lora,
                               bool gather, const TensorView& combine_weights, const TensorView& grad_out,
                               const TensorView& grad_x, const LoraGrads& grad_lora,
                               const TensorView& grad_combine_weights, const TensorView& workspace, void* stream) {
  if (combine_weights.defined() || grad_combine_weights.defined() || !grad_x.defined() || !lora_k_block(lora) ||
      !use_hopper_gather(weight, weight.shape[1], {x.data, weight.data, grad_out.data, grad_x.data, lora.a.data,
                                                   lora.b.data, workspace.data}))
    return false;
  DeviceGuard guard(plan.counts.device);
  const cudaStream_t s = as_stream(stream);
  const LoraRows lw = lora_backward_workspace(plan, lora, gather, workspace);
  dispatch_float(weight.dtype, [&](auto tag) {
    using T = decltype(tag);
    const TensorView& rows = gather ? lw.rows : grad_x;
    run_hopper_gather<T>(plan, grad_out, false, weight, rows, TensorView{}, lw.tiles,
                         {lora.b, lora.a, lw.low, lora.scale}, s, true);
    if (gather)
      launch_gather_sum<T>(rows, plan, nullptr, 1.f, false, grad_x, s);
    else
      launch_zero_placeholders<T>(grad_x, plan, s);
  });
  lora_backward_grads(plan, x, lora, gather, grad_out, grad_lora, workspace, s);
  return true;
}

// The Hopper form: gather grad_out once, dgrad into rows [M, I], one row pass (swiglu_dgrad_rows), and the wgrad
// from the same gathered grad_out and the scaled a rows, so grad_out is gathered once and a never stored. Without a
// weight gradient (frozen, or with a LoRA adapter) the dgrad is the gather kernel instead, with grad_out gathered in
// its loads, an adapter's gb = s * grad_out . B[e] formed beside W's k-blocks and [gb | A[e]] as one more k-block
// (lora.h), so no copy of grad_out is made; the adapter's gradients come from the rows after the row pass.
bool swiglu_linear_backward_fused(const Plan& plan, const TensorView& h, const TensorView& weight, const Lora& lora,
                                  const TensorView& combine_weights, const TensorView& grad_out,
                                  const TensorView& grad_h, const TensorView& grad_weight, const LoraGrads& grad_lora,
                                  const TensorView& grad_combine_weights, const TensorView& workspace, UpLoraGrad* up,
                                  void* stream) {
  const std::int64_t m = plan.tokens * plan.top_k, out_f = weight.shape[1], in_f = weight.shape[2];
  if (!use_hopper(weight, {h.data, weight.data, grad_out.data, grad_h.data, grad_weight.data, workspace.data}))
    return false;
  if (lora.defined() && !lora_k_block(lora)) return false;
  // Without a weight gradient (frozen or adapted) the dgrad gathers grad_out in its loads: no copy of it is needed.
  const bool gather_dgrad = !grad_weight.defined() &&
                            use_hopper_gather(weight, out_f, {h.data, weight.data, grad_out.data, lora.a.data,
                                                              lora.b.data, workspace.data});
  if (lora.defined() && !gather_dgrad) return false;
  const bool lora_grads = grad_lora.a.defined() || grad_lora.b.defined();
  // The adapter's grad A inside the row pass (lora_rows.cu), and the up adapter's grad B when it is offered.
  const bool rows_grad_a = gather_dgrad && lora.defined() && grad_lora.a.defined() &&
                           grad_lora.a.dtype == weight.dtype && all_aligned({grad_lora.a.data});
  const bool rows_up = rows_grad_a && up && up->u.defined() && up->grad_b.defined() &&
                       up->u.dtype == weight.dtype && up->grad_b.dtype == weight.dtype &&
                       up->u.shape[1] % 8 == 0 && up->u.shape[1] <= 64 && all_aligned({up->u.data, up->grad_b.data});
  // The down adapter's grad B operand w * u, from the forward's u when it left one, in the row pass too.
  const bool rows_uw = rows_grad_a && grad_lora.b.defined();
  const int slices = lora_swiglu_rows_slices(in_f);
  detail::Carver c(workspace.device);
  const auto carve = [&](detail::Carver& cv) {
    struct {
      TensorView gathered, rows, sm90, lora, tiles, dots, sorted_w;  // tiles: the gather kernel's schedule
    } w{cv.take(weight.dtype, {m, out_f}), cv.take(weight.dtype, {m, in_f}),
        cv.take_bytes(std::max(sm90_workspace_bytes(GemmKind::dgrad, plan.experts, weight.device),
                               sm90_workspace_bytes(GemmKind::wgrad, plan.experts, weight.device))),
        cv.take_bytes(lora.defined() ? lora_sorted_workspace_bytes(plan, lora) : 0),
        cv.take(DType::i32, {plan.experts + 1}), cv.take(DType::f32, {rows_grad_a ? m : 0, slices}),
        cv.take(DType::f32, {rows_grad_a ? m : 0})};
    return w;
  };
  carve(c);
  if (c.bytes() > workspace.nbytes()) return false;
  detail::Carver cw(workspace);
  const auto ws = carve(cw);
  DeviceGuard guard(plan.counts.device);
  const cudaStream_t s = as_stream(stream);
  const int* offsets = plan.offsets.ptr<int>();
  const LoraSortedRows sorted = lora.defined() ? lora_sorted_rows(plan, lora, ws.lora) : LoraSortedRows{};
  dispatch_float(weight.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (gather_dgrad) {
      const GatherLora gl = lora.defined() ? GatherLora{lora.b, lora.a, sorted.gb, lora.scale} : GatherLora{};
      run_hopper_gather<T>(plan, grad_out, true, weight, ws.rows, TensorView{}, ws.tiles, gl, s, true);
    } else {
      launch_gather_sorted<T>(grad_out, plan, nullptr, ws.gathered, s);
      run_grouped_gemm_sm90({GemmKind::dgrad, ws.gathered.data, weight.data, ws.rows.data, offsets, plan.experts, 0,
                             static_cast<int>(in_f), static_cast<int>(out_f)},
                            weight.device, ws.sm90.data, s);
    }
    const float* cw = combine_weights.ptr<float>();
    bool uw_formed = false;  // the row pass left the down adapter's w * u in sorted.uw
    if (rows_grad_a) {  // also without rows: experts without rows get zero gradients
      uw_formed = lora_swiglu_rows(plan, ws.rows, h, cw, sorted.gb, grad_lora.a, rows_up ? up->u : TensorView{},
                                   rows_up ? up->grad_b : TensorView{}, grad_h,
                                   grad_combine_weights.defined() ? ws.dots : TensorView{}, ws.sorted_w, lora.u,
                                   rows_uw ? sorted.uw : TensorView{}, s);
      if (rows_up) up->done = true;
      if (grad_h.defined()) launch_zero_placeholders<T>(grad_h, plan, s);
      if (grad_combine_weights.defined() && m > 0) {
        reduce_row_dots<<<static_cast<unsigned>(ceil_div<std::int64_t>(m, kThreads)), kThreads, 0, s>>>(
            ws.dots.ptr<float>(), slices, slices, plan.pair_positions.ptr<int>(), offsets, plan.experts, m,
            grad_combine_weights.ptr<float>());
        MOEFUSE_CUDA_LAUNCH_CHECK();
      }
    } else if (m > 0) {
      constexpr int kWarpsPerBlock = kThreads / 32;
      swiglu_dgrad_rows<T><<<static_cast<unsigned>(ceil_div<std::int64_t>(m, kWarpsPerBlock)), kThreads, 0, s>>>(
          ws.rows.ptr<T>(), h.ptr<T>(), in_f, plan.pair_positions.ptr<int>(), offsets, plan.experts, m,
          cw, grad_h.defined() ? grad_h.ptr<T>() : nullptr,
          grad_combine_weights.defined() ? grad_combine_weights.ptr<float>() : nullptr,
          grad_weight.defined() || lora_grads);
      MOEFUSE_CUDA_LAUNCH_CHECK();
    }
    if (grad_weight.defined())  // never with an adapter (it freezes the weight), so grad_out was gathered above
      run_grouped_gemm_sm90({GemmKind::wgrad, ws.gathered.data, ws.rows.data, grad_weight.data, offsets, plan.experts,
                             static_cast<int>(out_f), static_cast<int>(in_f), 0},
                            weight.device, ws.sm90.data, s);
    const LoraGrads rest{rows_grad_a ? TensorView{} : grad_lora.a, grad_lora.b};
    if (lora_grads)
      lora_sorted_grads(plan, lora, grad_out, true, ws.rows, combine_weights, rest, ws.lora, uw_formed, s);
  });
  return true;
}

}  // namespace moefuse::cuda
