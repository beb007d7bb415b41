// Public ops: validate every argument, then hand the call to the backend of the tensors' device.
#include <algorithm>
#include <limits>

#include "core/dispatch.h"
#include "core/nf4.h"
#include "core/workspace.h"
#include "moefuse/moefuse.h"

namespace moefuse {

using detail::expect;
using detail::expect_nf4;
using detail::expect_optional;
using detail::expect_same_dtype;
using detail::expect_same_device;
using detail::expect_workspace;
using detail::is_nf4;
using detail::kFloatTypes;

namespace {

void check_top_k(const char* op, int top_k, std::int64_t experts) {
  MOEFUSE_CHECK(top_k >= 1 && top_k <= experts, op, "top_k must be in [1, ", experts, "], got ", top_k);
}

// Validates the plan's own buffers and returns M = T*k.
// `data` is false in workspace queries, which read shapes only.
std::int64_t check_plan_views(const char* op, const Plan& p, bool data = true) {
  MOEFUSE_CHECK(p.tokens >= 0, op, "plan.tokens must be >= 0, got ", p.tokens);
  MOEFUSE_CHECK(p.experts >= 1, op, "plan.experts must be >= 1, got ", p.experts);
  check_top_k(op, p.top_k, p.experts);
  const std::int64_t m = p.tokens * p.top_k;
  MOEFUSE_CHECK(m <= std::numeric_limits<std::int32_t>::max(), op, "tokens * top_k = ", m,
                " routed pairs do not fit the i32 indices of a plan");
  expect(op, "plan.counts", p.counts, {p.experts}, {DType::i32}, data);
  expect(op, "plan.offsets", p.offsets, {p.experts + 1}, {DType::i32}, data);
  expect(op, "plan.sorted_pairs", p.sorted_pairs, {m}, {DType::i32}, data);
  expect(op, "plan.pair_positions", p.pair_positions, {m}, {DType::i32}, data);
  expect(op, "plan.invalid", p.invalid, {1}, {DType::i32}, data);
  const Device d = p.counts.device;
  expect_same_device(op, "plan.offsets", p.offsets, d);
  expect_same_device(op, "plan.sorted_pairs", p.sorted_pairs, d);
  expect_same_device(op, "plan.pair_positions", p.pair_positions, d);
  expect_same_device(op, "plan.invalid", p.invalid, d);
  return m;
}

// An expert weight [E, out, in] with no features would leave the GPU kernels nothing to loop over (the Hopper GEMMs
// then never start their accumulators); the block refuses such sizes too.
void check_features(const char* op, const TensorView& weight) {
  MOEFUSE_CHECK(weight.shape[1] >= 1 && weight.shape[2] >= 1, op,
                "weight must have at least one output and one input feature, got ", describe(weight));
}

// An expert weight may be 4-bit (core/nf4.h): u8 [E, out, nf4_row_bytes(in)], `in` being the width of the op's input
// `x` (2-D, checked here first), or half of it. Checks the packed view and returns the weight's
// logical view [E, out, in] in x's dtype, on which the other checks and the workspace queries run. That view points at
// the packed bytes: no kernel reads it (dense_weight makes the float copy that kernels read).
TensorView logical_weight(const char* op, const Plan& plan, const TensorView& weight, const char* x_name,
                          const TensorView& x, bool half_of_x, bool data) {
  if (!is_nf4(weight)) return weight;
  expect(op, x_name, x, {-1, -1}, kFloatTypes, data);
  const std::int64_t in = half_of_x ? x.shape[1] / 2 : x.shape[1];
  MOEFUSE_CHECK(in >= 1, op, "weight is 4-bit, so ", x_name, " must have input columns, got ", describe(x));
  expect_nf4(op, "weight", weight, plan.experts, -1, in, data);
  return view(weight.data, x.dtype, weight.device, {weight.shape[0], weight.shape[1], in});
}

// A 4-bit weight's float copy, which the op's workspace holds in front of what the float path needs (nothing for a
// float weight); sized and laid out by the same carve.
TensorView take_dense(detail::Carver& c, const TensorView& given, const TensorView& logical) {
  return is_nf4(given) ? c.take(logical.dtype, {logical.shape[0], logical.shape[1], logical.shape[2]}) : TensorView{};
}

// The weight as the kernels read it: a float weight as given; a 4-bit one dequantized into the head of the workspace
// (experts without rows skipped), `workspace` becoming the rest of it. The op then runs its float path unchanged.
TensorView dense_weight(const char* op, const Plan& plan, const TensorView& given, const TensorView& logical,
                        TensorView& workspace, void* stream) {
  if (!is_nf4(given)) return given;
  detail::Carver c(workspace);
  const TensorView dense = take_dense(c, given, logical);
  workspace = c.take_bytes(workspace.nbytes() - c.bytes());
  BACKEND(op, given.device, nf4_dequantize, given, plan.counts, dense, stream);
  return dense;
}

// Shared checks of moe_linear_forward/backward on the logical weight; returns the out feature count.
std::int64_t check_linear(const char* op, const Plan& plan, const TensorView& x, const TensorView& weight, bool gather,
                          const TensorView& combine_weights, bool data = true) {
  const std::int64_t m = check_plan_views(op, plan, data);
  expect(op, "weight", weight, {plan.experts, -1, -1}, kFloatTypes, data);
  check_features(op, weight);
  const std::int64_t in = weight.shape[2];
  expect(op, "x", x, {gather ? plan.tokens : m, in}, kFloatTypes, data);
  expect_same_dtype(op, "x", x, weight.dtype);
  expect_optional(op, "combine_weights", combine_weights, {plan.tokens, plan.top_k}, {DType::f32}, data);
  const Device d = plan.counts.device;
  expect_same_device(op, "x", x, d);
  expect_same_device(op, "weight", weight, d);
  expect_same_device(op, "combine_weights", combine_weights, d);
  return weight.shape[1];
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------------
void router_forward(TensorView logits, int top_k, bool renormalize, TensorView topk_ids, TensorView topk_weights,
                    void* stream) {
  const char* op = "router_forward";
  expect(op, "logits", logits, {-1, -1}, kFloatTypes);
  const std::int64_t t = logits.shape[0], e = logits.shape[1];
  MOEFUSE_CHECK(e >= 1, op, "logits must have at least one expert column, got ", describe(logits));
  check_top_k(op, top_k, e);
  expect(op, "topk_ids", topk_ids, {t, top_k}, {DType::i32});
  expect(op, "topk_weights", topk_weights, {t, top_k}, {DType::f32});
  expect_same_device(op, "topk_ids", topk_ids, logits.device);
  expect_same_device(op, "topk_weights", topk_weights, logits.device);
  BACKEND(op, logits.device, router_forward, logits, top_k, renormalize, topk_ids, topk_weights, stream);
}

void router_backward(TensorView logits, TensorView topk_ids, bool renormalize, TensorView grad_topk_weights,
                     TensorView grad_logits, void* stream) {
  const char* op = "router_backward";
  expect(op, "logits", logits, {-1, -1}, kFloatTypes);
  const std::int64_t t = logits.shape[0], e = logits.shape[1];
  expect(op, "topk_ids", topk_ids, {t, -1}, {DType::i32});
  const std::int64_t k = topk_ids.shape[1];
  check_top_k(op, static_cast<int>(k), e);
  expect(op, "grad_topk_weights", grad_topk_weights, {t, k}, {DType::f32});
  expect(op, "grad_logits", grad_logits, {t, e}, kFloatTypes);
  expect_same_device(op, "topk_ids", topk_ids, logits.device);
  expect_same_device(op, "grad_topk_weights", grad_topk_weights, logits.device);
  expect_same_device(op, "grad_logits", grad_logits, logits.device);
  BACKEND(op, logits.device, router_backward, logits, topk_ids, renormalize, grad_topk_weights, TensorView{},
          grad_logits, stream);
}

// ---------------------------------------------------------------------------------------------------------------------
std::size_t routing_plan_workspace_bytes(const Plan& plan, TensorView topk_ids) {
  const char* op = "routing_plan_workspace_bytes";
  check_plan_views(op, plan, false);
  expect(op, "topk_ids", topk_ids, {plan.tokens, plan.top_k}, {DType::i32}, false);
  return BACKEND(op, plan.counts.device, routing_plan_workspace_bytes, plan);
}

void routing_plan(TensorView topk_ids, const Plan& plan, TensorView workspace, void* stream) {
  const char* op = "routing_plan";
  check_plan_views(op, plan);
  expect(op, "topk_ids", topk_ids, {plan.tokens, plan.top_k}, {DType::i32});
  expect_same_device(op, "topk_ids", topk_ids, plan.counts.device);
  expect_workspace(op, workspace, BACKEND(op, plan.counts.device, routing_plan_workspace_bytes, plan),
                   plan.counts.device);
  BACKEND(op, plan.counts.device, routing_plan, topk_ids, plan, workspace, stream);
}

void check_plan(const Plan& plan, void* stream) {
  const char* op = "check_plan";
  check_plan_views(op, plan);
  const int invalid = BACKEND(op, plan.counts.device, plan_invalid_count, plan, stream);
  MOEFUSE_CHECK(invalid == 0, op, invalid, " expert ids are negative; ids must be in [0, ", plan.experts,
                ") (ids >= num_experts are placeholders that contribute nothing)");
}

// ---------------------------------------------------------------------------------------------------------------------
namespace {
void check_linear_forward(const char* op, const Plan& plan, const TensorView& x, const TensorView& weight,
                          bool gather, const TensorView& combine_weights, const TensorView& out) {
  const std::int64_t n = check_linear(op, plan, x, weight, gather, combine_weights);
  expect(op, "out", out, {combine_weights.defined() ? plan.tokens : plan.tokens * plan.top_k, n}, kFloatTypes);
  expect_same_dtype(op, "out", out, weight.dtype);
  expect_same_device(op, "out", out, plan.counts.device);
}

void check_linear_backward(const char* op, const Plan& plan, const TensorView& x, const TensorView& weight,
                           bool gather, const TensorView& combine_weights, const TensorView& grad_out,
                           const TensorView& grad_x, const TensorView& grad_weight,
                           const TensorView& grad_combine_weights) {
  const std::int64_t n = check_linear(op, plan, x, weight, gather, combine_weights);
  const Device d = plan.counts.device;
  const DType dt = weight.dtype;
  expect(op, "grad_out", grad_out, {combine_weights.defined() ? plan.tokens : plan.tokens * plan.top_k, n},
         kFloatTypes);
  expect_optional(op, "grad_x", grad_x, {x.shape[0], x.shape[1]}, kFloatTypes);
  expect_optional(op, "grad_weight", grad_weight, {weight.shape[0], weight.shape[1], weight.shape[2]}, kFloatTypes);
  MOEFUSE_CHECK(!grad_combine_weights.defined() || combine_weights.defined(), op,
                "grad_combine_weights needs combine_weights");
  expect_optional(op, "grad_combine_weights", grad_combine_weights, {plan.tokens, plan.top_k}, {DType::f32});
  expect_same_dtype(op, "grad_out", grad_out, dt);
  expect_same_dtype(op, "grad_x", grad_x, dt);
  expect_same_dtype(op, "grad_weight", grad_weight, dt);
  expect_same_device(op, "grad_out", grad_out, d);
  expect_same_device(op, "grad_x", grad_x, d);
  expect_same_device(op, "grad_weight", grad_weight, d);
  expect_same_device(op, "grad_combine_weights", grad_combine_weights, d);
}

// A 4-bit weight has no gradient: it stays frozen, an adapter trains instead.
void check_frozen(const char* op, const TensorView& weight, const TensorView& grad_weight) {
  MOEFUSE_CHECK(!(is_nf4(weight) && grad_weight.defined()), op,
                "weight is 4-bit, which stays frozen: grad_weight cannot be asked for (train a LoRA adapter)");
}

// Checks an adapter against its weight [E, out, in] (and its u against the plan's M = T*k rows); returns r.
std::int64_t check_lora(const char* op, const Lora& lora, const TensorView& weight, const Plan& plan,
                        bool data = true) {
  const std::int64_t m = plan.tokens * plan.top_k;
  MOEFUSE_CHECK(lora.a.defined() && lora.b.defined(), op, "lora needs both a and b, got a ", describe(lora.a),
                " and b ", describe(lora.b));
  const std::int64_t e = weight.shape[0], out = weight.shape[1], in = weight.shape[2];
  expect(op, "lora.a", lora.a, {e, -1, in}, kFloatTypes, data);
  const std::int64_t r = lora.a.shape[1];
  MOEFUSE_CHECK(r >= 1, op, "lora rank must be >= 1, got lora.a ", describe(lora.a));
  expect(op, "lora.b", lora.b, {e, out, r}, kFloatTypes, data);
  expect_same_dtype(op, "lora.a", lora.a, weight.dtype);
  expect_same_dtype(op, "lora.b", lora.b, weight.dtype);
  expect_same_device(op, "lora.a", lora.a, weight.device);
  expect_same_device(op, "lora.b", lora.b, weight.device);
  if (lora.u.defined()) {
    expect(op, "lora.u", lora.u, {m, r}, kFloatTypes, data);
    expect_same_dtype(op, "lora.u", lora.u, weight.dtype);
    expect_same_device(op, "lora.u", lora.u, weight.device);
  }
  return r;
}

// The adapter gradients asked for, against the adapter (already checked): none without one.
void check_lora_grads(const char* op, const Lora& lora, const TensorView& weight, const LoraGrads& grad_lora) {
  if (!lora.defined()) {
    MOEFUSE_CHECK(!grad_lora.a.defined() && !grad_lora.b.defined(), op, "grad_lora given without a lora");
    return;
  }
  const std::int64_t r = lora.a.shape[1];
  expect_optional(op, "grad_lora.a", grad_lora.a, {weight.shape[0], r, weight.shape[2]}, kFloatTypes);
  expect_optional(op, "grad_lora.b", grad_lora.b, {weight.shape[0], weight.shape[1], r}, kFloatTypes);
  for (auto [name, t] : {std::pair{"grad_lora.a", grad_lora.a}, {"grad_lora.b", grad_lora.b}}) {
    expect_same_dtype(op, name, t, weight.dtype);
    expect_same_device(op, name, t, weight.device);
  }
}

// The float path's workspace (w: the logical weight): the base projection's, or the adapter's when larger.
std::size_t linear_bytes(const char* op, const Plan& plan, const TensorView& x, const TensorView& w, const Lora& lora,
                         bool gather, const TensorView& combine_weights, bool backward) {
  const Device d = plan.counts.device;
  if (backward) {
    const std::size_t base = BACKEND(op, d, moe_linear_backward_workspace_bytes, plan, x, w, gather, combine_weights);
    return lora.defined() ? std::max(base, BACKEND(op, d, moe_lora_backward_workspace_bytes, plan, x, lora, gather,
                                                   combine_weights))
                          : base;
  }
  const std::size_t base = BACKEND(op, d, moe_linear_workspace_bytes, plan, x, w, gather, combine_weights);
  return lora.defined() ? std::max(base, BACKEND(op, d, moe_lora_workspace_bytes, plan, x, lora, gather,
                                                 combine_weights))
                        : base;
}

// A 4-bit weight's float copy in front of the float path's room; w is the checked logical weight.
std::size_t linear_room(const char* op, const Plan& plan, const TensorView& x, const TensorView& weight,
                        const TensorView& w, const Lora& lora, bool gather, const TensorView& combine_weights,
                        bool backward) {
  detail::Carver c(plan.counts.device);
  take_dense(c, weight, w);
  return c.bytes() + linear_bytes(op, plan, x, w, lora, gather, combine_weights, backward);
}

// Both workspace queries.
std::size_t linear_query(const char* op, const Plan& plan, const TensorView& x, const TensorView& weight,
                         const Lora& lora, bool gather, const TensorView& combine_weights, bool backward) {
  const TensorView w = logical_weight(op, plan, weight, "x", x, false, false);
  check_linear(op, plan, x, w, gather, combine_weights, false);
  if (lora.defined()) check_lora(op, lora, w, plan, false);
  return linear_room(op, plan, x, weight, w, lora, gather, combine_weights, backward);
}

// Both forwards. A backend's fused form takes an adapter in its own kernels where it has one; else the base
// projection runs, then the adapter's part is added.
void linear_forward(const Plan& plan, const TensorView& x, const TensorView& weight, const Lora& lora, bool gather,
                    const TensorView& combine_weights, const TensorView& out, TensorView workspace, void* stream) {
  const char* op = "moe_linear_forward";
  const TensorView w = logical_weight(op, plan, weight, "x", x, false, true);
  check_linear_forward(op, plan, x, w, gather, combine_weights, out);
  if (lora.defined()) check_lora(op, lora, w, plan);
  const Device d = plan.counts.device;
  expect_workspace(op, workspace, linear_room(op, plan, x, weight, w, lora, gather, combine_weights, false), d);
  const TensorView dense = dense_weight(op, plan, weight, w, workspace, stream);
  if (lora.defined() && BACKEND(op, d, moe_linear_forward_fused, plan, x, dense, lora, gather, combine_weights, out,
                                workspace, stream))
    return;
  BACKEND(op, d, moe_linear_forward, plan, x, dense, gather, combine_weights, out, workspace, stream);
  if (lora.defined())
    BACKEND(op, d, moe_lora_forward_add, plan, x, lora, gather, combine_weights, out, workspace, stream);
}

// Both backwards, as the forwards: the base part writes grad_x and grad_combine_weights, the adapter's is added.
void linear_backward(const Plan& plan, const TensorView& x, const TensorView& weight, const Lora& lora, bool gather,
                     const TensorView& combine_weights, const TensorView& grad_out, const TensorView& grad_x,
                     const TensorView& grad_weight, const LoraGrads& grad_lora,
                     const TensorView& grad_combine_weights, TensorView workspace, void* stream) {
  const char* op = "moe_linear_backward";
  const TensorView w = logical_weight(op, plan, weight, "x", x, false, true);
  check_linear_backward(op, plan, x, w, gather, combine_weights, grad_out, grad_x, grad_weight, grad_combine_weights);
  check_frozen(op, weight, grad_weight);
  if (lora.defined()) check_lora(op, lora, w, plan);
  check_lora_grads(op, lora, w, grad_lora);
  const Device d = plan.counts.device;
  expect_workspace(op, workspace, linear_room(op, plan, x, weight, w, lora, gather, combine_weights, true), d);
  const TensorView dense = dense_weight(op, plan, weight, w, workspace, stream);
  if (lora.defined() && BACKEND(op, d, moe_linear_backward_fused, plan, x, dense, lora, gather, combine_weights,
                                grad_out, grad_x, grad_lora, grad_combine_weights, workspace, stream))
    return;
  BACKEND(op, d, moe_linear_backward, plan, x, dense, gather, combine_weights, grad_out, grad_x, grad_weight,
          grad_combine_weights, workspace, stream);
  if (lora.defined())
    BACKEND(op, d, moe_lora_backward_add, plan, x, lora, gather, combine_weights, grad_out, grad_x, grad_lora,
            grad_combine_weights, workspace, stream);
}
}  // namespace

std::size_t moe_linear_workspace_bytes(const Plan& plan, TensorView x, TensorView weight, bool gather,
                                       TensorView combine_weights) {
  return linear_query("moe_linear_workspace_bytes", plan, x, weight, Lora{}, gather, combine_weights, false);
}

std::size_t moe_linear_workspace_bytes(const Plan& plan, TensorView x, TensorView weight, const Lora& lora,
                                       bool gather, TensorView combine_weights) {
  return linear_query("moe_linear_workspace_bytes", plan, x, weight, lora, gather, combine_weights, false);
}

void moe_linear_forward(const Plan& plan, TensorView x, TensorView weight, bool gather, TensorView combine_weights,
                        TensorView out, TensorView workspace, void* stream) {
  linear_forward(plan, x, weight, Lora{}, gather, combine_weights, out, workspace, stream);
}

void moe_linear_forward(const Plan& plan, TensorView x, TensorView weight, const Lora& lora, bool gather,
                        TensorView combine_weights, TensorView out, TensorView workspace, void* stream) {
  linear_forward(plan, x, weight, lora, gather, combine_weights, out, workspace, stream);
}

std::size_t moe_linear_backward_workspace_bytes(const Plan& plan, TensorView x, TensorView weight, bool gather,
                                                TensorView combine_weights) {
  return linear_query("moe_linear_backward_workspace_bytes", plan, x, weight, Lora{}, gather, combine_weights, true);
}

std::size_t moe_linear_backward_workspace_bytes(const Plan& plan, TensorView x, TensorView weight, const Lora& lora,
                                                bool gather, TensorView combine_weights) {
  return linear_query("moe_linear_backward_workspace_bytes", plan, x, weight, lora, gather, combine_weights, true);
}

void moe_linear_backward(const Plan& plan, TensorView x, TensorView weight, bool gather, TensorView combine_weights,
                         TensorView grad_out, TensorView grad_x, TensorView grad_weight,
                         TensorView grad_combine_weights, TensorView workspace, void* stream) {
  linear_backward(plan, x, weight, Lora{}, gather, combine_weights, grad_out, grad_x, grad_weight, LoraGrads{},
                  grad_combine_weights, workspace, stream);
}

void moe_linear_backward(const Plan& plan, TensorView x, TensorView weight, const Lora& lora, bool gather,
                         TensorView combine_weights, TensorView grad_out, TensorView grad_x,
                         const LoraGrads& grad_lora, TensorView grad_combine_weights, TensorView workspace,
                         void* stream) {
  linear_backward(plan, x, weight, lora, gather, combine_weights, grad_out, grad_x, TensorView{}, grad_lora,
                  grad_combine_weights, workspace, stream);
}

// ---------------------------------------------------------------------------------------------------------------------
namespace {
std::int64_t check_swiglu(const char* op, const TensorView& h, const TensorView& a, const char* a_name) {
  expect(op, "h", h, {-1, -1}, kFloatTypes);
  MOEFUSE_CHECK(h.shape[1] % 2 == 0, op, "h must be [rows, 2*I] ([gate | up]), got an odd width: ", describe(h));
  const std::int64_t i = h.shape[1] / 2;
  expect(op, a_name, a, {h.shape[0], i}, kFloatTypes);
  expect_same_dtype(op, a_name, a, h.dtype);
  expect_same_device(op, a_name, a, h.device);
  return i;
}
}  // namespace

void swiglu_forward(TensorView h, TensorView a, void* stream) {
  const char* op = "swiglu_forward";
  check_swiglu(op, h, a, "a");
  BACKEND(op, h.device, swiglu_forward, h, a, stream);
}

void moe_linear_swiglu_forward(const Plan& plan, TensorView x, TensorView weight, const Lora& lora, TensorView h,
                               TensorView a, TensorView workspace, void* stream) {
  const char* op = "moe_linear_swiglu_forward";
  const TensorView w = logical_weight(op, plan, weight, "x", x, false, true);
  const std::int64_t n = check_linear(op, plan, x, w, true, TensorView{});
  MOEFUSE_CHECK(n % 2 == 0, op, "weight must be [E, 2*I, in] ([gate; up]), got an odd output size: ", describe(w));
  const Device d = plan.counts.device;
  expect(op, "h", h, {plan.tokens * plan.top_k, n}, kFloatTypes);
  check_swiglu(op, h, a, "a");
  expect_same_dtype(op, "h", h, w.dtype);
  expect_same_device(op, "h", h, d);
  if (lora.defined()) check_lora(op, lora, w, plan);
  expect_workspace(op, workspace, linear_room(op, plan, x, weight, w, lora, true, TensorView{}, false), d);
  const TensorView dense = dense_weight(op, plan, weight, w, workspace, stream);
  BACKEND(op, d, moe_linear_swiglu_forward, plan, x, dense, lora, h, a, workspace, stream);
}

void moe_linear_swiglu_forward(const Plan& plan, TensorView x, TensorView weight, TensorView h, TensorView a,
                               TensorView workspace, void* stream) {
  moe_linear_swiglu_forward(plan, x, weight, Lora{}, h, a, workspace, stream);
}

namespace {
// The composed form's workspace: a [M, I], grad_a [M, I], then moe_linear_backward's (weight: in float).
struct SwigluLinearWork {
  TensorView a, grad_a, rest;
};
SwigluLinearWork layout_swiglu_linear(const char* op, const Plan& plan, const TensorView& h, const TensorView& weight,
                                      const Lora& lora, const TensorView& combine_weights, detail::Carver& c) {
  SwigluLinearWork w;
  w.a = c.take(h.dtype, {h.shape[0], h.shape[1] / 2});
  w.grad_a = c.take(h.dtype, {h.shape[0], h.shape[1] / 2});
  w.rest = c.take_bytes(linear_bytes(op, plan, w.a, weight, lora, false, combine_weights, true));
  return w;
}

// Checks on the logical weight.
void check_swiglu_linear(const char* op, const Plan& plan, const TensorView& h, const TensorView& weight,
                         const Lora& lora, const TensorView& combine_weights, bool data = true) {
  const std::int64_t m = check_plan_views(op, plan, data);
  expect(op, "weight", weight, {plan.experts, -1, -1}, kFloatTypes, data);
  check_features(op, weight);
  expect(op, "h", h, {m, 2 * weight.shape[2]}, kFloatTypes, data);
  expect_same_dtype(op, "h", h, weight.dtype);
  expect(op, "combine_weights", combine_weights, {plan.tokens, plan.top_k}, {DType::f32}, data);
  const Device d = plan.counts.device;
  expect_same_device(op, "h", h, d);
  expect_same_device(op, "weight", weight, d);
  expect_same_device(op, "combine_weights", combine_weights, d);
  if (lora.defined()) check_lora(op, lora, weight, plan, data);
}

// A 4-bit weight's float copy, then the composed form's room; w is the checked logical weight.
std::size_t swiglu_linear_room(const char* op, const Plan& plan, const TensorView& h, const TensorView& weight,
                               const TensorView& w, const Lora& lora, const TensorView& combine_weights) {
  detail::Carver c(plan.counts.device);
  take_dense(c, weight, w);
  layout_swiglu_linear(op, plan, h, w, lora, combine_weights, c);
  return c.bytes();
}

std::size_t swiglu_linear_bytes(const char* op, const Plan& plan, const TensorView& h, const TensorView& weight,
                                const Lora& lora, const TensorView& combine_weights) {
  const TensorView w = logical_weight(op, plan, weight, "h", h, true, false);
  check_swiglu_linear(op, plan, h, w, lora, combine_weights, false);
  return swiglu_linear_room(op, plan, h, weight, w, lora, combine_weights);
}

// Both overloads: grad_weight with the base weight trained, grad_lora with an adapter (the base frozen).
void swiglu_linear_bwd(const char* op, const Plan& plan, const TensorView& h, const TensorView& weight,
                       const Lora& lora, const TensorView& combine_weights, const TensorView& grad_out,
                       const TensorView& grad_h, const TensorView& grad_weight, const LoraGrads& grad_lora,
                       const TensorView& grad_combine_weights, TensorView workspace, UpLoraGrad* up, void* stream) {
  const TensorView w = logical_weight(op, plan, weight, "h", h, true, true);
  check_swiglu_linear(op, plan, h, w, lora, combine_weights);
  const Device d = plan.counts.device;
  const DType dt = w.dtype;
  expect(op, "grad_out", grad_out, {plan.tokens, w.shape[1]}, kFloatTypes);
  expect_optional(op, "grad_h", grad_h, {h.shape[0], h.shape[1]}, kFloatTypes);
  expect_optional(op, "grad_weight", grad_weight, {w.shape[0], w.shape[1], w.shape[2]}, kFloatTypes);
  check_frozen(op, weight, grad_weight);
  expect_optional(op, "grad_combine_weights", grad_combine_weights, {plan.tokens, plan.top_k}, {DType::f32});
  for (auto [name, t] : {std::pair{"grad_out", grad_out}, {"grad_h", grad_h}, {"grad_weight", grad_weight}}) {
    expect_same_dtype(op, name, t, dt);
    expect_same_device(op, name, t, d);
  }
  expect_same_device(op, "grad_combine_weights", grad_combine_weights, d);
  check_lora_grads(op, lora, w, grad_lora);
  expect_workspace(op, workspace, swiglu_linear_room(op, plan, h, weight, w, lora, combine_weights), d);
  const TensorView dense = dense_weight(op, plan, weight, w, workspace, stream);
  if (BACKEND(op, d, swiglu_linear_backward_fused, plan, h, dense, lora, combine_weights, grad_out, grad_h,
              grad_weight, grad_lora, grad_combine_weights, workspace, up, stream))
    return;
  detail::Carver c(workspace);
  const SwigluLinearWork sw = layout_swiglu_linear(op, plan, h, dense, lora, combine_weights, c);
  swiglu_forward(h, sw.a, stream);
  const TensorView grad_a = grad_h.defined() ? sw.grad_a : TensorView{};
  if (lora.defined())
    moe_linear_backward(plan, sw.a, dense, lora, false, combine_weights, grad_out, grad_a, grad_lora,
                        grad_combine_weights, sw.rest, stream);
  else
    moe_linear_backward(plan, sw.a, dense, false, combine_weights, grad_out, grad_a, grad_weight,
                        grad_combine_weights, sw.rest, stream);
  if (grad_h.defined()) swiglu_backward(h, sw.grad_a, grad_h, stream);
}
}  // namespace

std::size_t swiglu_linear_backward_workspace_bytes(const Plan& plan, TensorView h, TensorView weight,
                                                   TensorView combine_weights) {
  return swiglu_linear_bytes("swiglu_linear_backward_workspace_bytes", plan, h, weight, Lora{}, combine_weights);
}

std::size_t swiglu_linear_backward_workspace_bytes(const Plan& plan, TensorView h, TensorView weight,
                                                   const Lora& lora, TensorView combine_weights) {
  return swiglu_linear_bytes("swiglu_linear_backward_workspace_bytes", plan, h, weight, lora, combine_weights);
}

void swiglu_linear_backward(const Plan& plan, TensorView h, TensorView weight, TensorView combine_weights,
                            TensorView grad_out, TensorView grad_h, TensorView grad_weight,
                            TensorView grad_combine_weights, TensorView workspace, void* stream) {
  swiglu_linear_bwd("swiglu_linear_backward", plan, h, weight, Lora{}, combine_weights, grad_out, grad_h, grad_weight,
                    LoraGrads{}, grad_combine_weights, workspace, nullptr, stream);
}

void swiglu_linear_backward(const Plan& plan, TensorView h, TensorView weight, const Lora& lora,
                            TensorView combine_weights, TensorView grad_out, TensorView grad_h,
                            const LoraGrads& grad_lora, TensorView grad_combine_weights, TensorView workspace,
                            void* stream) {
  swiglu_linear_bwd("swiglu_linear_backward", plan, h, weight, lora, combine_weights, grad_out, grad_h, TensorView{},
                    grad_lora, grad_combine_weights, workspace, nullptr, stream);
}

void detail::swiglu_linear_backward(const Plan& plan, const TensorView& h, const TensorView& weight, const Lora& lora,
                                    const TensorView& combine_weights, const TensorView& grad_out,
                                    const TensorView& grad_h, const LoraGrads& grad_lora,
                                    const TensorView& grad_combine_weights, const TensorView& workspace,
                                    UpLoraGrad& up, void* stream) {
  swiglu_linear_bwd("swiglu_linear_backward", plan, h, weight, lora, combine_weights, grad_out, grad_h, TensorView{},
                    grad_lora, grad_combine_weights, workspace, &up, stream);
}

void swiglu_backward(TensorView h, TensorView grad_a, TensorView grad_h, void* stream) {
  const char* op = "swiglu_backward";
  check_swiglu(op, h, grad_a, "grad_a");
  expect(op, "grad_h", grad_h, {h.shape[0], h.shape[1]}, kFloatTypes);
  expect_same_dtype(op, "grad_h", grad_h, h.dtype);
  expect_same_device(op, "grad_h", grad_h, h.device);
  BACKEND(op, h.device, swiglu_backward, h, grad_a, grad_h, stream);
}

// ---------------------------------------------------------------------------------------------------------------------
std::int64_t nf4_row_bytes(std::int64_t in) {
  MOEFUSE_CHECK(in >= 1, "nf4_row_bytes", "in must be >= 1, got ", in);
  return detail::nf4_bytes_per_row(in);
}

namespace {
// weight [E, out, in] float and packed [E, out, nf4_row_bytes(in)] u8 on one device.
void check_nf4(const char* op, const TensorView& weight, const TensorView& packed) {
  expect(op, "weight", weight, {-1, -1, -1}, kFloatTypes);
  check_features(op, weight);
  expect_nf4(op, "packed", packed, weight.shape[0], weight.shape[1], weight.shape[2]);
  expect_same_device(op, "packed", packed, weight.device);
}
}  // namespace

void nf4_quantize(TensorView weight, TensorView packed, void* stream) {
  const char* op = "nf4_quantize";
  check_nf4(op, weight, packed);
  BACKEND(op, weight.device, nf4_quantize, weight, packed, stream);
}

void nf4_dequantize(TensorView packed, TensorView weight, void* stream) {
  const char* op = "nf4_dequantize";
  check_nf4(op, weight, packed);
  BACKEND(op, weight.device, nf4_dequantize, packed, TensorView{}, weight, stream);
}

}  // namespace moefuse
