// The whole Qwen3-MoE sparse block (router + experts), in the Transformers v5 weight layout.
//
// Forward:  logits = x . router^T;  (ids, w) = router(logits);  h = gather(x) . gate_up[e]^T;  a = swiglu(h);
//           out[t] = sum_j w[t, j] * (a . down[e]^T)[pair(t, j)].
// Backward keeps x and h (in `saved`) and recomputes a; the routing-weight gradient is rowdot(gather(grad_out) .
// down[e], a), so the down-projection output is never kept.
#pragma once

#include <cstddef>
#include <cstdint>

#include "moefuse/ops.h"
#include "moefuse/tensor.h"

namespace moefuse {

struct MoeConfig {
  std::int64_t hidden = 0;        // H
  std::int64_t intermediate = 0;  // I (moe_intermediate_size)
  int experts = 0;                // E
  int top_k = 0;                  // k
  bool renormalize = true;        // norm_topk_prob
};

// All of one dtype (f32 | bf16 | f16) and one device, but for 4-bit expert weights: gate_up and down may each be
// given as nf4_quantize packs them (ops.h), frozen; the ops then dequantize it into their workspace (in x's dtype,
// the experts that got rows only) just before its projection runs, forward and backward. The adapters' a and b may have any strides and any float
// dtype (PEFT's layouts are strided views of its lora_A / lora_B weights, often f32 over bf16 weights): such ones
// are copied, cast to the weights' dtype, into the workspace first (a b into its staged_b when given, which the
// backward then reads as it is: ops.h). Their u must be contiguous, in the weights' dtype.
struct MoeWeights {
  TensorView router;   // [E, H]
  TensorView gate_up;  // [E, 2I, H]: gate rows then up rows (4-bit: u8 [E, 2I, nf4_row_bytes(H)])
  TensorView down;     // [E, H, I] (4-bit: u8 [E, H, nf4_row_bytes(I)])
  Lora gate_up_lora;   // optional stacked LoRA: a [E, r, H], b [E, 2I, r]
  Lora down_lora;      // optional stacked LoRA: a [E, r, I], b [E, H, r]
};

// Gradients to compute; each absent one is skipped. Leaving gate_up and down absent is the frozen-experts mode
// (LoRA fine-tuning): no expert weight gradient is formed.
struct MoeGrads {
  TensorView x;        // [T, H]
  TensorView router;   // [E, H]
  TensorView gate_up;  // [E, 2I, H] (not with gate_up_lora or a 4-bit gate_up: both freeze it)
  TensorView down;     // [E, H, I]  (not with down_lora or a 4-bit down)
  LoraGrads gate_up_lora;  // shaped like the adapter; any float dtype and non-overlapping strides (written through
  LoraGrads down_lora;     // the workspace, cast, when not contiguous in the weights' dtype)
};

// What forward leaves for backward, laid out inside the caller's `saved` buffer (u8, moe_saved_bytes long).
struct MoeSaved {
  TensorView topk_ids;      // [T, k] i32
  TensorView topk_weights;  // [T, k] f32
  Plan plan;
  TensorView h;  // [M, 2I] in the weights' dtype, sorted order
};

std::size_t moe_saved_bytes(const MoeConfig& cfg, std::int64_t tokens, DType dtype);
MoeSaved moe_saved_view(const MoeConfig& cfg, std::int64_t tokens, DType dtype, TensorView saved);

std::size_t moe_forward_workspace_bytes(const MoeConfig& cfg, TensorView x, const MoeWeights& w);
std::size_t moe_backward_workspace_bytes(const MoeConfig& cfg, TensorView x, const MoeWeights& w,
                                         const MoeGrads& grads);

//   x [T, H];  out [T, H];  router_logits [T, E] (dtype of x)
void moe_forward(const MoeConfig& cfg, TensorView x, const MoeWeights& w, TensorView out, TensorView router_logits,
                 TensorView saved, TensorView workspace, void* stream = nullptr);

// grad_router_logits (optional, [T, E]): gradient that reaches the logits from outside the block (the auxiliary
// load-balancing loss); it is added to the gradient that flows back through the routing weights.
void moe_backward(const MoeConfig& cfg, TensorView x, const MoeWeights& w, TensorView router_logits, TensorView saved,
                  TensorView grad_out, TensorView grad_router_logits, const MoeGrads& grads, TensorView workspace,
                  void* stream = nullptr);

// ---------------------------------------------------------------------------------------------------------------------
// The experts alone, with the routing decided elsewhere (Transformers' experts interface keeps its own router):
// out[t] = sum_j topk_weights[t, j] * down[e] . swiglu(gate_up[e] . x[t]), e = topk_ids[t, j]; ids >= E add nothing.
// w.router is not used. `saved` (u8, moe_experts_saved_bytes long) keeps the plan and h for backward.
//   topk_ids [T, k] i32;  topk_weights [T, k] f32;  out [T, H]
std::size_t moe_experts_saved_bytes(const MoeConfig& cfg, std::int64_t tokens, DType dtype);
std::size_t moe_experts_forward_workspace_bytes(const MoeConfig& cfg, TensorView x, const MoeWeights& w);
std::size_t moe_experts_backward_workspace_bytes(const MoeConfig& cfg, TensorView x, const MoeWeights& w);
void moe_experts_forward(const MoeConfig& cfg, TensorView x, TensorView topk_ids, TensorView topk_weights,
                         const MoeWeights& w, TensorView out, TensorView saved, TensorView workspace,
                         void* stream = nullptr);
// grads.router must be absent; grad_topk_weights [T, k] f32 is optional (absent: not computed).
void moe_experts_backward(const MoeConfig& cfg, TensorView x, TensorView topk_weights, const MoeWeights& w,
                          TensorView saved, TensorView grad_out, const MoeGrads& grads, TensorView grad_topk_weights,
                          TensorView workspace, void* stream = nullptr);

}  // namespace moefuse
