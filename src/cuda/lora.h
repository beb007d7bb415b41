// LoRA inside the fused Hopper forms of linear.cu.
//
// lora_project_rows (moe_linear_swiglu_forward): u [M, r] = alpha * x[src(s)] . A[e]^T, the adapter's first GEMM; the
// Hopper gather GEMM takes [u | B[e]] as one more k-block. tiles: E+1 ints of workspace.
//
// On the down projection inside swiglu_linear_backward, every operand in sorted order: g = the gathered grad_out rows
// [M, out], rows = the dgrad rows [M, in] before the row pass, and wa = w * a [M, in], which the row pass leaves in
// rows. With s the adapter's scale:
//   lora_sorted_dgrad (before the row pass):  gb = s * g . B[e];  rows += gb . A[e]
//   lora_sorted_grads (after it):             grad B[e] = g^T . (s * wa . A[e]^T);  grad A[e] = gb^T . wa
// The row pass then gives the adapter's share of grad_h and of the combine-weight gradient (<rows, a>) with the
// base's. Both calls take the same workspace (lora_sorted_workspace_bytes), which carries gb from one to the other.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "moefuse/ops.h"

namespace moefuse::cuda {

void lora_project_rows(const Plan& plan, const TensorView& x, const Lora& lora, bool gather, float alpha,
                       const TensorView& u, const TensorView& tiles, cudaStream_t stream);

std::size_t lora_sorted_workspace_bytes(const Plan& plan, const Lora& lora);
void lora_sorted_dgrad(const Plan& plan, const Lora& lora, const TensorView& g, const TensorView& rows,
                       const TensorView& workspace, cudaStream_t stream);
void lora_sorted_grads(const Plan& plan, const Lora& lora, const TensorView& g, const TensorView& wa,
                       const LoraGrads& grad_lora, const TensorView& workspace, cudaStream_t stream);

}  // namespace moefuse::cuda
