// moe_forward / moe_backward (the whole block) against the token-by-token float64 reference. The reference routes
// on the library's own router_logits (checked separately against x.router^T), so a rounding-level difference in a
// logit can never flip a top-k choice and fail the test for the wrong reason.
#include <cmath>

#include "common.h"
#include "reference.h"

namespace {

using namespace mt;

struct BlockCase {
  std::int64_t T, H, I;
  int E, k;
  bool renorm;
  DType dtype;
};

std::vector<BlockCase> block_cases() {
  std::vector<BlockCase> cases;
  for (DType dt : kFloatTypes)
    for (BlockCase c : std::initializer_list<BlockCase>{{7, 24, 10, 3, 2, true, dt},
                                                        {1, 37, 17, 60, 8, true, dt},  // most experts get no token
                                                        {1000, 24, 10, 128, 8, false, dt},
                                                        {13, 96, 48, 128, 1, true, dt},
                                                        {5, 37, 17, 1, 1, true, dt},
                                                        {0, 24, 10, 3, 2, true, dt},
                                                        {64, 96, 48, 60, 8, false, dt},
                                                        {1000, 96, 48, 60, 8, true, dt}})
      cases.push_back(c);
  return cases;
}

std::string name_of(const BlockCase& c) {
  return std::string(name(c.dtype)) + "_T" + std::to_string(c.T) + "_H" + std::to_string(c.H) + "_I" +
         std::to_string(c.I) + "_E" + std::to_string(c.E) + "_k" + std::to_string(c.k) +
         (c.renorm ? "_renorm" : "_plain");
}
MT_PRINTABLE_CASE(BlockCase)

// Which gradients a backward computes.
struct Want {
  bool x, router, gate_up, down;
};
constexpr Want kAll{true, true, true, true};

// One block: rounded inputs (tensors and the matching double values), forward outputs, and backward runs.
struct Block {
  Block(const BlockCase& c_, Rng& rng)
      : c(c_),
        b{c.T, c.H, c.I, c.E, c.k, c.renorm},
        p{rng.normals(c.T * c.H), rng.normals(c.E * c.H, 1 / std::sqrt(double(c.H))),
          rng.normals(c.E * 2 * c.I * c.H, 1 / std::sqrt(double(c.H))),
          rng.normals(c.E * c.H * c.I, 1 / std::sqrt(double(c.I)))},
        x(make(c.dtype, {c.T, c.H}, p.x)),
        router(make(c.dtype, {c.E, c.H}, p.router)),
        gate_up(make(c.dtype, {c.E, 2 * c.I, c.H}, p.gate_up)),
        down(make(c.dtype, {c.E, c.H, c.I}, p.down)),
        out(c.dtype, {c.T, c.H}),
        logits(c.dtype, {c.T, c.E}),
        saved(scratch(moefuse::moe_saved_bytes(config(), c.T, c.dtype))) {}

  moefuse::MoeConfig config() const { return {c.H, c.I, c.E, c.k, c.renorm}; }
  moefuse::MoeWeights weights() const { return weights_of(router.view(), gate_up.view(), down.view()); }
  moefuse::MoeSaved saved_view() const { return moefuse::moe_saved_view(config(), c.T, c.dtype, saved.view()); }

  void forward() {
    for (Tensor* t : {&out, &logits, &saved}) t->poison();
    Tensor ws = scratch(moefuse::moe_forward_workspace_bytes(config(), x.view(), weights()));
    moefuse::moe_forward(config(), x.view(), weights(), out.view(), logits.view(), saved.view(), ws.view());
  }

  // Gradients (absent ones stay poisoned); `grad_logits` may be null.
  ref::BlockParams backward(const Tensor& grad_out, const Tensor* grad_logits, Want want) const {
    Tensor gx(c.dtype, {c.T, c.H}), gr(c.dtype, {c.E, c.H}), gg(c.dtype, {c.E, 2 * c.I, c.H}),
        gd(c.dtype, {c.E, c.H, c.I});
    auto pick = [](bool on, const Tensor& t) { return on ? t.view() : TensorView{}; };
    auto grads = grads_of(pick(want.x, gx), pick(want.router, gr), pick(want.gate_up, gg), pick(want.down, gd));
    Tensor ws = scratch(moefuse::moe_backward_workspace_bytes(config(), x.view(), weights(), grads));
    moefuse::moe_backward(config(), x.view(), weights(), logits.view(), saved.view(), grad_out.view(),
                          grad_logits ? grad_logits->view() : TensorView{}, grads, ws.view());
    return {gx.values(), gr.values(), gg.values(), gd.values()};
  }

  BlockCase c;
  ref::Block b;
  ref::BlockParams p;
  Tensor x, router, gate_up, down, out, logits, saved;
};

class MoeBlock : public ::testing::TestWithParam<BlockCase> {};

TEST_P(MoeBlock, ForwardMatchesReference) {
  const auto c = GetParam();
  Rng rng;
  Block blk(c, rng);
  blk.forward();
  Vec lib_logits = blk.logits.values();
  auto r = ref::block_forward(blk.b, blk.p, &lib_logits);
  EXPECT_CLOSE(lib_logits, r.logits, tol(c.dtype));
  EXPECT_CLOSE(blk.out.values(), r.out, tol(c.dtype));

  // What forward leaves for backward, as documented in MoeSaved.
  auto s = blk.saved_view();
  EXPECT_EQ(ints(s.topk_ids), r.routing.ids);
  EXPECT_CLOSE(values(s.topk_weights), r.routing.weights, 1e-5);
  auto plan = ref::routing_plan(r.routing.ids, c.T, c.k, c.E);
  EXPECT_EQ(ints(s.plan.counts), plan.counts);
  EXPECT_EQ(ints(s.plan.offsets), plan.offsets);
  EXPECT_EQ(ints(s.plan.sorted_pairs), plan.sorted_pairs);
  EXPECT_EQ(ints(s.plan.pair_positions), plan.pair_positions);
  EXPECT_CLOSE(values(s.h), ref::linear_forward(plan, blk.p.x, blk.p.gate_up, 2 * c.I, c.H, true, nullptr),
               tol(c.dtype));
}

TEST_P(MoeBlock, BackwardMatchesReference) {
  const auto c = GetParam();
  Rng rng;
  Block blk(c, rng);
  blk.forward();
  Vec gout_v = rng.normals(c.T * c.H), glog_v = rng.normals(c.T * c.E);
  Tensor gout = make(c.dtype, {c.T, c.H}, gout_v), glog = make(c.dtype, {c.T, c.E}, glog_v);
  for (bool with_glog : {false, true}) {
    SCOPED_TRACE(with_glog ? "with grad_router_logits" : "without grad_router_logits");
    auto g = blk.backward(gout, with_glog ? &glog : nullptr, kAll);
    auto r = ref::block_backward(blk.b, blk.p, blk.logits.values(), gout_v, with_glog ? &glog_v : nullptr);
    EXPECT_CLOSE(g.x, r.x, tol(c.dtype));
    EXPECT_CLOSE(g.router, r.router, tol(c.dtype));
    EXPECT_CLOSE(g.gate_up, r.gate_up, tol(c.dtype));
    EXPECT_CLOSE(g.down, r.down, tol(c.dtype));
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, MoeBlock, ::testing::ValuesIn(block_cases()), CaseName());

// Frozen experts (LoRA): gate_up/down absent. dx and d_router must equal the full backward's; likewise for every
// other subset of gradients.
TEST(MoeBlockGrads, SubsetsMatchFull) {
  for (BlockCase c : {BlockCase{33, 37, 17, 8, 2, true, DType::f32}, BlockCase{9, 24, 10, 60, 8, false, DType::f32}}) {
    SCOPED_TRACE(std::to_string(c.E) + " experts");
    Rng rng(std::to_string(c.E));
    Block blk(c, rng);
    blk.forward();
    Vec gout_v = rng.normals(c.T * c.H), glog_v = rng.normals(c.T * c.E);
    Tensor gout = make(c.dtype, {c.T, c.H}, gout_v), glog = make(c.dtype, {c.T, c.E}, glog_v);
    auto full = blk.backward(gout, &glog, kAll);
    auto frozen = blk.backward(gout, &glog, {true, true, false, false});
    EXPECT_CLOSE(frozen.x, full.x, 1e-6);
    EXPECT_CLOSE(frozen.router, full.router, 1e-6);
    EXPECT_CLOSE(blk.backward(gout, &glog, {true, false, false, false}).x, full.x, 1e-6);
    EXPECT_CLOSE(blk.backward(gout, &glog, {false, true, false, false}).router, full.router, 1e-6);
    EXPECT_CLOSE(blk.backward(gout, &glog, {false, false, true, false}).gate_up, full.gate_up, 1e-6);
    EXPECT_CLOSE(blk.backward(gout, &glog, {false, false, false, true}).down, full.down, 1e-6);
    EXPECT_NO_THROW(blk.backward(gout, &glog, {false, false, false, false}));
  }
}

// The forward and backward can be re-run on the same saved buffer: nothing accumulates across calls.
TEST(MoeBlockGrads, RepeatableRuns) {
  BlockCase c{19, 24, 10, 6, 2, true, DType::f32};
  Rng rng;
  Block blk(c, rng);
  Vec gout_v = rng.normals(c.T * c.H);
  Tensor gout = make(c.dtype, {c.T, c.H}, gout_v);
  blk.forward();
  Vec out1 = blk.out.values();
  auto g1 = blk.backward(gout, nullptr, kAll);
  blk.forward();
  EXPECT_EQ(blk.out.values(), out1);
  auto g2 = blk.backward(gout, nullptr, kAll);
  EXPECT_EQ(g2.x, g1.x);
  EXPECT_EQ(g2.gate_up, g1.gate_up);
}

// A NaN in one token's input: no hang or throw, that token's logits and output are NaN, the others are unaffected.
TEST(MoeBlockEdge, NanInInputStaysInItsToken) {
  BlockCase c{7, 24, 10, 5, 2, true, DType::f32};
  Rng rng;
  Block blk(c, rng);
  const std::int64_t bad = 3;
  Vec x = blk.p.x;
  x[bad * c.H + 5] = NAN;
  blk.x.set(x);
  ASSERT_NO_THROW(blk.forward());
  Vec out = blk.out.values(), logits = blk.logits.values();
  // Reference on the clean tokens: routed on the library logits, with the NaN row swapped for finite values.
  for (int e = 0; e < c.E; ++e) logits[bad * c.E + e] = e;
  auto r = ref::block_forward(blk.b, blk.p, &logits);
  for (std::int64_t t = 0; t < c.T; ++t)
    for (std::int64_t h = 0; h < c.H; ++h) {
      if (t == bad)
        EXPECT_TRUE(std::isnan(out[t * c.H + h])) << "out[" << t << ", " << h << "]";
      else
        EXPECT_NEAR(out[t * c.H + h], r.out[t * c.H + h], 1e-5) << "out[" << t << ", " << h << "]";
    }
  Vec lib_logits = blk.logits.values();
  for (int e = 0; e < c.E; ++e) EXPECT_TRUE(std::isnan(lib_logits[bad * c.E + e])) << "logit " << e;

  Vec gout_v = rng.normals(c.T * c.H);
  Tensor gout = make(c.dtype, {c.T, c.H}, gout_v);
  ref::BlockParams g;
  ASSERT_NO_THROW(g = blk.backward(gout, nullptr, {true, false, false, false}));
  for (std::int64_t t = 0; t < c.T; ++t)
    for (std::int64_t h = 0; h < c.H; ++h) EXPECT_EQ(std::isnan(g.x[t * c.H + h]), t == bad) << "dx[" << t << ", " << h << "]";
}

}  // namespace
