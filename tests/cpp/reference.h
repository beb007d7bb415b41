// The float64 reference: plain loops that follow the header documentation literally. All tensors are row-major
// std::vector<double> (ids: std::vector<int>); sizes as in ops.h (T tokens, k choices, E experts, M = T*k pairs).
#pragma once

#include <cstdint>
#include <vector>

namespace ref {

using Vec = std::vector<double>;
using Ints = std::vector<int>;

// ---- router -------------------------------------------------------------------------------------------------------
struct Routing {
  Ints ids;    // [T, k]
  Vec weights;  // [T, k]
};
// softmax, top-k by descending probability (ties: lower id first), optional renormalisation.
Routing router_forward(const Vec& logits, std::int64_t T, int E, int k, bool renormalize);
// d(sum_j grad_w[t, j] * w[t, j]) / d logits, with the ids held fixed.
Vec router_backward(const Vec& logits, const Ints& ids, std::int64_t T, int E, int k, bool renormalize,
                    const Vec& grad_w);

// ---- routing plan -------------------------------------------------------------------------------------------------
struct Plan {
  std::int64_t T = 0;
  int k = 0, E = 0;
  Ints counts, offsets, sorted_pairs, pair_positions;
};
// Stable sort of the pairs by expert; ids >= E (placeholders) all sort after the real experts, in pair order.
Plan routing_plan(const Ints& ids, std::int64_t T, int k, int E);

// ---- moe_linear ---------------------------------------------------------------------------------------------------
// weight [E, n_out, n_in]; x [M, n_in] sorted (gather false) or [T, n_in] (gather true); combine [T, k] or null.
// Result: [T, n_out] with combine, else [M, n_out] in sorted order (placeholder rows zero).
Vec linear_forward(const Plan& plan, const Vec& x, const Vec& weight, std::int64_t n_out, std::int64_t n_in,
                   bool gather, const Vec* combine);
struct LinearGrads {
  Vec x, weight, combine;  // combine empty without combine weights
};
LinearGrads linear_backward(const Plan& plan, const Vec& x, const Vec& weight, std::int64_t n_out, std::int64_t n_in,
                            bool gather, const Vec* combine, const Vec& grad_out);

// ---- SwiGLU -------------------------------------------------------------------------------------------------------
Vec swiglu_forward(const Vec& h, std::int64_t R, std::int64_t I);  // h [R, 2I] -> [R, I]
Vec swiglu_backward(const Vec& h, const Vec& grad_a, std::int64_t R, std::int64_t I);

// ---- the MoE block ------------------------------------------------------------------------------------------------
struct Block {
  std::int64_t T = 0, H = 0, I = 0;
  int E = 0, k = 0;
  bool renormalize = true;
};
struct BlockParams {
  Vec x, router, gate_up, down;  // [T, H], [E, H], [E, 2I, H], [E, H, I]
};
struct BlockForward {
  Vec logits, out;  // [T, E], [T, H]
  Routing routing;
};
// Token by token, independent of any plan. `route_logits` (optional) replaces x.router^T as the router input, so
// a test can route exactly as the library did on its (rounded) logits.
BlockForward block_forward(const Block& b, const BlockParams& p, const Vec* route_logits = nullptr);
// Gradients of <grad_out, out> + <grad_logits, logits> (grad_logits optional), routing on `logits`.
BlockParams block_backward(const Block& b, const BlockParams& p, const Vec& logits, const Vec& grad_out,
                           const Vec* grad_logits);

}  // namespace ref
