// Checks the test scaffolding itself: the 16-bit converters, the reference's documented tie/sort rules on hand-made
// examples, and every reference backward against central finite differences in double.
#include <cmath>

#include "common.h"
#include "reference.h"

namespace {

using namespace mt;

// ---- converters ---------------------------------------------------------------------------------------------------
TEST(Converters, KnownBitPatterns) {
  EXPECT_EQ(f16_bits(1.0), 0x3c00);
  EXPECT_EQ(f16_bits(-2.0), 0xc000);
  EXPECT_EQ(f16_bits(65504.0), 0x7bff);
  EXPECT_EQ(f16_bits(65520.0), 0x7c00);  // rounds past the largest finite value
  EXPECT_EQ(f16_bits(std::ldexp(1.0, -24)), 0x0001);
  EXPECT_EQ(f16_bits(std::ldexp(1.0, -14)), 0x0400);
  EXPECT_EQ(f16_bits(1.0 + std::ldexp(1.0, -11)), 0x3c00);      // tie -> even
  EXPECT_EQ(f16_bits(1.0 + 3 * std::ldexp(1.0, -11)), 0x3c02);  // tie -> even
  EXPECT_EQ(bf16_bits(1.0), 0x3f80);
  EXPECT_EQ(bf16_bits(-3.0), 0xc040);
  EXPECT_EQ(bf16_bits(1.0 + std::ldexp(1.0, -8)), 0x3f80);  // tie -> even
  EXPECT_EQ(bf16_bits(1.0 + 3 * std::ldexp(1.0, -8)), 0x3f82);
  EXPECT_TRUE(std::isnan(f16_value(f16_bits(NAN))));
  EXPECT_TRUE(std::isnan(bf16_value(bf16_bits(NAN))));
  EXPECT_TRUE(std::isnan(f16_value(0xffff)) && std::isnan(bf16_value(0xffff)));  // the poison pattern
}

TEST(Converters, RoundTripEveryF16) {
  for (int b = 0; b < 0x10000; ++b) {
    double v = f16_value(static_cast<std::uint16_t>(b));
    if (!std::isnan(v)) {
      ASSERT_EQ(f16_bits(v), b) << v;
    }
  }
}

TEST(Converters, RoundingIsNearest) {
  Rng rng;
  for (int i = 0; i < 10000; ++i) {
    double v = rng.normal(10.0);
    for (DType dt : {DType::bf16, DType::f16}) {
      double r = round_to(dt, v), ulp = std::ldexp(1.0, std::ilogb(v) - (dt == DType::bf16 ? 7 : 10));
      ASSERT_LE(std::fabs(r - v), 0.5 * ulp) << name(dt) << " " << v;
    }
  }
}

// ---- documented semantics on hand-made examples -------------------------------------------------------------------
TEST(ReferenceRouter, TiesGoToLowerIdInDescendingOrder) {
  ref::Vec logits = {1, 3, 3, 2, 3, 1, 0, 2,  // three-way tie at the top
                     5, 5, 5, 5, 5, 5, 5, 5};
  auto r = ref::router_forward(logits, 2, 8, 4, true);
  EXPECT_EQ(r.ids, (ref::Ints{1, 2, 4, 3, 0, 1, 2, 3}));
  EXPECT_NEAR(r.weights[4], 0.25, 1e-15);
  auto plain = ref::router_forward(logits, 2, 8, 4, false);
  EXPECT_NEAR(plain.weights[4], 0.125, 1e-15);
  EXPECT_GT(plain.weights[0], plain.weights[3]);
}

TEST(ReferencePlan, StableWithPlaceholdersLast) {
  ref::Ints ids = {2, 0, 5, 2, 0, 3};  // T=3, k=2, E=3: ids 5 and 3 are placeholders
  auto p = ref::routing_plan(ids, 3, 2, 3);
  EXPECT_EQ(p.counts, (ref::Ints{2, 0, 2}));
  EXPECT_EQ(p.offsets, (ref::Ints{0, 2, 2, 4}));
  EXPECT_EQ(p.sorted_pairs, (ref::Ints{1, 4, 0, 3, 2, 5}));
  EXPECT_EQ(p.pair_positions, (ref::Ints{2, 0, 4, 3, 1, 5}));
}

// ---- finite differences -------------------------------------------------------------------------------------------
// Central differences of loss() with respect to every element of `param` (which loss() reads).
Vec numeric_grad(const std::function<double()>& loss, Vec& param, double eps = 1e-6) {
  Vec g(param.size());
  for (std::size_t i = 0; i < param.size(); ++i) {
    double keep = param[i];
    param[i] = keep + eps;
    double up = loss();
    param[i] = keep - eps;
    double down = loss();
    param[i] = keep;
    g[i] = (up - down) / (2 * eps);
  }
  return g;
}

double dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

constexpr double kFdTol = 1e-7;

TEST(ReferenceGradients, Router) {
  for (auto [E, k] : {std::pair{6, 3}, {5, 1}, {4, 4}, {1, 1}})
    for (bool renorm : {true, false}) {
      SCOPED_TRACE("E=" + std::to_string(E) + " k=" + std::to_string(k) + " renorm=" + std::to_string(renorm));
      Rng rng(std::to_string(E * 10 + k) + std::to_string(renorm));
      const int T = 3;
      Vec logits = separated_logits(rng, T, E), gw = rng.normals(T * k);
      auto ids = ref::router_forward(logits, T, E, k, renorm).ids;
      auto loss = [&] { return dot(gw, ref::router_forward(logits, T, E, k, renorm).weights); };
      Vec analytic = ref::router_backward(logits, ids, T, E, k, renorm, gw);
      EXPECT_CLOSE(numeric_grad(loss, logits), analytic, kFdTol);
    }
}

TEST(ReferenceGradients, Linear) {
  const int T = 4, k = 2, E = 3, n_in = 5, n_out = 3;
  for (bool gather : {false, true})
    for (bool comb : {false, true}) {
      SCOPED_TRACE("gather=" + std::to_string(gather) + " combine=" + std::to_string(comb));
      Rng rng(std::to_string(gather) + std::to_string(comb));
      auto plan = ref::routing_plan(random_ids(rng, T, k, E, true), T, k, E);
      Vec x = rng.normals((gather ? T : T * k) * n_in), W = rng.normals(E * n_out * n_in);
      Vec cw = rng.normals(T * k), gout = rng.normals((comb ? T : T * k) * n_out);
      const Vec* c = comb ? &cw : nullptr;
      auto loss = [&] { return dot(gout, ref::linear_forward(plan, x, W, n_out, n_in, gather, c)); };
      auto g = ref::linear_backward(plan, x, W, n_out, n_in, gather, c, gout);
      EXPECT_CLOSE(numeric_grad(loss, x), g.x, kFdTol);
      EXPECT_CLOSE(numeric_grad(loss, W), g.weight, kFdTol);
      if (comb) {
        EXPECT_CLOSE(numeric_grad(loss, cw), g.combine, kFdTol);
      }
    }
}

TEST(ReferenceGradients, Swiglu) {
  Rng rng;
  const int R = 3, I = 4;
  Vec h = rng.normals(R * 2 * I, 2.0), ga = rng.normals(R * I);
  auto loss = [&] { return dot(ga, ref::swiglu_forward(h, R, I)); };
  EXPECT_CLOSE(numeric_grad(loss, h), ref::swiglu_backward(h, ga, R, I), kFdTol);
}

TEST(ReferenceGradients, Block) {
  for (bool renorm : {true, false}) {
    SCOPED_TRACE("renorm=" + std::to_string(renorm));
    Rng rng(std::to_string(renorm));
    ref::Block b{5, 6, 4, 4, 2, renorm};
    ref::BlockParams p{rng.normals(b.T * b.H), rng.normals(b.E * b.H), rng.normals(b.E * 2 * b.I * b.H, 0.5),
                       rng.normals(b.E * b.H * b.I, 0.5)};
    Vec gout = rng.normals(b.T * b.H), glog = rng.normals(b.T * b.E);
    auto loss = [&] {
      auto f = ref::block_forward(b, p);
      return dot(gout, f.out) + dot(glog, f.logits);
    };
    auto g = ref::block_backward(b, p, ref::block_forward(b, p).logits, gout, &glog);
    EXPECT_CLOSE(numeric_grad(loss, p.x), g.x, kFdTol);
    EXPECT_CLOSE(numeric_grad(loss, p.router), g.router, kFdTol);
    EXPECT_CLOSE(numeric_grad(loss, p.gate_up), g.gate_up, kFdTol);
    EXPECT_CLOSE(numeric_grad(loss, p.down), g.down, kFdTol);
  }
}

}  // namespace
