// LoRA inside the fused Hopper forms of linear.cu, whose gather kernel forms the adapter's rank-side rows low in its
// own k-loop and takes the K = r product as one more k-block [low | F[e]] after W's (s = the adapter's scale, w =
// routing weights). What stays here is the workspace those forms share with the portable path, and the adapter's
// gradients.
//
// moe_lora_{,backward_}workspace_bytes' layout (LoraRows): the tile schedule (E+1 ints), the low-rank rows [M, r], and
// the rows [M, n] for a result in token order (forward with combine, backward with gather; else undefined).
//   lora_forward_workspace (the forwards):  the schedule and the rows; the kernel keeps u in lora.u when given, and
//     no one reads it otherwise (low is the portable path's room for it)
//   lora_backward_workspace (moe_linear_backward without combine, i.e. the up projection):  low = gb =
//     s * grad_out . B[e], which the kernel writes for lora_backward_grads;
//   lora_backward_grads (after the dgrad):  grad B[e] = grad_out^T . u (u formed here when lora.u is not given),
//     grad A[e] = gb^T . x[src(s)]
//
// On the down projection inside swiglu_linear_backward, every operand in sorted order but g = grad_out (token order
// when gather_g): rows = the dgrad rows [M, in] before the row pass, and wa = w * a [M, in], which the row pass leaves
// in rows. lora_sorted_workspace_bytes sizes the workspace of the calls below:
//   lora_sorted_rows:  where the dgrad kernel leaves gb = s * g . B[e], and where the row pass may leave
//     uw = w * lora.u
//   lora_sorted_grads (after the row pass):  grad B[e] = g^T . uw, uw = s * wa . A[e]^T, that is w * lora.u when
//     the forward left u there (formed here unless uw_formed: the row pass left it);  grad A[e] = gb^T . wa, unless
//     the row pass summed it (lora_swiglu_rows, below)
// The row pass then gives the adapter's share of grad_h and of the combine-weight gradient (<rows, a>) with the
// base's.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "moefuse/ops.h"

namespace moefuse::cuda {

struct LoraRows {
  TensorView tiles, low, rows;
};
LoraRows lora_forward_workspace(const Plan& plan, const Lora& lora, bool gather, bool combine,
                                const TensorView& workspace);
LoraRows lora_backward_workspace(const Plan& plan, const Lora& lora, bool gather, const TensorView& workspace);
void lora_backward_grads(const Plan& plan, const TensorView& x, const Lora& lora, bool gather,
                         const TensorView& grad_out, const LoraGrads& grad_lora, const TensorView& workspace,
                         cudaStream_t stream);

std::size_t lora_sorted_workspace_bytes(const Plan& plan, const Lora& lora);
struct LoraSortedRows {
  TensorView gb, uw;
};
LoraSortedRows lora_sorted_rows(const Plan& plan, const Lora& lora, const TensorView& workspace);
void lora_sorted_grads(const Plan& plan, const Lora& lora, const TensorView& g, bool gather_g, const TensorView& wa,
                       const TensorView& combine_weights, const LoraGrads& grad_lora, const TensorView& workspace,
                       bool uw_formed, cudaStream_t stream);

// The row pass itself with grad A[e] = gb^T . (w * a) summed in it (lora_rows.cu), so that the down adapter's grad A
// needs no w * a rows: grad_h = dswiglu(h, w * rows) where given, the row dots' partials [M, slices] for
// reduce_row_dots where `dots` is defined. With up_u [M, r'] (the up projection adapter's u, r' a multiple of 8 up to
// 64) also grad_up_b[e] = grad_h^T . up_u, [E, 2I, r']. down_uw (lora_sorted_rows.uw) is given when the down adapter's
// grad B is asked for, whose operand is w * u: with down_u (that adapter's u, as lora.u) the pass writes those rows
// there; without, it writes w * a over rows, from which lora_sorted_grads forms them. sorted_w [M] is scratch.
// Placeholder rows are left alone. Returns whether down_uw holds w * u (lora_sorted_grads' uw_formed).
int lora_swiglu_rows_slices(std::int64_t inter);
bool lora_swiglu_rows(const Plan& plan, const TensorView& rows, const TensorView& h, const float* combine_weights,
                      const TensorView& gb, const TensorView& grad_a, const TensorView& up_u,
                      const TensorView& grad_up_b, const TensorView& grad_h, const TensorView& dots,
                      const TensorView& sorted_w, const TensorView& down_u, const TensorView& down_uw,
                      cudaStream_t s);

}  // namespace moefuse::cuda
