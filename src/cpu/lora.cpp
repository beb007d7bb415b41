// Stacked LoRA on the CPU (see grouped.h for how rows are staged and multiplied): u = scale * x . A[e]^T, then
// u . B[e]^T, added to the base op's result. W + B.A is never formed. u goes to lora.u when given, and the backward
// reads it from there.
#include <algorithm>

#include "core/backend.h"
#include "cpu/grouped.h"

namespace moefuse::cpu {
namespace {

// f32 scratch, laid out from shapes alone so that the size queries and the ops agree: x rows in sorted order
// [M, in] (backward: then the input-gradient rows); delta rows, or output-gradient rows, [M, out]; u = x.A^T [M, r];
// g.B [M, r] (backward only); one expert's A, B or their gradient in f32.
struct Scratch {
  float *x, *y, *u, *gb, *w;
};

Scratch carve(detail::Carver& c, const Plan& plan, const TensorView& x, const Lora& lora, bool backward) {
  const std::int64_t m = plan.tokens * plan.top_k, in = x.size(1), rank = lora.a.size(1), out = lora.b.size(1);
  Scratch s;
  s.x = take_f32(c, m, in);
  s.y = take_f32(c, m, out);
  s.u = take_f32(c, m, rank);
  s.gb = backward ? take_f32(c, m, rank) : nullptr;
  s.w = take_f32(c, rank, std::max(in, out));
  return s;
}

}  // namespace

std::size_t moe_lora_workspace_bytes(const Plan& plan, const TensorView& x, const Lora& lora, bool,
                                     const TensorView&) {
  detail::Carver c(Device::cpu());
  carve(c, plan, x, lora, false);
  return c.bytes();
}

void moe_lora_forward_add(const Plan& plan, const TensorView& x, const Lora& lora, bool gather,
                          const TensorView& combine_weights, const TensorView& out, const TensorView& workspace,
                          void*) {
  const Routing r(plan);
  detail::Carver c(workspace);
  const Scratch s = carve(c, plan, x, lora, false);
  stage_rows(s.x, x, x.size(1), r, gather);
  expert_matmul(r, s.x, lora.a, true, s.u, s.w);
  scale_rows(s.u, lora.a.size(1), r, TensorView{}, lora.scale);  // on [M, r], the narrowest place
  if (lora.u.defined()) write_rows(s.u, lora.a.size(1), r, TensorView{}, false, false, lora.u);
  expert_matmul(r, s.u, lora.b, true, s.y, s.w);
  write_rows(s.y, lora.b.size(1), r, combine_weights, combine_weights.defined(), true, out);
}

bool moe_linear_forward_fused(const Plan&, const TensorView&, const TensorView&, const Lora&, bool, const TensorView&,
                              const TensorView&, const TensorView&, void*) {
  return false;
}

bool moe_linear_backward_fused(const Plan&, const TensorView&, const TensorView&, const Lora&, bool, const TensorView&,
                               const TensorView&, const TensorView&, const LoraGrads&, const TensorView&,
                               const TensorView&, void*) {
  return false;
}

std::size_t moe_lora_backward_workspace_bytes(const Plan& plan, const TensorView& x, const Lora& lora, bool,
                                              const TensorView&) {
  detail::Carver c(Device::cpu());
  carve(c, plan, x, lora, true);
  return c.bytes();
}

// With g = the unweighted rows of grad_out (gathered per pair when combining), w = the row's combine weight (1 when
// absent), u = scale * x.A[e]^T (lora.u when given) and gB = g.B[e]: grad_combine_weights += rowdot(gB, u);
// du = scale * w * gB; grad_B[e] = g^T . (w * u); grad_A[e] = du^T . x; grad_x rows += du . A[e].
void moe_lora_backward_add(const Plan& plan, const TensorView& x, const Lora& lora, bool gather,
                           const TensorView& combine_weights, const TensorView& grad_out, const TensorView& grad_x,
                           const LoraGrads& grad_lora, const TensorView& grad_combine_weights,
                           const TensorView& workspace, void*) {
  const Routing r(plan);
  const std::int64_t in = x.size(1), rank = lora.a.size(1), out = lora.b.size(1);
  const TensorView& cw = combine_weights;
  detail::Carver c(workspace);
  const Scratch s = carve(c, plan, x, lora, true);

  stage_rows(s.x, x, in, r, gather);
  stage_rows(s.y, grad_out, out, r, cw.defined());
  if (lora.u.defined()) {
    stage_rows(s.u, lora.u, rank, r, false);
  } else {
    expert_matmul(r, s.x, lora.a, true, s.u, s.w);
    scale_rows(s.u, rank, r, TensorView{}, lora.scale);
  }
  expert_matmul(r, s.y, lora.b, false, s.gb, s.w);
  if (grad_combine_weights.defined()) pair_rowdot(s.gb, s.u, rank, r, 1.f, true, grad_combine_weights);
  if (cw.defined()) scale_rows(s.u, rank, r, cw, 1.f);
  scale_rows(s.gb, rank, r, cw, lora.scale);  // now du
  if (grad_lora.b.defined()) expert_grad(r, s.y, s.u, grad_lora.b, s.w);
  if (grad_lora.a.defined()) expert_grad(r, s.gb, s.x, grad_lora.a, s.w);
  if (grad_x.defined()) {
    expert_matmul(r, s.gb, lora.a, false, s.x, s.w);  // x's rows are no longer needed
    write_rows(s.x, in, r, TensorView{}, gather, true, grad_x);
  }
}

}  // namespace moefuse::cpu
