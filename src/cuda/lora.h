// LoRA inside the fused Hopper forms of linear.cu, whose gather kernel takes the adapter's K = r product as one more
// k-block [low | F[e]] after W's (s = the adapter's scale, w = routing weights).
//
// Both below lay out moe_lora_{,backward_}workspace_bytes' workspace and return its pieces (LoraRows): the tile
// schedule (E+1 ints), the k-block's low-rank rows [M, r], and the rows [M, n] for a result in token order (forward
// with combine, backward with gather; else undefined).
//   lora_forward_rows (the forwards):  low = u = s * x[src(s)] . A[e]^T (in lora.u when given), the k-block [u | B[e]]
//   lora_backward_factors (moe_linear_backward without combine, i.e. the up projection): moe_lora_backward_add but
//     its grad_x part; low = gb = s * grad_out . B[e], the dgrad k-block [gb | A[e]]
//
// On the down projection inside swiglu_linear_backward, every operand in sorted order but g = grad_out (token order
// when gather_g): rows = the dgrad rows [M, in] before the row pass, and wa = w * a [M, in], which the row pass leaves
// in rows.
//   lora_sorted_project (before the dgrad):  gb = s * g . B[e], the dgrad k-block [gb | A[e]]
//   lora_sorted_grads (after the row pass):  grad B[e] = g^T . (s * wa . A[e]^T), that is w * lora.u when the
//     forward left u there;  grad A[e] = gb^T . wa
// The row pass then gives the adapter's share of grad_h and of the combine-weight gradient (<rows, a>) with the
// base's. Both calls take the same workspace (lora_sorted_workspace_bytes), which carries gb from one to the other.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "moefuse/ops.h"

namespace moefuse::cuda {

struct LoraRows {
  TensorView tiles, low, rows;
};
LoraRows lora_forward_rows(const Plan& plan, const TensorView& x, const Lora& lora, bool gather, bool combine,
                           const TensorView& workspace, cudaStream_t stream);
LoraRows lora_backward_factors(const Plan& plan, const TensorView& x, const Lora& lora, bool gather,
                               const TensorView& grad_out, const LoraGrads& grad_lora, const TensorView& workspace,
                               cudaStream_t stream);

std::size_t lora_sorted_workspace_bytes(const Plan& plan, const Lora& lora);
TensorView lora_sorted_project(const Plan& plan, const Lora& lora, const TensorView& g, bool gather_g,
                               const TensorView& workspace, cudaStream_t stream);
void lora_sorted_grads(const Plan& plan, const Lora& lora, const TensorView& g, bool gather_g, const TensorView& wa,
                       const TensorView& combine_weights, const LoraGrads& grad_lora, const TensorView& workspace,
                       cudaStream_t stream);

}  // namespace moefuse::cuda
