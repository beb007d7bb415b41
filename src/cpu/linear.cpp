// moe_fused_linear on the CPU (see grouped.h for how rows are staged and multiplied).
#include "core/backend.h"
#include "cpu/grouped.h"

namespace moefuse::cpu {
namespace {

// f32 scratch, laid out from shapes alone so that the size queries and the ops agree: x rows in sorted order
// [M, in]; output rows, or output-gradient rows, [M, out]; input-gradient rows [M, in] (backward only); one expert's
// weight or weight gradient [out, in].
struct Scratch {
  float *x, *y, *dx, *w;
};

Scratch carve(detail::Carver& c, const Plan& plan, const TensorView& x, const TensorView& weight, bool backward) {
  const std::int64_t m = plan.tokens * plan.top_k, in = x.size(1), out = weight.size(1);
  Scratch s;
  s.x = take_f32(c, m, in);
  s.y = take_f32(c, m, out);
  s.dx = backward ? take_f32(c, m, in) : nullptr;
  s.w = take_f32(c, out, in);
  return s;
}

}  // namespace

std::size_t moe_linear_workspace_bytes(const Plan& plan, const TensorView& x, const TensorView& weight, bool,
                                       const TensorView&) {
  detail::Carver c(Device::cpu());
  carve(c, plan, x, weight, false);
  return c.bytes();
}

void moe_linear_forward(const Plan& plan, const TensorView& x, const TensorView& weight, bool gather,
                        const TensorView& combine_weights, const TensorView& out, const TensorView& workspace,
                        void*) {
  const Routing r(plan);
  detail::Carver c(workspace);
  const Scratch s = carve(c, plan, x, weight, false);
  stage_rows(s.x, x, x.size(1), r, gather);
  expert_matmul(r, s.x, weight, true, s.y, s.w);
  write_rows(s.y, weight.size(1), r, combine_weights, combine_weights.defined(), false, out);
}

std::size_t moe_linear_backward_workspace_bytes(const Plan& plan, const TensorView& x, const TensorView& weight, bool,
                                                const TensorView&) {
  detail::Carver c(Device::cpu());
  carve(c, plan, x, weight, true);
  return c.bytes();
}

// With g = the unweighted rows of grad_out (gathered per pair when combining) and dx = g . W[e]:
// grad_x rows are cw * dx, grad_combine_weights = rowdot(dx, x), grad_weight[e] = (cw * g)^T . x.
void moe_linear_backward(const Plan& plan, const TensorView& x, const TensorView& weight, bool gather,
                         const TensorView& combine_weights, const TensorView& grad_out, const TensorView& grad_x,
                         const TensorView& grad_weight, const TensorView& grad_combine_weights,
                         const TensorView& workspace, void*) {
  const Routing r(plan);
  const std::int64_t in = x.size(1), out = weight.size(1);
  const TensorView& cw = combine_weights;
  detail::Carver c(workspace);
  const Scratch s = carve(c, plan, x, weight, true);

  stage_rows(s.y, grad_out, out, r, cw.defined());
  if (grad_weight.defined() || grad_combine_weights.defined()) stage_rows(s.x, x, in, r, gather);
  if (grad_x.defined() || grad_combine_weights.defined()) expert_matmul(r, s.y, weight, false, s.dx, s.w);
  if (grad_combine_weights.defined()) pair_rowdot(s.dx, s.x, in, r, 1.0f, false, grad_combine_weights);
  if (grad_weight.defined()) {
    if (cw.defined()) scale_rows(s.y, out, r, cw, 1.0f);
    expert_grad(r, s.y, s.x, grad_weight, s.w);
  }
  if (grad_x.defined()) write_rows(s.dx, in, r, cw, gather, false, grad_x);
}

}  // namespace moefuse::cpu
