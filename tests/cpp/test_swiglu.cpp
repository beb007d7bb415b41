// swiglu_forward / swiglu_backward against the reference, every dtype, odd widths, and saturating inputs.
#include "common.h"
#include "reference.h"

namespace {

using namespace mt;

struct SwigluCase {
  std::int64_t R, I;
  DType dtype;
};

std::vector<SwigluCase> swiglu_cases() {
  std::vector<SwigluCase> cases;
  for (DType dt : kFloatTypes)
    for (auto [R, I] : {std::pair<std::int64_t, std::int64_t>{0, 10}, {1, 17}, {7, 48}, {1000, 10}, {33, 37}})
      cases.push_back({R, I, dt});
  return cases;
}

std::string name_of(const SwigluCase& c) {
  return std::string(name(c.dtype)) + "_R" + std::to_string(c.R) + "_I" + std::to_string(c.I);
}
MT_PRINTABLE_CASE(SwigluCase)

// Runs forward and backward on h and grad_a and checks both against the reference.
void check(DType dt, std::int64_t R, std::int64_t I, Vec h_v, Vec ga_v, double tolerance) {
  Tensor h = make(dt, {R, 2 * I}, h_v), ga = make(dt, {R, I}, ga_v);
  Tensor a(dt, {R, I}), gh(dt, {R, 2 * I});
  moefuse::swiglu_forward(h.view(), a.view());
  moefuse::swiglu_backward(h.view(), ga.view(), gh.view());
  EXPECT_CLOSE(a.values(), ref::swiglu_forward(h_v, R, I), tolerance);
  EXPECT_CLOSE(gh.values(), ref::swiglu_backward(h_v, ga_v, R, I), tolerance);
}

class Swiglu : public ::testing::TestWithParam<SwigluCase> {};

TEST_P(Swiglu, MatchesReference) {
  const auto c = GetParam();
  Rng rng;
  check(c.dtype, c.R, c.I, rng.normals(c.R * 2 * c.I, 2.0), rng.normals(c.R * c.I), tol(c.dtype));
}

INSTANTIATE_TEST_SUITE_P(Cases, Swiglu, ::testing::ValuesIn(swiglu_cases()), CaseName());

// Large |gate| saturates the sigmoid: exp overflow must not turn into NaN (e.g. inf/inf).
TEST(SwigluEdge, SaturatedGates) {
  const double gates[] = {-1000, -200, -90, -30, 30, 90, 200, 1000};
  const std::int64_t I = 8;
  Vec h(2 * I), ga(I);
  Rng rng;
  for (std::int64_t i = 0; i < I; ++i) h[i] = gates[i], h[I + i] = rng.normal(), ga[i] = rng.normal();
  for (DType dt : {DType::f32, DType::bf16}) {  // f16 cannot hold the gates
    SCOPED_TRACE(name(dt));
    check(dt, 1, I, h, ga, tol(dt));
  }
}

}  // namespace
