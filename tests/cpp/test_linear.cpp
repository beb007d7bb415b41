// moe_linear_forward / moe_linear_backward against the reference: gather or not, combine or not, placeholders,
// experts without rows, every storage dtype. The plan comes from the reference, so routing_plan is not under test.
#include <array>
#include <cmath>

#include "common.h"
#include "reference.h"

namespace {

using namespace mt;

struct LinearCase {
  std::int64_t T;
  int k, E;
  std::int64_t n_in, n_out;
  bool placeholders, gather, combine;
  DType dtype;
};

std::vector<LinearCase> linear_cases() {
  struct Shape {
    std::int64_t T;
    int k, E;
    std::int64_t n_in, n_out;
    bool placeholders;
  };
  const Shape shapes[] = {{1, 1, 1, 24, 10, false}, {7, 2, 3, 37, 17, true},       {1, 8, 60, 24, 10, false},
                          {7, 8, 128, 96, 48, true}, {1000, 8, 128, 24, 10, true}, {0, 2, 3, 37, 17, false}};
  std::vector<LinearCase> cases;
  for (DType dt : kFloatTypes)
    for (const auto& s : shapes)
      for (bool gather : {false, true})
        for (bool combine : {false, true})
          cases.push_back({s.T, s.k, s.E, s.n_in, s.n_out, s.placeholders, gather, combine, dt});
  return cases;
}

std::string name_of(const LinearCase& c) {
  return std::string(name(c.dtype)) + "_T" + std::to_string(c.T) + "_k" + std::to_string(c.k) + "_E" +
         std::to_string(c.E) + "_" + std::to_string(c.n_in) + "to" + std::to_string(c.n_out) +
         (c.placeholders ? "_ph" : "") + (c.gather ? "_gather" : "") + (c.combine ? "_combine" : "");
}
MT_PRINTABLE_CASE(LinearCase)

// One case's inputs, rounded to the storage dtype; the Vec members hold exactly what the tensors hold.
struct Inputs {
  explicit Inputs(const LinearCase& c, Rng& rng)
      : M(c.T * c.k),
        plan(ref::routing_plan(random_ids(rng, c.T, c.k, c.E, c.placeholders), c.T, c.k, c.E)),
        pt(plan_tensors(plan)),
        x_v(rng.normals((c.gather ? c.T : M) * c.n_in)),
        w_v(rng.normals(c.E * c.n_out * c.n_in, 1 / std::sqrt(double(c.n_in)))),
        cw_v(rng.normals(c.T * c.k)),
        gout_v(rng.normals((c.combine ? c.T : M) * c.n_out)),
        x(make(c.dtype, {c.gather ? c.T : M, c.n_in}, x_v)),
        w(make(c.dtype, {c.E, c.n_out, c.n_in}, w_v)),
        cw(make(DType::f32, {c.T, c.k}, cw_v)),
        gout(make(c.dtype, {c.combine ? c.T : M, c.n_out}, gout_v)),
        combine(c.combine) {}

  TensorView cw_view() const { return combine ? cw.view() : TensorView{}; }
  const Vec* cw_ptr() const { return combine ? &cw_v : nullptr; }

  std::int64_t M;
  ref::Plan plan;
  PlanTensors pt;
  Vec x_v, w_v, cw_v, gout_v;
  Tensor x, w, cw, gout;
  bool combine;
};

Tensor forward(const LinearCase& c, const Inputs& in) {
  Tensor out(c.dtype, {c.combine ? c.T : in.M, c.n_out});
  auto plan = in.pt.plan();
  Tensor ws = scratch(moefuse::moe_linear_workspace_bytes(plan, in.x.view(), in.w.view(), c.gather, in.cw_view()));
  moefuse::moe_linear_forward(plan, in.x.view(), in.w.view(), c.gather, in.cw_view(), out.view(), ws.view());
  return out;
}

struct Grads {
  Tensor x, w, cw;
};
// Runs the backward for the gradients selected in `want` (x, weight, combine); the others stay absent.
Grads backward(const LinearCase& c, const Inputs& in, std::array<bool, 3> want) {
  Grads g{Tensor(c.dtype, {c.gather ? c.T : in.M, c.n_in}), Tensor(c.dtype, {c.E, c.n_out, c.n_in}),
          Tensor(DType::f32, {c.T, c.k})};
  auto plan = in.pt.plan();
  auto pick = [](bool on, const Tensor& t) { return on ? t.view() : TensorView{}; };
  Tensor ws = scratch(
      moefuse::moe_linear_backward_workspace_bytes(plan, in.x.view(), in.w.view(), c.gather, in.cw_view()));
  moefuse::moe_linear_backward(plan, in.x.view(), in.w.view(), c.gather, in.cw_view(), in.gout.view(),
                               pick(want[0], g.x), pick(want[1], g.w), pick(want[2] && c.combine, g.cw), ws.view());
  return g;
}

class MoeLinear : public ::testing::TestWithParam<LinearCase> {};

TEST_P(MoeLinear, ForwardMatchesReference) {
  const auto c = GetParam();
  Rng rng;
  Inputs in(c, rng);
  Tensor out = forward(c, in);
  EXPECT_CLOSE(out.values(), ref::linear_forward(in.plan, in.x_v, in.w_v, c.n_out, c.n_in, c.gather, in.cw_ptr()),
               tol(c.dtype));
}

TEST_P(MoeLinear, BackwardMatchesReference) {
  const auto c = GetParam();
  Rng rng;
  Inputs in(c, rng);
  Grads g = backward(c, in, {true, true, true});
  auto r = ref::linear_backward(in.plan, in.x_v, in.w_v, c.n_out, c.n_in, c.gather, in.cw_ptr(), in.gout_v);
  EXPECT_CLOSE(g.x.values(), r.x, tol(c.dtype));
  EXPECT_CLOSE(g.w.values(), r.weight, tol(c.dtype));
  if (c.combine) {
    EXPECT_CLOSE(g.cw.values(), r.combine, tol(c.dtype));
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, MoeLinear, ::testing::ValuesIn(linear_cases()), CaseName());

// Each gradient asked for alone equals the one computed with all of them.
TEST(MoeLinearEdge, GradientSubsets) {
  for (bool gather : {false, true}) {
    LinearCase c{33, 2, 5, 37, 17, true, gather, true, DType::f32};
    Rng rng(std::to_string(gather));
    Inputs in(c, rng);
    Grads all = backward(c, in, {true, true, true});
    EXPECT_CLOSE(backward(c, in, {true, false, false}).x.values(), all.x.values(), 1e-6);
    EXPECT_CLOSE(backward(c, in, {false, true, false}).w.values(), all.w.values(), 1e-6);
    EXPECT_CLOSE(backward(c, in, {false, false, true}).cw.values(), all.cw.values(), 1e-6);
  }
}

// The up projection with its activation gives exactly moe_linear_forward then swiglu_forward.
TEST(MoeLinearSwiglu, IsLinearThenSwiglu) {
  for (DType dt : kFloatTypes)
    for (LinearCase c : {LinearCase{1, 1, 1, 24, 10, false, true, false, dt}, {7, 2, 3, 37, 18, true, true, false, dt},
                         {1000, 8, 128, 24, 10, true, true, false, dt}, {0, 2, 3, 37, 18, false, true, false, dt}}) {
      SCOPED_TRACE(name_of(c));
      Rng rng;
      Inputs in(c, rng);
      const Tensor h = forward(c, in);
      Tensor a(dt, {in.M, c.n_out / 2});
      moefuse::swiglu_forward(h.view(), a.view());
      Tensor h2(dt, {in.M, c.n_out}), a2(dt, {in.M, c.n_out / 2});
      auto plan = in.pt.plan();
      Tensor ws = scratch(moefuse::moe_linear_workspace_bytes(plan, in.x.view(), in.w.view(), true, TensorView{}));
      moefuse::moe_linear_swiglu_forward(plan, in.x.view(), in.w.view(), h2.view(), a2.view(), ws.view());
      EXPECT_EQ(h2.values(), h.values());
      EXPECT_EQ(a2.values(), a.values());
    }
}

// A NaN in one token's input reaches exactly that token's rows.
TEST(MoeLinearEdge, NanStaysInItsRows) {
  LinearCase c{7, 2, 3, 24, 10, false, true, false, DType::f32};
  Rng rng;
  Inputs in(c, rng);
  const int bad = 3;
  Vec x = in.x_v;
  x[bad * c.n_in + 5] = NAN;
  in.x.set(x);
  Vec out = forward(c, in).values();
  Vec expect = ref::linear_forward(in.plan, in.x_v, in.w_v, c.n_out, c.n_in, c.gather, nullptr);
  for (std::int64_t s = 0; s < in.M; ++s) {
    bool nan_row = in.plan.sorted_pairs[s] / c.k == bad;
    for (std::int64_t o = 0; o < c.n_out; ++o) {
      double v = out[s * c.n_out + o];
      if (nan_row)
        EXPECT_TRUE(std::isnan(v)) << "row " << s;
      else
        EXPECT_NEAR(v, expect[s * c.n_out + o], 1e-5) << "row " << s;
    }
  }
}

}  // namespace
