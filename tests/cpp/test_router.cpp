// router_forward / router_backward against the float64 reference, for every logits dtype and odd shapes.
#include "common.h"
#include "reference.h"

namespace {

using namespace mt;

struct RouterCase {
  std::int64_t T;
  int E, k;
  bool renorm;
  DType dtype;
};

std::vector<RouterCase> router_cases() {
  std::vector<RouterCase> cases;
  for (DType dt : kFloatTypes)
    for (bool renorm : {true, false})
      for (auto [T, E, k] : {std::tuple<std::int64_t, int, int>{1, 1, 1}, {7, 3, 2}, {7, 3, 3}, {1000, 60, 8},
                             {1000, 128, 1}, {7, 128, 8}, {1, 60, 8}, {0, 4, 2}})
        cases.push_back({T, E, k, renorm, dt});
  return cases;
}

std::string name_of(const RouterCase& c) {
  return std::string(name(c.dtype)) + "_T" + std::to_string(c.T) + "_E" + std::to_string(c.E) + "_k" +
         std::to_string(c.k) + (c.renorm ? "_renorm" : "_plain");
}
MT_PRINTABLE_CASE(RouterCase)

class Router : public ::testing::TestWithParam<RouterCase> {};

TEST_P(Router, ForwardMatchesReference) {
  const auto c = GetParam();
  Rng rng;
  Vec logits_v = separated_logits(rng, c.T, c.E);
  Tensor logits = make(c.dtype, {c.T, c.E}, logits_v);
  Tensor ids(DType::i32, {c.T, c.k}), w(DType::f32, {c.T, c.k});  // poisoned
  moefuse::router_forward(logits.view(), c.k, c.renorm, ids.view(), w.view());
  auto r = ref::router_forward(logits_v, c.T, c.E, c.k, c.renorm);
  EXPECT_EQ(ids.ints(), r.ids);
  EXPECT_CLOSE(w.values(), r.weights, 1e-5);  // f32 softmax of the same (rounded) logits
}

TEST_P(Router, BackwardMatchesReference) {
  const auto c = GetParam();
  Rng rng;
  Vec logits_v = separated_logits(rng, c.T, c.E), gw_v = rng.normals(c.T * c.k);
  Tensor logits = make(c.dtype, {c.T, c.E}, logits_v), gw = make(DType::f32, {c.T, c.k}, gw_v);
  auto r = ref::router_forward(logits_v, c.T, c.E, c.k, c.renorm);
  Tensor ids(DType::i32, {c.T, c.k});
  ids.set(r.ids);
  Tensor grad(c.dtype, {c.T, c.E});
  moefuse::router_backward(logits.view(), ids.view(), c.renorm, gw.view(), grad.view());
  EXPECT_CLOSE(grad.values(), ref::router_backward(logits_v, r.ids, c.T, c.E, c.k, c.renorm, gw_v), tol(c.dtype));
}

INSTANTIATE_TEST_SUITE_P(Cases, Router, ::testing::ValuesIn(router_cases()), CaseName());

// Exact ties (representable in every dtype): the lower id wins and choices stay in descending order.
TEST(RouterTies, LowerIdFirst) {
  const int E = 8, k = 4;
  Vec v = {1, 3, 3, 2, 3, 1, 0, 2,  // three-way tie at the top, two-way tie at the boundary
           5, 5, 5, 5, 5, 5, 5, 5,  // all equal
           0, 1, 0, 1, 0, 1, 0, 1};
  for (DType dt : kFloatTypes) {
    SCOPED_TRACE(name(dt));
    Tensor logits = make(dt, {3, E}, v), ids(DType::i32, {3, k}), w(DType::f32, {3, k});
    moefuse::router_forward(logits.view(), k, true, ids.view(), w.view());
    EXPECT_EQ(ids.ints(), (Ints{1, 2, 4, 3, 0, 1, 2, 3, 1, 3, 5, 7}));
    EXPECT_CLOSE(w.values(), ref::router_forward(v, 3, E, k, true).weights, 1e-6);
  }
}

}  // namespace
