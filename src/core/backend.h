// The interface every backend implements, once per namespace (moefuse::cpu, moefuse::cuda).
// src/core has already checked shapes, dtypes, devices, contiguity and workspace size before any of these runs,
// so backends only compute. Semantics are those of include/moefuse/ops.h, plus the few internal extras below.
#pragma once

#include <cstddef>

#include "moefuse/ops.h"
#include "moefuse/tensor.h"

namespace moefuse {
// The up projection's adapter, handed to the down projection's backward when the experts run both: u = s * x . A[e]^T
// as its forward left it, and where its grad B goes. A fused form that can sums grad B = grad_h^T . u in the pass
// that writes grad_h, and says so in `done`; else the up projection's own backward forms it.
struct UpLoraGrad {
  TensorView u, grad_b;
  bool done = false;
};
}  // namespace moefuse

#define MOEFUSE_BACKEND_DECLARATIONS                                                                                \
  void router_forward(const TensorView& logits, int top_k, bool renormalize, const TensorView& topk_ids,          \
                      const TensorView& topk_weights, void* stream);                                               \
  /* extra_grad_logits (optional, dtype of grad_logits) is added to the result. */                                 \
  void router_backward(const TensorView& logits, const TensorView& topk_ids, bool renormalize,                     \
                       const TensorView& grad_topk_weights, const TensorView& extra_grad_logits,                   \
                       const TensorView& grad_logits, void* stream);                                               \
                                                                                                                    \
  std::size_t routing_plan_workspace_bytes(const Plan& plan);                                                      \
  void routing_plan(const TensorView& topk_ids, const Plan& plan, const TensorView& workspace, void* stream);      \
  /* Number of negative ids the plan saw (synchronises). */                                                         \
  int plan_invalid_count(const Plan& plan, void* stream);                                                          \
                                                                                                                    \
  std::size_t moe_linear_workspace_bytes(const Plan& plan, const TensorView& x, const TensorView& weight,           \
                                         bool gather, const TensorView& combine_weights);                          \
  void moe_linear_forward(const Plan& plan, const TensorView& x, const TensorView& weight, bool gather,             \
                          const TensorView& combine_weights, const TensorView& out, const TensorView& workspace,   \
                          void* stream);                                                                            \
  std::size_t moe_linear_backward_workspace_bytes(const Plan& plan, const TensorView& x, const TensorView& weight,  \
                                                  bool gather, const TensorView& combine_weights);                 \
  void moe_linear_backward(const Plan& plan, const TensorView& x, const TensorView& weight, bool gather,            \
                           const TensorView& combine_weights, const TensorView& grad_out, const TensorView& grad_x, \
                           const TensorView& grad_weight, const TensorView& grad_combine_weights,                  \
                           const TensorView& workspace, void* stream);                                             \
                                                                                                                    \
  /* LoRA: the low-rank part of moe_linear with an adapter. out (and in backward grad_x, grad_combine_weights)      \
     already hold the base result; these add the adapter's part to them and write grad_lora. */                    \
  std::size_t moe_lora_workspace_bytes(const Plan& plan, const TensorView& x, const Lora& lora, bool gather,        \
                                       const TensorView& combine_weights);                                         \
  void moe_lora_forward_add(const Plan& plan, const TensorView& x, const Lora& lora, bool gather,                  \
                            const TensorView& combine_weights, const TensorView& out, const TensorView& workspace, \
                            void* stream);                                                                          \
  /* moe_linear_forward with an adapter in one fused form, when this backend has one for these arguments and the   \
     workspace (sized by moe_linear_workspace_bytes with lora) holds it; false: nothing was done and the core runs  \
     moe_linear_forward, then moe_lora_forward_add. */                                                              \
  bool moe_linear_forward_fused(const Plan& plan, const TensorView& x, const TensorView& weight, const Lora& lora,  \
                                bool gather, const TensorView& combine_weights, const TensorView& out,             \
                                const TensorView& workspace, void* stream);                                         \
  std::size_t moe_lora_backward_workspace_bytes(const Plan& plan, const TensorView& x, const Lora& lora,           \
                                                bool gather, const TensorView& combine_weights);                   \
  /* moe_linear_backward with an adapter in one fused form, as moe_linear_forward_fused. */                        \
  bool moe_linear_backward_fused(const Plan& plan, const TensorView& x, const TensorView& weight, const Lora& lora, \
                                 bool gather, const TensorView& combine_weights, const TensorView& grad_out,       \
                                 const TensorView& grad_x, const LoraGrads& grad_lora,                              \
                                 const TensorView& grad_combine_weights, const TensorView& workspace,              \
                                 void* stream);                                                                     \
  void moe_lora_backward_add(const Plan& plan, const TensorView& x, const Lora& lora, bool gather,                 \
                             const TensorView& combine_weights, const TensorView& grad_out,                        \
                             const TensorView& grad_x, const LoraGrads& grad_lora,                                  \
                             const TensorView& grad_combine_weights, const TensorView& workspace, void* stream);   \
                                                                                                                    \
  void swiglu_forward(const TensorView& h, const TensorView& a, void* stream);                                     \
  void moe_linear_swiglu_forward(const Plan& plan, const TensorView& x, const TensorView& weight,                  \
                                 const Lora& lora, const TensorView& h, const TensorView& a,                        \
                                 const TensorView& workspace, void* stream);                                        \
  /* swiglu_linear_backward in one fused form, when this backend has one for these arguments and the workspace      \
     (sized for the composed form) holds it; false: nothing was done and the core runs the composed form. up: see   \
     UpLoraGrad (null: none). */                                                                                    \
  bool swiglu_linear_backward_fused(const Plan& plan, const TensorView& h, const TensorView& weight,                \
                                    const Lora& lora, const TensorView& combine_weights,                           \
                                    const TensorView& grad_out, const TensorView& grad_h,                          \
                                    const TensorView& grad_weight, const LoraGrads& grad_lora,                     \
                                    const TensorView& grad_combine_weights, const TensorView& workspace,           \
                                    UpLoraGrad* up, void* stream);                                                  \
  void swiglu_backward(const TensorView& h, const TensorView& grad_a, const TensorView& grad_h, void* stream);      \
                                                                                                                    \
  /* 4-bit weights (core/nf4.h). counts (optional, [E] i32): experts without rows are skipped, their slice of     \
     weight left as it was (the block's GEMMs never read it). */                                                    \
  void nf4_quantize(const TensorView& weight, const TensorView& packed, void* stream);                             \
  void nf4_dequantize(const TensorView& packed, const TensorView& counts, const TensorView& weight, void* stream);  \
                                                                                                                    \
  /* dst = src, cast to dst's dtype: same 3-D shape, any strides (core/block.cpp stages adapters with it). */     \
  void copy_strided(const TensorView& src, const TensorView& dst, void* stream);                                   \
                                                                                                                    \
  /* Dense linear (the router projection): y[T, N] = x[T, K] . w[N, K]^T, all one dtype. */                        \
  void dense_linear_forward(const TensorView& x, const TensorView& w, const TensorView& y, void* stream);          \
  /* grad_x[T, K] = dy . w (added to grad_x when accumulate_grad_x); grad_w[N, K] = dy^T . x. Either may be        \
     absent. All one dtype. */                                                                                     \
  void dense_linear_backward(const TensorView& x, const TensorView& w, const TensorView& dy,                       \
                             const TensorView& grad_x, bool accumulate_grad_x, const TensorView& grad_w,            \
                             void* stream);

namespace moefuse {
namespace cpu {
MOEFUSE_BACKEND_DECLARATIONS
}  // namespace cpu
namespace cuda {
MOEFUSE_BACKEND_DECLARATIONS
}  // namespace cuda
}  // namespace moefuse

namespace moefuse::detail {
// swiglu_linear_backward with an adapter (ops.cpp), also offering the fused form the up projection's adapter.
void swiglu_linear_backward(const Plan& plan, const TensorView& h, const TensorView& weight, const Lora& lora,
                            const TensorView& combine_weights, const TensorView& grad_out, const TensorView& grad_h,
                            const LoraGrads& grad_lora, const TensorView& grad_combine_weights,
                            const TensorView& workspace, UpLoraGrad& up, void* stream);
}  // namespace moefuse::detail
