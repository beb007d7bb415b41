// The MoE block, composed from the ops (see include/moefuse/block.h for the data flow).
#include <algorithm>

#include "core/dispatch.h"
#include "core/workspace.h"
#include "moefuse/moefuse.h"

namespace moefuse {

using detail::Carver;
using detail::expect;
using detail::expect_same_device;
using detail::expect_same_dtype;
using detail::kFloatTypes;

namespace {

void check_config(const char* op, const MoeConfig& c) {
  MOEFUSE_CHECK(c.hidden >= 1 && c.intermediate >= 1, op, "hidden and intermediate must be >= 1, got ", c.hidden,
                " and ", c.intermediate);
  MOEFUSE_CHECK(c.experts >= 1, op, "experts must be >= 1, got ", c.experts);
  MOEFUSE_CHECK(c.top_k >= 1 && c.top_k <= c.experts, op, "top_k must be in [1, ", c.experts, "], got ", c.top_k);
}

// Checks x and the weights; returns T.
// `data` is false in workspace queries, which read shapes only.
std::int64_t check_block(const char* op, const MoeConfig& c, const TensorView& x, const MoeWeights& w,
                         bool data = true) {
  check_config(op, c);
  expect(op, "x", x, {-1, c.hidden}, kFloatTypes, data);
  expect(op, "router weight", w.router, {c.experts, c.hidden}, kFloatTypes, data);
  expect(op, "gate_up", w.gate_up, {c.experts, 2 * c.intermediate, c.hidden}, kFloatTypes, data);
  expect(op, "down", w.down, {c.experts, c.hidden, c.intermediate}, kFloatTypes, data);
  expect_same_dtype(op, "router weight", w.router, x.dtype);
  expect_same_dtype(op, "gate_up", w.gate_up, x.dtype);
  expect_same_dtype(op, "down", w.down, x.dtype);
  expect_same_device(op, "router weight", w.router, x.device);
  expect_same_device(op, "gate_up", w.gate_up, x.device);
  expect_same_device(op, "down", w.down, x.device);
  return x.shape[0];
}

// This shape, with the device and dtype of x; optional ones are checked only when present.
void expect_like_x(const char* op, const char* name, const TensorView& t, std::initializer_list<std::int64_t> shape,
                   const TensorView& x, bool required = false) {
  if (required || t.defined()) expect(op, name, t, shape, kFloatTypes);
  expect_same_dtype(op, name, t, x.dtype);
  expect_same_device(op, name, t, x.device);
}

MoeSaved layout_saved(const MoeConfig& c, std::int64_t tokens, DType dtype, Carver& cv) {
  const std::int64_t m = tokens * c.top_k;
  MoeSaved s;
  s.topk_ids = cv.take(DType::i32, {tokens, c.top_k});
  s.topk_weights = cv.take(DType::f32, {tokens, c.top_k});
  s.plan.tokens = tokens;
  s.plan.top_k = c.top_k;
  s.plan.experts = c.experts;
  s.plan.counts = cv.take(DType::i32, {c.experts});
  s.plan.offsets = cv.take(DType::i32, {c.experts + 1});
  s.plan.sorted_pairs = cv.take(DType::i32, {m});
  s.plan.pair_positions = cv.take(DType::i32, {m});
  s.plan.invalid = cv.take(DType::i32, {1});
  s.h = cv.take(dtype, {m, 2 * c.intermediate});
  return s;
}

// Scratch of the forward: a = swiglu(h), then one region the ops take turns using.
struct ForwardWork {
  TensorView a, scratch;
};

ForwardWork layout_forward(const MoeConfig& c, const TensorView& x, const MoeWeights& w, const MoeSaved& s,
                           Carver& cv) {
  const Device d = x.device;
  ForwardWork f;
  f.a = cv.take(x.dtype, {s.h.shape[0], c.intermediate});
  const std::size_t scratch =
      std::max({BACKEND("moe_forward", d, routing_plan_workspace_bytes, s.plan),
                moe_linear_workspace_bytes(s.plan, x, w.gate_up, w.gate_up_lora, true, TensorView{}),
                moe_linear_workspace_bytes(s.plan, f.a, w.down, w.down_lora, false, s.topk_weights)});
  f.scratch = cv.take_bytes(scratch);
  return f;
}

struct BackwardWork {
  TensorView a, grad_a, grad_h, grad_weights, grad_logits, scratch;
};

BackwardWork layout_backward(const MoeConfig& c, const TensorView& x, const MoeWeights& w, const MoeSaved& s,
                             Carver& cv) {
  const std::int64_t m = s.h.shape[0], t = x.shape[0];
  BackwardWork b;
  b.a = cv.take(x.dtype, {m, c.intermediate});
  b.grad_a = cv.take(x.dtype, {m, c.intermediate});
  b.grad_h = cv.take(x.dtype, {m, 2 * c.intermediate});
  b.grad_weights = cv.take(DType::f32, {t, c.top_k});
  b.grad_logits = cv.take(x.dtype, {t, c.experts});
  const std::size_t scratch =
      std::max(moe_linear_backward_workspace_bytes(s.plan, b.a, w.down, w.down_lora, false, s.topk_weights),
               moe_linear_backward_workspace_bytes(s.plan, x, w.gate_up, w.gate_up_lora, true, TensorView{}));
  b.scratch = cv.take_bytes(scratch);
  return b;
}

// One expert projection's backward: the base weight's gradient, or the adapter's when there is one (LoRA freezes
// the base weight).
void projection_backward(const Plan& plan, const TensorView& x, const TensorView& weight, const Lora& lora,
                         bool gather, const TensorView& combine_weights, const TensorView& grad_out,
                         const TensorView& grad_x, const TensorView& grad_weight, const LoraGrads& grad_lora,
                         const TensorView& grad_combine_weights, const TensorView& workspace, void* stream) {
  if (lora.defined())
    moe_linear_backward(plan, x, weight, lora, gather, combine_weights, grad_out, grad_x, grad_lora,
                        grad_combine_weights, workspace, stream);
  else
    moe_linear_backward(plan, x, weight, gather, combine_weights, grad_out, grad_x, grad_weight,
                        grad_combine_weights, workspace, stream);
}

// The saved state of `tokens` tokens laid out in `saved` (or only sized, when saved has no data).
MoeSaved saved_in(const char* op, const MoeConfig& c, std::int64_t tokens, DType dtype, const TensorView& saved) {
  Carver sizing(saved.device);
  layout_saved(c, tokens, dtype, sizing);
  expect(op, "saved", saved, {-1}, {DType::u8});
  detail::expect_buffer(op, "saved", saved, sizing.bytes(), saved.device);
  Carver cv(saved);
  return layout_saved(c, tokens, dtype, cv);
}

}  // namespace

std::size_t moe_saved_bytes(const MoeConfig& cfg, std::int64_t tokens, DType dtype) {
  check_config("moe_saved_bytes", cfg);
  Carver cv(Device::cpu());
  layout_saved(cfg, tokens, dtype, cv);
  return cv.bytes();
}

MoeSaved moe_saved_view(const MoeConfig& cfg, std::int64_t tokens, DType dtype, TensorView saved) {
  check_config("moe_saved_view", cfg);
  return saved_in("moe_saved_view", cfg, tokens, dtype, saved);
}

std::size_t moe_forward_workspace_bytes(const MoeConfig& cfg, TensorView x, const MoeWeights& w) {
  const std::int64_t t = check_block("moe_forward_workspace_bytes", cfg, x, w, false);
  Carver sizing(x.device);
  const MoeSaved s = layout_saved(cfg, t, x.dtype, sizing);
  Carver cv(x.device);
  layout_forward(cfg, x, w, s, cv);
  return cv.bytes();
}

std::size_t moe_backward_workspace_bytes(const MoeConfig& cfg, TensorView x, const MoeWeights& w, const MoeGrads&) {
  const std::int64_t t = check_block("moe_backward_workspace_bytes", cfg, x, w, false);
  Carver sizing(x.device);
  const MoeSaved s = layout_saved(cfg, t, x.dtype, sizing);
  Carver cv(x.device);
  layout_backward(cfg, x, w, s, cv);
  return cv.bytes();
}

void moe_forward(const MoeConfig& cfg, TensorView x, const MoeWeights& w, TensorView out, TensorView router_logits,
                 TensorView saved, TensorView workspace, void* stream) {
  const char* op = "moe_forward";
  const std::int64_t t = check_block(op, cfg, x, w);
  expect_like_x(op, "out", out, {t, cfg.hidden}, x, true);
  expect_like_x(op, "router_logits", router_logits, {t, cfg.experts}, x, true);
  expect_same_device(op, "saved", saved, x.device);
  const MoeSaved s = saved_in(op, cfg, t, x.dtype, saved);
  detail::expect_workspace(op, workspace, moe_forward_workspace_bytes(cfg, x, w), x.device);
  Carver cv(workspace);
  const ForwardWork f = layout_forward(cfg, x, w, s, cv);
  const Device d = x.device;

  BACKEND(op, d, dense_linear_forward, x, w.router, router_logits, stream);
  BACKEND(op, d, router_forward, router_logits, cfg.top_k, cfg.renormalize, s.topk_ids, s.topk_weights, stream);
  BACKEND(op, d, routing_plan, s.topk_ids, s.plan, f.scratch, stream);
  moe_linear_forward(s.plan, x, w.gate_up, w.gate_up_lora, true, TensorView{}, s.h, f.scratch, stream);
  BACKEND(op, d, swiglu_forward, s.h, f.a, stream);
  moe_linear_forward(s.plan, f.a, w.down, w.down_lora, false, s.topk_weights, out, f.scratch, stream);
}

void moe_backward(const MoeConfig& cfg, TensorView x, const MoeWeights& w, TensorView router_logits, TensorView saved,
                  TensorView grad_out, TensorView grad_router_logits, const MoeGrads& grads, TensorView workspace,
                  void* stream) {
  const char* op = "moe_backward";
  const std::int64_t t = check_block(op, cfg, x, w);
  expect_like_x(op, "router_logits", router_logits, {t, cfg.experts}, x, true);
  expect_like_x(op, "grad_out", grad_out, {t, cfg.hidden}, x, true);
  expect_like_x(op, "grad_router_logits", grad_router_logits, {t, cfg.experts}, x);
  expect_like_x(op, "grads.x", grads.x, {t, cfg.hidden}, x);
  expect_like_x(op, "grads.router", grads.router, {cfg.experts, cfg.hidden}, x);
  expect_like_x(op, "grads.gate_up", grads.gate_up, {cfg.experts, 2 * cfg.intermediate, cfg.hidden}, x);
  expect_like_x(op, "grads.down", grads.down, {cfg.experts, cfg.hidden, cfg.intermediate}, x);
  MOEFUSE_CHECK(!(grads.gate_up.defined() && w.gate_up_lora.defined()) &&
                    !(grads.down.defined() && w.down_lora.defined()),
                op, "an expert weight with a LoRA adapter is frozen: ask for the adapter's gradient, not the weight's");
  expect_same_device(op, "saved", saved, x.device);
  const MoeSaved s = saved_in(op, cfg, t, x.dtype, saved);
  detail::expect_workspace(op, workspace, moe_backward_workspace_bytes(cfg, x, w, grads), x.device);
  Carver cv(workspace);
  const BackwardWork b = layout_backward(cfg, x, w, s, cv);
  const Device d = x.device;

  auto any = [](const LoraGrads& g) { return g.a.defined() || g.b.defined(); };
  const bool need_route = grads.x.defined() || grads.router.defined();  // gradient through the routing weights
  const bool need_grad_h = grads.x.defined() || grads.gate_up.defined() || any(grads.gate_up_lora);
  if (!need_route && !need_grad_h && !grads.down.defined() && !any(grads.down_lora)) return;

  // Down projection: a is recomputed from h; the routing-weight gradient comes out of the same pass.
  BACKEND(op, d, swiglu_forward, s.h, b.a, stream);
  projection_backward(s.plan, b.a, w.down, w.down_lora, false, s.topk_weights, grad_out,
                      need_grad_h ? b.grad_a : TensorView{}, grads.down, grads.down_lora,
                      need_route ? b.grad_weights : TensorView{}, b.scratch, stream);
  // Up projection (gathered x): grads.x gets the experts' part here, the router's part below.
  if (need_grad_h) {
    BACKEND(op, d, swiglu_backward, s.h, b.grad_a, b.grad_h, stream);
    projection_backward(s.plan, x, w.gate_up, w.gate_up_lora, true, TensorView{}, b.grad_h, grads.x, grads.gate_up,
                        grads.gate_up_lora, TensorView{}, b.scratch, stream);
  }
  if (need_route) {
    BACKEND(op, d, router_backward, router_logits, s.topk_ids, cfg.renormalize, b.grad_weights, grad_router_logits,
            b.grad_logits, stream);
    BACKEND(op, d, dense_linear_backward, x, w.router, b.grad_logits, grads.x, true, grads.router, stream);
  }
}

}  // namespace moefuse
