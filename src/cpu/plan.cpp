// Routing plan: a stable counting sort of the T*k (token, slot) pairs by expert id.
#include <algorithm>
#include <cstdint>

#include "core/backend.h"
#include "core/check.h"

namespace moefuse::cpu {

std::size_t routing_plan_workspace_bytes(const Plan&) { return 0; }

// Serial: O(T*k) integer work, small next to the expert GEMMs.
void routing_plan(const TensorView& topk_ids, const Plan& plan, const TensorView&, void*) {
  const std::int32_t* ids = topk_ids.ptr<std::int32_t>();
  const std::int64_t m = plan.tokens * plan.top_k;
  const int num_experts = plan.experts;
  std::int32_t* counts = plan.counts.ptr<std::int32_t>();
  std::int32_t* offsets = plan.offsets.ptr<std::int32_t>();
  std::int32_t* sorted_pairs = plan.sorted_pairs.ptr<std::int32_t>();
  std::int32_t* pair_positions = plan.pair_positions.ptr<std::int32_t>();

  std::fill(counts, counts + num_experts, 0);
  int negative = 0;
  for (std::int64_t p = 0; p < m; ++p) {
    if (ids[p] < 0) ++negative;
    else if (ids[p] < num_experts) ++counts[ids[p]];
  }
  plan.invalid.ptr<std::int32_t>()[0] = negative;
  if (negative) detail::fail("routing_plan", "topk_ids holds ", negative, " negative expert ids");

  offsets[0] = 0;
  for (int e = 0; e < num_experts; ++e) offsets[e + 1] = offsets[e] + counts[e];
  // counts doubles as each expert's fill cursor and ends where it started; placeholders (ids >= E) go after
  // offsets[E], in pair order.
  std::fill(counts, counts + num_experts, 0);
  std::int32_t next_placeholder = offsets[num_experts];
  for (std::int64_t p = 0; p < m; ++p) {
    const std::int32_t id = ids[p];
    const std::int32_t pos = id < num_experts ? offsets[id] + counts[id]++ : next_placeholder++;
    sorted_pairs[pos] = static_cast<std::int32_t>(p);
    pair_positions[p] = pos;
  }
}

int plan_invalid_count(const Plan& plan, void*) { return plan.invalid.ptr<std::int32_t>()[0]; }

}  // namespace moefuse::cpu
