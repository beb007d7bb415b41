// The MoE block and its experts part, composed from the ops (see include/moefuse/block.h for the data flow).
// The block is router + experts: both public entries run the same experts code below.
#include <algorithm>
#include <array>
#include <tuple>
#include <utility>

#include "core/dispatch.h"
#include "core/workspace.h"
#include "moefuse/moefuse.h"

namespace moefuse {

using detail::Carver;
using detail::expect;
using detail::expect_nf4;
using detail::expect_same_device;
using detail::expect_same_dtype;
using detail::is_nf4;
using detail::kFloatTypes;

namespace {

void check_config(const char* op, const MoeConfig& c) {
  MOEFUSE_CHECK(c.hidden >= 1 && c.intermediate >= 1, op, "hidden and intermediate must be >= 1, got ", c.hidden,
                " and ", c.intermediate);
  MOEFUSE_CHECK(c.experts >= 1, op, "experts must be >= 1, got ", c.experts);
  MOEFUSE_CHECK(c.top_k >= 1 && c.top_k <= c.experts, op, "top_k must be in [1, ", c.experts, "], got ", c.top_k);
}

// Adapters reach the kernels contiguous and in the weights' dtype. One given otherwise (a strided view such as PEFT's
// lora_B [out, r*E] read as [E, out, r]; f32 adapters over bf16 weights, as PEFT keeps them) is staged: copied into
// the workspace before the GEMMs; its gradients are computed there and copied out, cast, after them.
bool staged(const TensorView& t, DType dtype) { return t.defined() && (t.dtype != dtype || !t.is_contiguous()); }

// No two elements of `t` at one address (sufficient test: each dim's stride spans all smaller-stride dims).
bool non_overlapping(const TensorView& t) {
  int d[3] = {0, 1, 2};
  std::sort(d, d + 3, [&](int i, int j) { return t.stride[i] < t.stride[j]; });
  std::int64_t span = 1;
  for (int i : d) {
    if (t.shape[i] <= 1) continue;
    if (t.stride[i] < span) return false;
    span = t.stride[i] * t.shape[i];
  }
  return true;
}

// An adapter tensor or gradient as given, before staging: 3-D, a float dtype, on the weights' device, any strides
// (a gradient's must not overlap). Shapes are checked on the staged views by the ops.
void check_given(const char* op, const char* name, const TensorView& t, Device device, bool written) {
  if (!t.defined()) return;
  MOEFUSE_CHECK(t.ndim == 3, op, name, " must be 3-D, got ", describe(t));
  MOEFUSE_CHECK(t.dtype == DType::f32 || t.dtype == DType::bf16 || t.dtype == DType::f16, op, name,
                " must be f32 | bf16 | f16, got ", describe(t));
  for (int d = 0; d < 3; ++d)
    MOEFUSE_CHECK(t.shape[d] >= 0 && t.stride[d] >= 0, op, name, " has a negative size or stride: ", describe(t));
  MOEFUSE_CHECK(!written || non_overlapping(t), op, name, " has elements that overlap in memory: ", describe(t));
  expect_same_device(op, name, t, device);
}

// staged_b, when given with a b to stage: b's shape, contiguous, in the weights' dtype, on their device.
void check_staged_b(const char* op, const char* name, const Lora& l, const TensorView& x) {
  if (!l.staged_b.defined() || !staged(l.b, x.dtype)) return;
  expect(op, name, l.staged_b, {l.b.shape[0], l.b.shape[1], l.b.shape[2]}, kFloatTypes);
  expect_same_dtype(op, name, l.staged_b, x.dtype);
  expect_same_device(op, name, l.staged_b, x.device);
}

// A stacked adapter on a weight [E, out, in]: a [E, r, in] and b [E, out, r] of one rank r. One of a and b alone
// is left to the ops, which say that an adapter needs both.
void check_shapes(const char* op, const char* name, const Lora& l, std::int64_t experts, std::int64_t out,
                  std::int64_t in) {
  if (!l.a.defined() || !l.b.defined()) return;
  const std::int64_t r = l.a.shape[1];
  MOEFUSE_CHECK(l.a.shape[0] == experts && l.a.shape[2] == in, op, name, ".a must be [", experts, ", r, ", in,
                "], got ", describe(l.a));
  MOEFUSE_CHECK(l.b.shape[0] == experts && l.b.shape[1] == out && l.b.shape[2] == r, op, name, ".b must be [",
                experts, ", ", out, ", ", r, "] (rank ", r, " from ", name, ".a), got ", describe(l.b));
}

void check_given(const char* op, const MoeConfig& c, const MoeWeights& w, const TensorView& x) {
  check_given(op, "gate_up_lora.a", w.gate_up_lora.a, x.device, false);
  check_given(op, "gate_up_lora.b", w.gate_up_lora.b, x.device, false);
  check_given(op, "down_lora.a", w.down_lora.a, x.device, false);
  check_given(op, "down_lora.b", w.down_lora.b, x.device, false);
  check_staged_b(op, "gate_up_lora.staged_b", w.gate_up_lora, x);
  check_staged_b(op, "down_lora.staged_b", w.down_lora, x);
  check_shapes(op, "gate_up_lora", w.gate_up_lora, c.experts, 2 * c.intermediate, c.hidden);
  check_shapes(op, "down_lora", w.down_lora, c.experts, c.hidden, c.intermediate);
}

TensorView stage(const TensorView& t, DType dtype, Carver& cv) {
  return staged(t, dtype) ? cv.take(dtype, {t.shape[0], t.shape[1], t.shape[2]}) : t;
}

// A staged b goes to the caller's staged_b when given, else to the workspace.
Lora stage(const Lora& l, DType dtype, Carver& cv) {
  Lora s = l;
  s.a = stage(l.a, dtype, cv);
  s.b = staged(l.b, dtype) && l.staged_b.defined() ? l.staged_b : stage(l.b, dtype, cv);
  return s;
}

// b as the forward staged it into the caller's staged_b, which a backward reads as it is.
bool kept(const Lora& given, const Lora& staged_lora) {
  return given.staged_b.defined() && staged_lora.b.data == given.staged_b.data;
}

// Room for an adapter's gradients in the weights' dtype, whatever the caller's turn out to be: the workspace queries
// do not see the gradients.
LoraGrads stage_grads(const Lora& l, DType dtype, Carver& cv) {
  if (!l.defined() || !l.a.defined() || !l.b.defined()) return {};
  return {cv.take(dtype, {l.a.shape[0], l.a.shape[1], l.a.shape[2]}),
          cv.take(dtype, {l.b.shape[0], l.b.shape[1], l.b.shape[2]})};
}

// The gradient the kernels write: the caller's own when it needs no staging, else the room reserved for it.
TensorView grad_target(const TensorView& given, const TensorView& room, DType dtype) {
  return staged(given, dtype) ? room : given;
}

// Copies what was staged: `to` is a staged view of `from` wherever the two differ.
void copy_staged(const char* op, std::initializer_list<std::pair<TensorView, TensorView>> from_to, void* stream) {
  for (const auto& [from, to] : from_to)
    if (from.defined() && to.defined() && from.data != to.data)
      BACKEND(op, from.device, copy_strided, from, to, stream);
}

// An expert weight of logical shape [E, out, in]: in x's dtype, or 4-bit, packed [E, out, nf4_row_bytes(in)].
void check_expert_weight(const char* op, const char* name, const TensorView& w, std::array<std::int64_t, 3> shape,
                         const TensorView& x, bool data) {
  if (is_nf4(w)) {  // the projection ops take it as it is
    expect_nf4(op, name, w, shape[0], shape[1], shape[2], data);
  } else {
    expect(op, name, w, {shape[0], shape[1], shape[2]}, kFloatTypes, data);
    expect_same_dtype(op, name, w, x.dtype);
  }
  expect_same_device(op, name, w, x.device);
}

// Checks x and the expert weights (and the router weight when `router`); returns T.
// `data` is false in workspace queries, which read shapes only.
std::int64_t check_weights(const char* op, const MoeConfig& c, const TensorView& x, const MoeWeights& w, bool router,
                           bool data = true) {
  check_config(op, c);
  expect(op, "x", x, {-1, c.hidden}, kFloatTypes, data);
  if (router) {
    expect(op, "router weight", w.router, {c.experts, c.hidden}, kFloatTypes, data);
    expect_same_dtype(op, "router weight", w.router, x.dtype);
    expect_same_device(op, "router weight", w.router, x.device);
  }
  check_expert_weight(op, "gate_up", w.gate_up, {c.experts, 2 * c.intermediate, c.hidden}, x, data);
  check_expert_weight(op, "down", w.down, {c.experts, c.hidden, c.intermediate}, x, data);
  check_given(op, c, w, x);
  return x.shape[0];
}

// This shape, with the device and dtype of x; optional ones are checked only when present.
void expect_like_x(const char* op, const char* name, const TensorView& t, std::initializer_list<std::int64_t> shape,
                   const TensorView& x, bool required = false) {
  if (required || t.defined()) expect(op, name, t, shape, kFloatTypes);
  expect_same_dtype(op, name, t, x.dtype);
  expect_same_device(op, name, t, x.device);
}

void check_grads(const char* op, const MoeConfig& c, const TensorView& x, const MoeWeights& w, const MoeGrads& g) {
  const std::int64_t t = x.shape[0];
  expect_like_x(op, "grads.x", g.x, {t, c.hidden}, x);
  expect_like_x(op, "grads.router", g.router, {c.experts, c.hidden}, x);
  expect_like_x(op, "grads.gate_up", g.gate_up, {c.experts, 2 * c.intermediate, c.hidden}, x);
  expect_like_x(op, "grads.down", g.down, {c.experts, c.hidden, c.intermediate}, x);
  MOEFUSE_CHECK(!(g.gate_up.defined() && is_nf4(w.gate_up)), op,
                "grads.gate_up given, but gate_up is 4-bit (NF4), which is frozen: train a LoRA adapter on it");
  MOEFUSE_CHECK(!(g.down.defined() && is_nf4(w.down)), op,
                "grads.down given, but down is 4-bit (NF4), which is frozen: train a LoRA adapter on it");
  MOEFUSE_CHECK(!(g.gate_up.defined() && w.gate_up_lora.defined()), op,
                "grads.gate_up given, but gate_up has a LoRA adapter, which freezes it: ask for grads.gate_up_lora");
  MOEFUSE_CHECK(!(g.down.defined() && w.down_lora.defined()), op,
                "grads.down given, but down has a LoRA adapter, which freezes it: ask for grads.down_lora");
  for (const auto& [name, grad, like] : {std::tuple{"grads.gate_up_lora.a", g.gate_up_lora.a, w.gate_up_lora.a},
                                         {"grads.gate_up_lora.b", g.gate_up_lora.b, w.gate_up_lora.b},
                                         {"grads.down_lora.a", g.down_lora.a, w.down_lora.a},
                                         {"grads.down_lora.b", g.down_lora.b, w.down_lora.b}}) {
    check_given(op, name, grad, x.device, true);
    MOEFUSE_CHECK(!grad.defined() || (like.defined() && std::equal(grad.shape, grad.shape + 3, like.shape)), op,
                  name, " must have the shape of its adapter, ", describe(like), ", got ", describe(grad));
  }
}

// The experts' state for backward: the plan and h = gather(x) . gate_up^T.
struct ExpertsSaved {
  Plan plan;
  TensorView h;
};

ExpertsSaved layout_experts_saved(const MoeConfig& c, std::int64_t tokens, DType dtype, Carver& cv) {
  const std::int64_t m = tokens * c.top_k;
  ExpertsSaved s;
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

MoeSaved layout_saved(const MoeConfig& c, std::int64_t tokens, DType dtype, Carver& cv) {
  MoeSaved s;
  s.topk_ids = cv.take(DType::i32, {tokens, c.top_k});
  s.topk_weights = cv.take(DType::f32, {tokens, c.top_k});
  const ExpertsSaved e = layout_experts_saved(c, tokens, dtype, cv);
  s.plan = e.plan;
  s.h = e.h;
  return s;
}

// A caller's state buffer laid out by `layout` for `tokens` tokens, after checking it is large enough.
template <class Layout>
auto saved_in(const char* op, const MoeConfig& c, std::int64_t tokens, DType dtype, const TensorView& saved,
              Layout layout) {
  Carver sizing(saved.device);
  layout(c, tokens, dtype, sizing);
  expect(op, "saved", saved, {-1}, {DType::u8});
  detail::expect_buffer(op, "saved", saved, sizing.bytes(), saved.device);
  Carver cv(saved);
  return layout(c, tokens, dtype, cv);
}

// Forward scratch: the adapters as the kernels read them, a = swiglu(h), then one region the ops take turns using
// (with 4-bit expert weights it holds the float copy of one of them where a projection makes one: ops.h).
struct ForwardWork {
  Lora gate_up_lora, down_lora;
  TensorView a, scratch;
};

ForwardWork layout_forward(const MoeConfig& c, const TensorView& x, const MoeWeights& w, const ExpertsSaved& s,
                           const TensorView& topk_weights, Carver& cv) {
  ForwardWork f;
  f.gate_up_lora = stage(w.gate_up_lora, x.dtype, cv);
  f.down_lora = stage(w.down_lora, x.dtype, cv);
  f.a = cv.take(x.dtype, {s.h.shape[0], c.intermediate});
  f.scratch = cv.take_bytes(
      std::max({BACKEND("moe_forward", x.device, routing_plan_workspace_bytes, s.plan),
                moe_linear_workspace_bytes(s.plan, x, w.gate_up, f.gate_up_lora, true, TensorView{}),
                moe_linear_workspace_bytes(s.plan, f.a, w.down, f.down_lora, false, topk_weights)}));
  return f;
}

// Backward scratch of the experts (the block adds the router's below them): swiglu_linear_backward goes from h to
// grad_h itself.
struct BackwardWork {
  Lora gate_up_lora, down_lora;
  LoraGrads gate_up_grads, down_grads;  // room for the adapters' gradients, used where the caller's are staged
  TensorView grad_h, scratch;
};

BackwardWork layout_backward(const MoeConfig& c, const TensorView& x, const MoeWeights& w, const ExpertsSaved& s,
                             const TensorView& topk_weights, Carver& cv) {
  BackwardWork b;
  b.gate_up_lora = stage(w.gate_up_lora, x.dtype, cv);
  b.down_lora = stage(w.down_lora, x.dtype, cv);
  b.gate_up_grads = stage_grads(w.gate_up_lora, x.dtype, cv);
  b.down_grads = stage_grads(w.down_lora, x.dtype, cv);
  b.grad_h = cv.take(x.dtype, {s.h.shape[0], 2 * c.intermediate});
  b.scratch = cv.take_bytes(
      std::max(swiglu_linear_backward_workspace_bytes(s.plan, s.h, w.down, b.down_lora, topk_weights),
               moe_linear_backward_workspace_bytes(s.plan, x, w.gate_up, b.gate_up_lora, true, TensorView{})));
  return b;
}

// Shape-only views of what the layouts need, for the workspace queries.
struct Sizing {
  ExpertsSaved saved;
  TensorView topk_weights;
};
Sizing sizing(const MoeConfig& c, const TensorView& x) {
  Carver cv(x.device);
  const MoeSaved s = layout_saved(c, x.shape[0], x.dtype, cv);
  return {{s.plan, s.h}, s.topk_weights};
}

// Stages an adapter as given into `staged` (its view as the kernels read it); a backward leaves b where its forward
// kept it.
void stage_adapter(const char* op, const Lora& given, const Lora& staged, bool backward, void* stream) {
  copy_staged(op, {{given.a, staged.a}, {given.b, backward && kept(given, staged) ? TensorView{} : staged.b}}, stream);
}

void experts_forward(const TensorView& x, const MoeWeights& w, const TensorView& topk_ids,
                     const TensorView& topk_weights, const ExpertsSaved& s, const ForwardWork& f,
                     const TensorView& out, void* stream) {
  const char* op = "moe_forward";
  BACKEND(op, x.device, routing_plan, topk_ids, s.plan, f.scratch, stream);
  // Each adapter is staged just before its projection: a layer step's GPU waits for the host until the first GEMM
  // is issued, and the down adapter's copies need not come before it.
  stage_adapter(op, w.gate_up_lora, f.gate_up_lora, false, stream);
  moe_linear_swiglu_forward(s.plan, x, w.gate_up, f.gate_up_lora, s.h, f.a, f.scratch, stream);
  stage_adapter(op, w.down_lora, f.down_lora, false, stream);
  moe_linear_forward(s.plan, f.a, w.down, f.down_lora, false, topk_weights, out, f.scratch, stream);
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

bool any(const LoraGrads& g) { return g.a.defined() || g.b.defined(); }

// Writes grads.x (the experts' part), the expert weight or adapter gradients and grad_topk_weights, each if present.
void experts_backward(const TensorView& x, const MoeWeights& w, const TensorView& topk_weights,
                      const ExpertsSaved& s, const TensorView& grad_out, const MoeGrads& grads,
                      const TensorView& grad_topk_weights, const BackwardWork& b, void* stream) {
  const char* op = "moe_backward";
  const bool need_grad_h = grads.x.defined() || grads.gate_up.defined() || any(grads.gate_up_lora);
  if (!need_grad_h && !grads.down.defined() && !any(grads.down_lora) && !grad_topk_weights.defined()) return;
  stage_adapter(op, w.gate_up_lora, b.gate_up_lora, true, stream);
  stage_adapter(op, w.down_lora, b.down_lora, true, stream);
  const LoraGrads& gu = grads.gate_up_lora, &dn = grads.down_lora;
  const LoraGrads gate_up_grads{grad_target(gu.a, b.gate_up_grads.a, x.dtype),
                                grad_target(gu.b, b.gate_up_grads.b, x.dtype)},
      down_grads{grad_target(dn.a, b.down_grads.a, x.dtype), grad_target(dn.b, b.down_grads.b, x.dtype)};
  // Down projection through the activation: a is recomputed from h; the routing-weight gradient comes out of the
  // same pass.
  // With adapters on both, the down projection's row pass may sum the up adapter's grad B from the grad_h it writes.
  const TensorView grad_h = need_grad_h ? b.grad_h : TensorView{};
  UpLoraGrad up;
  if (b.gate_up_lora.u.defined()) up = {b.gate_up_lora.u, gate_up_grads.b};
  if (w.down_lora.defined())
    detail::swiglu_linear_backward(s.plan, s.h, w.down, b.down_lora, topk_weights, grad_out, grad_h, down_grads,
                                   grad_topk_weights, b.scratch, up, stream);
  else
    swiglu_linear_backward(s.plan, s.h, w.down, topk_weights, grad_out, grad_h, grads.down, grad_topk_weights,
                           b.scratch, stream);
  if (need_grad_h)  // up projection (gathered x)
    projection_backward(s.plan, x, w.gate_up, b.gate_up_lora, true, TensorView{}, b.grad_h, grads.x, grads.gate_up,
                        {gate_up_grads.a, up.done ? TensorView{} : gate_up_grads.b}, TensorView{}, b.scratch, stream);
  copy_staged(op, {{gate_up_grads.a, gu.a}, {gate_up_grads.b, gu.b}, {down_grads.a, dn.a}, {down_grads.b, dn.b}},
              stream);
}

// The block's backward adds the router's scratch after the experts'.
struct RouterWork {
  TensorView grad_weights, grad_logits;
};
RouterWork layout_router_backward(const MoeConfig& c, const TensorView& x, Carver& cv) {
  return {cv.take(DType::f32, {x.shape[0], c.top_k}), cv.take(x.dtype, {x.shape[0], c.experts})};
}

// Workspace sizes of the block (`block`: with the router) or of the experts alone; queries read shapes only.
std::size_t forward_bytes(const char* op, const MoeConfig& c, const TensorView& x, const MoeWeights& w, bool block) {
  check_weights(op, c, x, w, block, false);
  const Sizing z = sizing(c, x);
  Carver cv(x.device);
  layout_forward(c, x, w, z.saved, z.topk_weights, cv);
  return cv.bytes();
}

std::size_t backward_bytes(const char* op, const MoeConfig& c, const TensorView& x, const MoeWeights& w, bool block) {
  check_weights(op, c, x, w, block, false);
  const Sizing z = sizing(c, x);
  Carver cv(x.device);
  layout_backward(c, x, w, z.saved, z.topk_weights, cv);
  if (block) layout_router_backward(c, x, cv);
  return cv.bytes();
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------------
std::size_t moe_saved_bytes(const MoeConfig& cfg, std::int64_t tokens, DType dtype) {
  check_config("moe_saved_bytes", cfg);
  Carver cv(Device::cpu());
  layout_saved(cfg, tokens, dtype, cv);
  return cv.bytes();
}

MoeSaved moe_saved_view(const MoeConfig& cfg, std::int64_t tokens, DType dtype, TensorView saved) {
  check_config("moe_saved_view", cfg);
  return saved_in("moe_saved_view", cfg, tokens, dtype, saved, layout_saved);
}

std::size_t moe_forward_workspace_bytes(const MoeConfig& cfg, TensorView x, const MoeWeights& w) {
  return forward_bytes("moe_forward_workspace_bytes", cfg, x, w, true);
}

std::size_t moe_backward_workspace_bytes(const MoeConfig& cfg, TensorView x, const MoeWeights& w, const MoeGrads&) {
  return backward_bytes("moe_backward_workspace_bytes", cfg, x, w, true);
}

void moe_forward(const MoeConfig& cfg, TensorView x, const MoeWeights& w, TensorView out, TensorView router_logits,
                 TensorView saved, TensorView workspace, void* stream) {
  const char* op = "moe_forward";
  const std::int64_t t = check_weights(op, cfg, x, w, true);
  expect_like_x(op, "out", out, {t, cfg.hidden}, x, true);
  expect_like_x(op, "router_logits", router_logits, {t, cfg.experts}, x, true);
  expect_same_device(op, "saved", saved, x.device);
  const MoeSaved s = saved_in(op, cfg, t, x.dtype, saved, layout_saved);
  detail::expect_workspace(op, workspace, moe_forward_workspace_bytes(cfg, x, w), x.device);
  Carver cv(workspace);
  const ExpertsSaved es{s.plan, s.h};
  const ForwardWork f = layout_forward(cfg, x, w, es, s.topk_weights, cv);

  BACKEND(op, x.device, dense_linear_forward, x, w.router, router_logits, stream);
  BACKEND(op, x.device, router_forward, router_logits, cfg.top_k, cfg.renormalize, s.topk_ids, s.topk_weights,
          stream);
  experts_forward(x, w, s.topk_ids, s.topk_weights, es, f, out, stream);
}

void moe_backward(const MoeConfig& cfg, TensorView x, const MoeWeights& w, TensorView router_logits, TensorView saved,
                  TensorView grad_out, TensorView grad_router_logits, const MoeGrads& grads, TensorView workspace,
                  void* stream) {
  const char* op = "moe_backward";
  const std::int64_t t = check_weights(op, cfg, x, w, true);
  expect_like_x(op, "router_logits", router_logits, {t, cfg.experts}, x, true);
  expect_like_x(op, "grad_out", grad_out, {t, cfg.hidden}, x, true);
  expect_like_x(op, "grad_router_logits", grad_router_logits, {t, cfg.experts}, x);
  check_grads(op, cfg, x, w, grads);
  expect_same_device(op, "saved", saved, x.device);
  const MoeSaved s = saved_in(op, cfg, t, x.dtype, saved, layout_saved);
  detail::expect_workspace(op, workspace, moe_backward_workspace_bytes(cfg, x, w, grads), x.device);
  Carver cv(workspace);
  const ExpertsSaved es{s.plan, s.h};
  const BackwardWork b = layout_backward(cfg, x, w, es, s.topk_weights, cv);
  const RouterWork r = layout_router_backward(cfg, x, cv);

  const bool need_route = grads.x.defined() || grads.router.defined();  // gradient through the routing weights
  // grads.x gets the experts' part here and the router's part below.
  experts_backward(x, w, s.topk_weights, es, grad_out, grads, need_route ? r.grad_weights : TensorView{}, b,
                   stream);
  if (!need_route) return;
  BACKEND(op, x.device, router_backward, router_logits, s.topk_ids, cfg.renormalize, r.grad_weights,
          grad_router_logits, r.grad_logits, stream);
  BACKEND(op, x.device, dense_linear_backward, x, w.router, r.grad_logits, grads.x, true, grads.router, stream);
}

// ---------------------------------------------------------------------------------------------------------------------
std::size_t moe_experts_saved_bytes(const MoeConfig& cfg, std::int64_t tokens, DType dtype) {
  check_config("moe_experts_saved_bytes", cfg);
  Carver cv(Device::cpu());
  layout_experts_saved(cfg, tokens, dtype, cv);
  return cv.bytes();
}

std::size_t moe_experts_forward_workspace_bytes(const MoeConfig& cfg, TensorView x, const MoeWeights& w) {
  return forward_bytes("moe_experts_forward_workspace_bytes", cfg, x, w, false);
}

std::size_t moe_experts_backward_workspace_bytes(const MoeConfig& cfg, TensorView x, const MoeWeights& w) {
  return backward_bytes("moe_experts_backward_workspace_bytes", cfg, x, w, false);
}

void moe_experts_forward(const MoeConfig& cfg, TensorView x, TensorView topk_ids, TensorView topk_weights,
                         const MoeWeights& w, TensorView out, TensorView saved, TensorView workspace, void* stream) {
  const char* op = "moe_experts_forward";
  const std::int64_t t = check_weights(op, cfg, x, w, false);
  expect(op, "topk_ids", topk_ids, {t, cfg.top_k}, {DType::i32});
  expect(op, "topk_weights", topk_weights, {t, cfg.top_k}, {DType::f32});
  expect_same_device(op, "topk_ids", topk_ids, x.device);
  expect_same_device(op, "topk_weights", topk_weights, x.device);
  expect_like_x(op, "out", out, {t, cfg.hidden}, x, true);
  expect_same_device(op, "saved", saved, x.device);
  const ExpertsSaved s = saved_in(op, cfg, t, x.dtype, saved, layout_experts_saved);
  detail::expect_workspace(op, workspace, moe_experts_forward_workspace_bytes(cfg, x, w), x.device);
  Carver cv(workspace);
  const ForwardWork f = layout_forward(cfg, x, w, s, topk_weights, cv);
  experts_forward(x, w, topk_ids, topk_weights, s, f, out, stream);
}

void moe_experts_backward(const MoeConfig& cfg, TensorView x, TensorView topk_weights, const MoeWeights& w,
                          TensorView saved, TensorView grad_out, const MoeGrads& grads, TensorView grad_topk_weights,
                          TensorView workspace, void* stream) {
  const char* op = "moe_experts_backward";
  const std::int64_t t = check_weights(op, cfg, x, w, false);
  expect(op, "topk_weights", topk_weights, {t, cfg.top_k}, {DType::f32});
  expect_same_device(op, "topk_weights", topk_weights, x.device);
  expect_like_x(op, "grad_out", grad_out, {t, cfg.hidden}, x, true);
  MOEFUSE_CHECK(!grads.router.defined(), op, "grads.router must be absent: the experts have no router");
  check_grads(op, cfg, x, w, grads);
  if (grad_topk_weights.defined()) {
    expect(op, "grad_topk_weights", grad_topk_weights, {t, cfg.top_k}, {DType::f32});
    expect_same_device(op, "grad_topk_weights", grad_topk_weights, x.device);
  }
  expect_same_device(op, "saved", saved, x.device);
  const ExpertsSaved s = saved_in(op, cfg, t, x.dtype, saved, layout_experts_saved);
  detail::expect_workspace(op, workspace, moe_experts_backward_workspace_bytes(cfg, x, w), x.device);
  Carver cv(workspace);
  const BackwardWork b = layout_backward(cfg, x, w, s, topk_weights, cv);
  experts_backward(x, w, topk_weights, s, grad_out, grads, grad_topk_weights, b, stream);
}

}  // namespace moefuse
