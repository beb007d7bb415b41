// routing_plan against the reference: counts, offsets, the stable expert order, the inverse map, placeholders last.
#include <algorithm>

#include "common.h"
#include "reference.h"

namespace {

using namespace mt;

struct PlanCase {
  std::int64_t T;
  int k, E;
  bool placeholders;
};

std::vector<PlanCase> plan_cases() {
  std::vector<PlanCase> cases;
  for (bool ph : {false, true})
    for (auto [T, k, E] : {std::tuple<std::int64_t, int, int>{0, 2, 3}, {1, 1, 1}, {1, 8, 60}, {7, 2, 3}, {7, 8, 8},
                           {1000, 8, 128}, {1000, 1, 60}, {1000, 2, 3}})
      cases.push_back({T, k, E, ph});
  return cases;
}

std::string name_of(const PlanCase& c) {
  return "T" + std::to_string(c.T) + "_k" + std::to_string(c.k) + "_E" + std::to_string(c.E) +
         (c.placeholders ? "_placeholders" : "");
}
MT_PRINTABLE_CASE(PlanCase)

// Builds the plan with the library on poisoned buffers and a poisoned workspace.
void run_plan(const Tensor& ids, const PlanTensors& pt) {
  std::size_t bytes = moefuse::routing_plan_workspace_bytes(pt.plan(), ids.view());
  Tensor ws = scratch(bytes);
  moefuse::routing_plan(ids.view(), pt.plan(), ws.view());
}

class RoutingPlan : public ::testing::TestWithParam<PlanCase> {};

TEST_P(RoutingPlan, MatchesReference) {
  const auto c = GetParam();
  Rng rng;
  Ints ids_v = random_ids(rng, c.T, c.k, c.E, c.placeholders);
  Tensor ids(DType::i32, {c.T, c.k});
  ids.set(ids_v);
  PlanTensors pt(c.T, c.k, c.E);
  run_plan(ids, pt);
  auto r = ref::routing_plan(ids_v, c.T, c.k, c.E);

  EXPECT_EQ(pt.counts.ints(), r.counts);
  EXPECT_EQ(pt.offsets.ints(), r.offsets);
  EXPECT_EQ(pt.invalid.ints(), Ints{0});
  EXPECT_NO_THROW(moefuse::check_plan(pt.plan()));

  // Real experts: exactly the stable order. Placeholders: after them, in an order the header leaves open.
  Ints sorted = pt.sorted_pairs.ints();
  const int real = r.offsets[c.E];
  EXPECT_TRUE(std::equal(r.sorted_pairs.begin(), r.sorted_pairs.begin() + real, sorted.begin()));
  Ints tail(sorted.begin() + real, sorted.end()), ref_tail(r.sorted_pairs.begin() + real, r.sorted_pairs.end());
  std::sort(tail.begin(), tail.end());
  EXPECT_EQ(tail, ref_tail);  // ref_tail is already in pair order

  Ints pos = pt.pair_positions.ints();
  for (std::int64_t s = 0; s < c.T * c.k; ++s) {
    ASSERT_GE(sorted[s], 0);
    ASSERT_LT(sorted[s], c.T * c.k);
    ASSERT_EQ(pos[sorted[s]], s) << "pair_positions is not the inverse of sorted_pairs";
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, RoutingPlan, ::testing::ValuesIn(plan_cases()), CaseName());

// All pairs on placeholders: no expert owns a row.
TEST(RoutingPlanEdge, OnlyPlaceholders) {
  const int T = 5, k = 2, E = 3;
  Tensor ids(DType::i32, {T, k});
  ids.set(Ints{3, 4, 3, 100, 7, 3, 3, 3, 1 << 30, 5});
  PlanTensors pt(T, k, E);
  run_plan(ids, pt);
  EXPECT_EQ(pt.counts.ints(), (Ints{0, 0, 0}));
  EXPECT_EQ(pt.offsets.ints(), (Ints{0, 0, 0, 0}));
  Ints sorted = pt.sorted_pairs.ints();
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(sorted, (Ints{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}));
}

}  // namespace
