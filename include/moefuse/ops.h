// The moefuse ops. Every op has one meaning on every backend; the CPU backend is the reference.
//
// Conventions (all ops):
// - Tensors are contiguous and live on one device; `stream` is a cudaStream_t for CUDA tensors (nullptr = default
//   stream) and is ignored on the CPU.
// - Float data is f32, bf16 or f16 storage; arithmetic accumulates in f32. Index tensors are i32.
// - Outputs are overwritten entirely (never accumulated into). Optional arguments are views with ndim == -1.
// - Ops never allocate device memory: scratch comes from `workspace`, a u8 tensor of at least the bytes the matching
//   *_workspace_bytes query returns (queries read shapes, dtypes and devices only; data pointers may be null).
// - Nothing synchronises the host with the device: per-expert sizes stay on the device.
// - Bad arguments throw moefuse::Error naming the argument.
//
// Sizes: T tokens, k = top_k experts per token, E experts, M = T*k routed pairs.
// Pair p = t*k + j is token t's j-th choice.
#pragma once

#include <cstddef>
#include <cstdint>

#include "moefuse/tensor.h"

namespace moefuse {

// ---------------------------------------------------------------------------------------------------------------------
// Router: softmax over experts in f32, top-k (ties go to the lower expert id, choices sorted by descending weight),
// optional renormalisation so each token's k weights sum to 1.
//   logits       [T, E]  f32 | bf16 | f16
//   topk_ids     [T, k]  i32   (out)
//   topk_weights [T, k]  f32   (out)
void router_forward(TensorView logits, int top_k, bool renormalize, TensorView topk_ids, TensorView topk_weights,
                    void* stream = nullptr);

// Gradient of topk_weights with respect to logits (the ids are piecewise constant).
//   grad_topk_weights [T, k] f32;  grad_logits [T, E] f32 | bf16 | f16 (out)
void router_backward(TensorView logits, TensorView topk_ids, bool renormalize, TensorView grad_topk_weights,
                     TensorView grad_logits, void* stream = nullptr);

// ---------------------------------------------------------------------------------------------------------------------
// Routing plan: the M pairs sorted by expert, stable (pair order kept within an expert).
// Ids >= E are expert-parallel placeholders: they contribute nothing and sort after every real expert, so sorted
// positions [offsets[E], M) hold them. Negative ids are an error: the CPU backend throws; the CUDA backend cannot
// raise without a host sync, so it treats them as placeholders and writes their number to `invalid`
// (check_plan() reads it and throws). The ops index rows through a plan: on the CPU they refuse one that routing_plan
// could not have made (offsets out of order, sorted_pairs and pair_positions not inverse permutations); the CUDA
// backend cannot check without a host sync and trusts it.
struct Plan {
  std::int64_t tokens = 0;
  int top_k = 0;
  int experts = 0;
  TensorView counts;          // [E]   i32: pairs routed to each expert
  TensorView offsets;         // [E+1] i32: expert e owns sorted rows [offsets[e], offsets[e+1])
  TensorView sorted_pairs;    // [M]   i32: the pair at each sorted position
  TensorView pair_positions;  // [M]   i32: the sorted position of each pair (inverse of sorted_pairs)
  TensorView invalid;         // [1]   i32: number of negative ids seen
};

std::size_t routing_plan_workspace_bytes(const Plan& plan, TensorView topk_ids);
void routing_plan(TensorView topk_ids, const Plan& plan, TensorView workspace, void* stream = nullptr);
// Throws if the plan saw negative expert ids. Synchronises with the device: call it in tests or debug mode only.
void check_plan(const Plan& plan, void* stream = nullptr);

// ---------------------------------------------------------------------------------------------------------------------
// moe_fused_linear: out[s, o] = sum_i weight[e(s), o, i] * x[src(s), i] for each sorted row s routed to expert e(s).
//   weight [E, out, in], out and in at least 1
//   gather == false: x is [M, in] already in sorted order, src(s) = s.
//   gather == true:  x is [T, in] in token order, src(s) = sorted_pairs[s] / k (fused into the loads on CUDA).
//   combine_weights absent: out is [M, out] in sorted order; rows of placeholder pairs are zero.
//   combine_weights [T, k] f32: out is [T, out] in token order,
//       out[t] = sum_j combine_weights[t, j] * row(t, j) over the routed pairs of t (a per-token sum: deterministic).
std::size_t moe_linear_workspace_bytes(const Plan& plan, TensorView x, TensorView weight, bool gather,
                                       TensorView combine_weights);
void moe_linear_forward(const Plan& plan, TensorView x, TensorView weight, bool gather, TensorView combine_weights,
                        TensorView out, TensorView workspace, void* stream = nullptr);

// Backward of moe_linear_forward with the same arguments; each gradient left absent is not computed.
//   grad_x: like x (with gather, a deterministic per-token sum over the token's pairs)
//   grad_weight [E, out, in]: experts that got no rows get zeros
//   grad_combine_weights [T, k] f32 (only with combine_weights): <grad_out[t], row(t, j)>, zero for placeholders;
//       computed as rowdot(grad_out[t] . W[e], x[src]) so the un-combined rows need not be kept.
std::size_t moe_linear_backward_workspace_bytes(const Plan& plan, TensorView x, TensorView weight, bool gather,
                                                TensorView combine_weights);
void moe_linear_backward(const Plan& plan, TensorView x, TensorView weight, bool gather, TensorView combine_weights,
                         TensorView grad_out, TensorView grad_x, TensorView grad_weight,
                         TensorView grad_combine_weights, TensorView workspace, void* stream = nullptr);

// ---------------------------------------------------------------------------------------------------------------------
// Stacked LoRA on an expert projection (frozen base weight): row(s) += scale * (x[src(s)] . a[e]^T) . b[e]^T.
// W + b.a is never formed: the low-rank product rides along the grouped GEMM.
//   a [E, r, in]; b [E, out, r]; same dtype as the weight; scale = lora_alpha / r (or alpha / sqrt(r) for rsLoRA).
//   u (optional) [M, r], the dtype of a: the rows scale * x[src(s)] . a[e]^T in the plan's sorted order (M = tokens *
//   top_k). A forward given u writes it (placeholder rows zeroed); a backward given the same u reads it instead of
//   recomputing it from x, so that x . a^T is computed once per step.
//   staged_b (optional) [E, out, r], contiguous in the weight's dtype: for the experts ops (block.h), which stage a b
//   given strided or in another dtype, where the forward stages it; a backward given the same staged_b reads b there
//   instead of staging it again. Unused when b needs no staging, and by the linear ops (they take b contiguous).
struct Lora {
  TensorView a;
  TensorView b;
  float scale = 1.f;
  TensorView u{};
  TensorView staged_b{};
  bool defined() const { return a.defined() || b.defined(); }
};
struct LoraGrads {
  TensorView a;  // [E, r, in]: experts that got no rows get zeros
  TensorView b;  // [E, out, r]
};

// moe_linear_forward/backward with a LoRA adapter on the weight; the same semantics otherwise. The base weight is
// frozen (no grad_weight); the adapter's gradients are written to `grad_lora` (each absent one is skipped).
std::size_t moe_linear_workspace_bytes(const Plan& plan, TensorView x, TensorView weight, const Lora& lora,
                                       bool gather, TensorView combine_weights);
void moe_linear_forward(const Plan& plan, TensorView x, TensorView weight, const Lora& lora, bool gather,
                        TensorView combine_weights, TensorView out, TensorView workspace, void* stream = nullptr);
std::size_t moe_linear_backward_workspace_bytes(const Plan& plan, TensorView x, TensorView weight, const Lora& lora,
                                                bool gather, TensorView combine_weights);
void moe_linear_backward(const Plan& plan, TensorView x, TensorView weight, const Lora& lora, bool gather,
                         TensorView combine_weights, TensorView grad_out, TensorView grad_x,
                         const LoraGrads& grad_lora, TensorView grad_combine_weights, TensorView workspace,
                         void* stream = nullptr);

// ---------------------------------------------------------------------------------------------------------------------
// SwiGLU on the concatenated [gate | up] layout of Transformers v5: a = silu(h[:, :I]) * h[:, I:], in f32.
//   h [R, 2I]; a [R, I]; grad_a [R, I]; grad_h [R, 2I]
void swiglu_forward(TensorView h, TensorView a, void* stream = nullptr);
void swiglu_backward(TensorView h, TensorView grad_a, TensorView grad_h, void* stream = nullptr);

// The first projection of an expert MLP with its activation: h = moe_linear_forward(gather = true, no combine) with
// weight = [gate; up] [E, 2I, in], and a = swiglu(h). On Hopper one kernel writes both from its accumulators (the
// gather in its loads, SwiGLU in its epilogue); elsewhere the two ops run in turn.
//   h [M, 2I]; a [M, I]; workspace: moe_linear_workspace_bytes(plan, x, weight, true, {})
void moe_linear_swiglu_forward(const Plan& plan, TensorView x, TensorView weight, TensorView h, TensorView a,
                               TensorView workspace, void* stream = nullptr);
// The same with a LoRA adapter on the weight; workspace: moe_linear_workspace_bytes(plan, x, weight, lora, true, {}).
// On Hopper, u = scale * x . A[e]^T comes first and the kernel takes [u | B[e]] as one more k-block before SwiGLU.
void moe_linear_swiglu_forward(const Plan& plan, TensorView x, TensorView weight, const Lora& lora, TensorView h,
                               TensorView a, TensorView workspace, void* stream = nullptr);

// The last projection of an expert MLP, backward from h: the gradients of
//   out = moe_linear_forward(swiglu(h), weight, gather = false, combine_weights)
// with h [M, 2I], weight [E, out, I], combine_weights [T, k] f32, grad_out [T, out]. Each of grad_h [M, 2I],
// grad_weight and grad_combine_weights is computed if present. a = swiglu(h) is recomputed, never stored by the
// caller. On Hopper the dgrad GEMM is followed by one row pass that gives grad_h, the combine-weight gradient and the
// scaled rows of the weight gradient; elsewhere swiglu_forward, moe_linear_backward and swiglu_backward run in turn.
std::size_t swiglu_linear_backward_workspace_bytes(const Plan& plan, TensorView h, TensorView weight,
                                                   TensorView combine_weights);
void swiglu_linear_backward(const Plan& plan, TensorView h, TensorView weight, TensorView combine_weights,
                            TensorView grad_out, TensorView grad_h, TensorView grad_weight,
                            TensorView grad_combine_weights, TensorView workspace, void* stream = nullptr);
// The same with a LoRA adapter on the weight: the base weight is frozen, the adapter's gradients go to grad_lora
// (each absent one skipped). On Hopper the adapter's low-rank dgrad joins the dgrad rows before the row pass.
std::size_t swiglu_linear_backward_workspace_bytes(const Plan& plan, TensorView h, TensorView weight,
                                                   const Lora& lora, TensorView combine_weights);
void swiglu_linear_backward(const Plan& plan, TensorView h, TensorView weight, const Lora& lora,
                            TensorView combine_weights, TensorView grad_out, TensorView grad_h,
                            const LoraGrads& grad_lora, TensorView grad_combine_weights, TensorView workspace,
                            void* stream = nullptr);

// ---------------------------------------------------------------------------------------------------------------------
// 4-bit expert weights (NF4, the format of QLoRA): a frozen weight [E, out, in] kept in about a quarter of its bf16
// bytes. Each run of 64 inputs of a row keeps its absolute maximum m (f32) and, per element, the index of the nearest
// of 16 fixed levels in [-1, 1] to w / m; dequantized, an element is level * m. A row takes nf4_row_bytes(in) bytes:
// ceil(in / 2) bytes of indices (element 2i in the high nibble of byte i), then ceil(in / 64) f32 maxima, each part
// zero-padded to a multiple of 16 bytes. A run holding an Inf or NaN dequantizes to non-finite values.
// Every op above that takes an expert `weight` (and the experts ops, block.h) takes it in this form too: u8
// [E, out, nf4_row_bytes(in)], 16-byte aligned, `in` being x's width (h's half width in swiglu_linear_backward), and
// computes what it computes on the dequantized weight in x's dtype, to the bit: it dequantizes the weight (experts
// that got no rows skipped) into its workspace, whose query counts that room, then runs as on a float weight. Such a
// weight is frozen: no grad_weight. The bytes do not record `in`, and widths that round to the same row bytes (65 to
// 96, say) cannot be told apart: x must have the width the weight was quantized at (Python's Nf4Weight checks it).
std::int64_t nf4_row_bytes(std::int64_t in);
//   weight [E, out, in] f32 | bf16 | f16;  packed [E, out, nf4_row_bytes(in)] u8 (out)
void nf4_quantize(TensorView weight, TensorView packed, void* stream = nullptr);
//   packed as nf4_quantize writes it;  weight [E, out, in] f32 | bf16 | f16 (out), each element rounded once
void nf4_dequantize(TensorView packed, TensorView weight, void* stream = nullptr);

}  // namespace moefuse
