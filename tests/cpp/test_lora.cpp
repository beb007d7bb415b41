// moe_linear with a stacked LoRA adapter (row += scale * (x[src] . A[e]^T) . B[e]^T, base weight frozen) and the
// MoE block with gate_up_lora / down_lora, against a float64 reference that lives here; the reference itself is
// checked by finite differences and by merging the adapter into the weight (W + scale * B.A, formed in tests only).
// The plan comes from the reference, so routing_plan is not under test. With the CUDA backend and a GPU, the same
// cases run on the device too.
#include <cmath>
#include <cstring>
#include <deque>

#include "common.h"
#include "reference.h"

#ifdef MOEFUSE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace {

using namespace mt;

constexpr double kScale = 0.75;  // lora_alpha / r: any value that is not 1 catches a missing or doubled scale

// ---- float64 reference --------------------------------------------------------------------------------------------
struct LoraDims {
  std::int64_t n_in, n_out, r;
};

// Visits each routed sorted row s of expert e with its pair p, token t and source row of x.
template <class F>
void for_each_row(const ref::Plan& plan, bool gather, F f) {
  for (int e = 0; e < plan.E; ++e)
    for (int s = plan.offsets[e]; s < plan.offsets[e + 1]; ++s) {
      const int p = plan.sorted_pairs[s];
      f(e, s, p, p / plan.k, gather ? p / plan.k : s);
    }
}

// u = A[e] . x_row  ([r])
Vec down_proj(const Vec& A, const double* x, int e, const LoraDims& d) {
  Vec u(d.r, 0.0);
  for (std::int64_t j = 0; j < d.r; ++j)
    for (std::int64_t i = 0; i < d.n_in; ++i) u[j] += A[(e * d.r + j) * d.n_in + i] * x[i];
  return u;
}

// The adapter's part of moe_linear_forward, laid out like ref::linear_forward's result.
Vec lora_forward(const ref::Plan& plan, const Vec& x, const Vec& A, const Vec& B, const LoraDims& d, bool gather,
                 const Vec* combine) {
  Vec out((combine ? plan.T : plan.T * plan.k) * d.n_out, 0.0);
  for_each_row(plan, gather, [&](int e, int s, int p, std::int64_t t, std::int64_t src) {
    const Vec u = down_proj(A, &x[src * d.n_in], e, d);
    for (std::int64_t o = 0; o < d.n_out; ++o) {
      double delta = 0;
      for (std::int64_t j = 0; j < d.r; ++j) delta += B[(e * d.n_out + o) * d.r + j] * u[j];
      delta *= kScale;
      if (combine)
        out[t * d.n_out + o] += (*combine)[p] * delta;
      else
        out[s * d.n_out + o] = delta;
    }
  });
  return out;
}

struct LoraGradsRef {
  Vec x, a, b, combine;  // combine empty without combine weights
};

// The adapter's part of the gradients of <grad_out, forward>.
LoraGradsRef lora_backward(const ref::Plan& plan, const Vec& x, const Vec& A, const Vec& B, const LoraDims& d,
                           bool gather, const Vec* combine, const Vec& grad_out) {
  LoraGradsRef g{Vec(x.size(), 0.0), Vec(A.size(), 0.0), Vec(B.size(), 0.0), Vec(combine ? combine->size() : 0, 0.0)};
  for_each_row(plan, gather, [&](int e, int s, int p, std::int64_t t, std::int64_t src) {
    const double* xs = &x[src * d.n_in];
    const double* go = combine ? &grad_out[t * d.n_out] : &grad_out[s * d.n_out];
    const double w = combine ? (*combine)[p] : 1.0;
    const Vec u = down_proj(A, xs, e, d);
    Vec gb(d.r, 0.0);  // unweighted grad_out row . B[e]
    for (std::int64_t o = 0; o < d.n_out; ++o)
      for (std::int64_t j = 0; j < d.r; ++j) {
        gb[j] += go[o] * B[(e * d.n_out + o) * d.r + j];
        g.b[(e * d.n_out + o) * d.r + j] += kScale * w * go[o] * u[j];
      }
    for (std::int64_t j = 0; j < d.r; ++j) {
      const double du = kScale * w * gb[j];
      for (std::int64_t i = 0; i < d.n_in; ++i) {
        g.a[(e * d.r + j) * d.n_in + i] += du * xs[i];
        g.x[src * d.n_in + i] += du * A[(e * d.r + j) * d.n_in + i];
      }
      if (combine) g.combine[p] += kScale * gb[j] * u[j];
    }
  });
  return g;
}

// W + scale * B.A per expert: weight [E, out, in], A [E, r, in], B [E, out, r].
Vec merged(const Vec& W, const Vec& A, const Vec& B, std::int64_t E, const LoraDims& d) {
  Vec m = W;
  for (std::int64_t e = 0; e < E; ++e)
    for (std::int64_t o = 0; o < d.n_out; ++o)
      for (std::int64_t j = 0; j < d.r; ++j)
        for (std::int64_t i = 0; i < d.n_in; ++i)
          m[(e * d.n_out + o) * d.n_in + i] +=
              kScale * B[(e * d.n_out + o) * d.r + j] * A[(e * d.r + j) * d.n_in + i];
  return m;
}

// Chain rule through the merge: dA[e] = scale * B[e]^T . dW[e], dB[e] = scale * dW[e] . A[e]^T.
void through_merge(const Vec& dW, const Vec& A, const Vec& B, std::int64_t E, const LoraDims& d, Vec& dA, Vec& dB) {
  dA.assign(A.size(), 0.0);
  dB.assign(B.size(), 0.0);
  for (std::int64_t e = 0; e < E; ++e)
    for (std::int64_t o = 0; o < d.n_out; ++o)
      for (std::int64_t j = 0; j < d.r; ++j)
        for (std::int64_t i = 0; i < d.n_in; ++i) {
          const double w = dW[(e * d.n_out + o) * d.n_in + i];
          dA[(e * d.r + j) * d.n_in + i] += kScale * B[(e * d.n_out + o) * d.r + j] * w;
          dB[(e * d.n_out + o) * d.r + j] += kScale * w * A[(e * d.r + j) * d.n_in + i];
        }
}

Vec add(Vec a, const Vec& b) {
  for (std::size_t i = 0; i < a.size(); ++i) a[i] += b[i];
  return a;
}

// ---- moe_linear with an adapter -----------------------------------------------------------------------------------
struct LoraCase {
  std::int64_t T;
  int k, E;
  std::int64_t n_in, n_out, r;
  bool placeholders, gather, combine;
  DType dtype;
};

std::vector<LoraCase> lora_cases() {
  struct Shape {
    std::int64_t T;
    int k, E;
    std::int64_t n_in, n_out, r;
    bool placeholders;
  };
  const Shape shapes[] = {{1, 1, 1, 24, 10, 1, false},   {7, 2, 3, 37, 17, 3, true},  {7, 1, 60, 37, 17, 16, false},
                          {100, 2, 60, 24, 10, 16, true}, {100, 1, 3, 96, 48, 8, true}, {0, 2, 3, 37, 17, 4, false},
                          // several 64-row chunks an expert, a part-filled column tile, rank padded to 32 / 64
                          {300, 3, 5, 200, 136, 24, true}, {150, 2, 4, 64, 56, 48, false}};
  std::vector<LoraCase> cases;
  for (DType dt : kFloatTypes)
    for (const auto& s : shapes)
      for (bool gather : {false, true})
        for (bool combine : {false, true})
          cases.push_back({s.T, s.k, s.E, s.n_in, s.n_out, s.r, s.placeholders, gather, combine, dt});
  return cases;
}

std::string case_name(const ::testing::TestParamInfo<LoraCase>& i) {
  const auto& c = i.param;
  return std::string(name(c.dtype)) + "_T" + std::to_string(c.T) + "_k" + std::to_string(c.k) + "_E" +
         std::to_string(c.E) + "_" + std::to_string(c.n_in) + "to" + std::to_string(c.n_out) + "_r" +
         std::to_string(c.r) + (c.placeholders ? "_ph" : "") + (c.gather ? "_gather" : "") +
         (c.combine ? "_combine" : "");
}

// Which gradients a backward computes.
struct Want {
  bool x, a, b, cw;
};
constexpr Want kAll{true, true, true, true};

// One case's inputs, rounded to the storage dtype; the Vec members hold exactly what the tensors hold.
struct Inputs {
  Inputs(const LoraCase& c_, Rng& rng)
      : c(c_),
        M(c.T * c.k),
        d{c.n_in, c.n_out, c.r},
        plan(ref::routing_plan(random_ids(rng, c.T, c.k, c.E, c.placeholders), c.T, c.k, c.E)),
        pt(plan_tensors(plan)),
        x_v(rng.normals((c.gather ? c.T : M) * c.n_in)),
        w_v(rng.normals(c.E * c.n_out * c.n_in, 1 / std::sqrt(double(c.n_in)))),
        a_v(rng.normals(c.E * c.r * c.n_in, 1 / std::sqrt(double(c.n_in)))),
        b_v(rng.normals(c.E * c.n_out * c.r, 1 / std::sqrt(double(c.r)))),
        cw_v(rng.normals(c.T * c.k)),
        gout_v(rng.normals((c.combine ? c.T : M) * c.n_out)),
        x(make(c.dtype, {c.gather ? c.T : M, c.n_in}, x_v)),
        w(make(c.dtype, {c.E, c.n_out, c.n_in}, w_v)),
        a(make(c.dtype, {c.E, c.r, c.n_in}, a_v)),
        b(make(c.dtype, {c.E, c.n_out, c.r}, b_v)),
        cw(make(DType::f32, {c.T, c.k}, cw_v)),
        gout(make(c.dtype, {c.combine ? c.T : M, c.n_out}, gout_v)) {}

  moefuse::Lora lora() const { return {a.view(), b.view(), static_cast<float>(kScale)}; }
  TensorView cw_view() const { return c.combine ? cw.view() : TensorView{}; }
  const Vec* cw_ptr() const { return c.combine ? &cw_v : nullptr; }
  Tensor zero_weight() const {
    Vec zeros(w_v.size(), 0.0);
    return make(c.dtype, {c.E, c.n_out, c.n_in}, zeros);
  }

  Vec ref_forward(const Vec& weight) const {
    return add(ref::linear_forward(plan, x_v, weight, c.n_out, c.n_in, c.gather, cw_ptr()),
               lora_forward(plan, x_v, a_v, b_v, d, c.gather, cw_ptr()));
  }
  LoraGradsRef ref_backward(const Vec& weight) const {
    auto base = ref::linear_backward(plan, x_v, weight, c.n_out, c.n_in, c.gather, cw_ptr(), gout_v);
    auto g = lora_backward(plan, x_v, a_v, b_v, d, c.gather, cw_ptr(), gout_v);
    g.x = add(g.x, base.x);
    if (c.combine) g.combine = add(g.combine, base.combine);
    return g;
  }

  LoraCase c;
  std::int64_t M;
  LoraDims d;
  ref::Plan plan;
  PlanTensors pt;
  Vec x_v, w_v, a_v, b_v, cw_v, gout_v;
  Tensor x, w, a, b, cw, gout;
};

Tensor forward(const Inputs& in, const Tensor& weight, const moefuse::Lora& lora) {
  const auto& c = in.c;
  Tensor out(c.dtype, {c.combine ? c.T : in.M, c.n_out});  // poisoned: the op must write every element
  auto plan = in.pt.plan();
  Tensor ws =
      scratch(moefuse::moe_linear_workspace_bytes(plan, in.x.view(), weight.view(), lora, c.gather, in.cw_view()));
  moefuse::moe_linear_forward(plan, in.x.view(), weight.view(), lora, c.gather, in.cw_view(), out.view(), ws.view());
  return out;
}
Tensor forward(const Inputs& in, const Tensor& weight) { return forward(in, weight, in.lora()); }

struct Grads {
  Tensor x, a, b, cw;
};
// Gradients not asked for stay absent (and their tensors poisoned).
Grads backward(const Inputs& in, const Tensor& weight, Want want, const moefuse::Lora& lora) {
  const auto& c = in.c;
  Grads g{Tensor(c.dtype, {c.gather ? c.T : in.M, c.n_in}), Tensor(c.dtype, {c.E, c.r, c.n_in}),
          Tensor(c.dtype, {c.E, c.n_out, c.r}), Tensor(DType::f32, {c.T, c.k})};
  auto plan = in.pt.plan();
  auto pick = [](bool on, const Tensor& t) { return on ? t.view() : TensorView{}; };
  Tensor ws = scratch(moefuse::moe_linear_backward_workspace_bytes(plan, in.x.view(), weight.view(), lora, c.gather,
                                                                   in.cw_view()));
  moefuse::moe_linear_backward(plan, in.x.view(), weight.view(), lora, c.gather, in.cw_view(), in.gout.view(),
                               pick(want.x, g.x), {pick(want.a, g.a), pick(want.b, g.b)},
                               pick(want.cw && c.combine, g.cw), ws.view());
  return g;
}
Grads backward(const Inputs& in, const Tensor& weight, Want want) { return backward(in, weight, want, in.lora()); }

// Experts that got no rows must get exact zeros, not merely small values.
void expect_zero_for_idle_experts(const Inputs& in, const Vec& grad, std::int64_t per_expert, const char* what) {
  for (int e = 0; e < in.c.E; ++e) {
    if (in.plan.counts[e] > 0) continue;
    for (std::int64_t i = 0; i < per_expert; ++i)
      ASSERT_EQ(grad[e * per_expert + i], 0.0) << what << " of idle expert " << e << " at " << i;
  }
}

class MoeLora : public ::testing::TestWithParam<LoraCase> {};

TEST_P(MoeLora, ForwardMatchesReference) {
  Rng rng;
  Inputs in(GetParam(), rng);
  const DType dt = in.c.dtype;
  EXPECT_CLOSE(forward(in, in.w).values(), in.ref_forward(in.w_v), tol(dt));
  // With a zero base weight the result is the adapter's part alone, so a wrong delta cannot hide under the base.
  Tensor zero = in.zero_weight();
  EXPECT_CLOSE(forward(in, zero).values(), lora_forward(in.plan, in.x_v, in.a_v, in.b_v, in.d, in.c.gather, in.cw_ptr()),
               tol(dt));
}

TEST_P(MoeLora, BackwardMatchesReference) {
  Rng rng;
  Inputs in(GetParam(), rng);
  const auto& c = in.c;
  for (bool zero_base : {false, true}) {
    SCOPED_TRACE(zero_base ? "zero base weight" : "random base weight");
    Tensor zero = in.zero_weight();
    const Tensor& weight = zero_base ? zero : in.w;
    Grads g = backward(in, weight, kAll);
    auto r = zero_base ? lora_backward(in.plan, in.x_v, in.a_v, in.b_v, in.d, c.gather, in.cw_ptr(), in.gout_v)
                       : in.ref_backward(in.w_v);
    EXPECT_CLOSE(g.x.values(), r.x, tol(c.dtype));
    EXPECT_CLOSE(g.a.values(), r.a, tol(c.dtype));
    EXPECT_CLOSE(g.b.values(), r.b, tol(c.dtype));
    if (c.combine) {
      EXPECT_CLOSE(g.cw.values(), r.combine, tol(c.dtype));
    }
    expect_zero_for_idle_experts(in, g.a.values(), c.r * c.n_in, "grad_lora.a");
    expect_zero_for_idle_experts(in, g.b.values(), c.n_out * c.r, "grad_lora.b");
  }
}

// lora.u: the forward leaves u = scale * x[src] . A[e]^T there (placeholder rows zero), and the backward that reads
// it instead of recomputing it gives the same gradients.
TEST_P(MoeLora, SavedRowsServeTheBackward) {
  Rng rng;
  Inputs in(GetParam(), rng);
  const auto& c = in.c;
  Tensor u(c.dtype, {in.M, c.r});  // poisoned
  moefuse::Lora lora = in.lora();
  lora.u = u.view();
  EXPECT_CLOSE(forward(in, in.w, lora).values(), in.ref_forward(in.w_v), tol(c.dtype));
  Vec u_ref(static_cast<std::size_t>(in.M * c.r), 0.0);
  for_each_row(in.plan, c.gather, [&](int e, int s, int, std::int64_t, std::int64_t src) {
    const Vec v = down_proj(in.a_v, &in.x_v[src * c.n_in], e, in.d);
    for (std::int64_t j = 0; j < c.r; ++j) u_ref[s * c.r + j] = kScale * v[j];
  });
  EXPECT_CLOSE(u.values(), u_ref, tol(c.dtype));
  Grads g = backward(in, in.w, kAll, lora);
  auto r = in.ref_backward(in.w_v);
  EXPECT_CLOSE(g.x.values(), r.x, tol(c.dtype));
  EXPECT_CLOSE(g.a.values(), r.a, tol(c.dtype));
  EXPECT_CLOSE(g.b.values(), r.b, tol(c.dtype));
  if (c.combine) {
    EXPECT_CLOSE(g.cw.values(), r.combine, tol(c.dtype));
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, MoeLora, ::testing::ValuesIn(lora_cases()), case_name);

// The reference backward is the gradient of <grad_out, forward>: the loss is linear in each single element, so
// central differences are exact up to rounding.
TEST(LoraReference, MatchesFiniteDifferences) {
  for (bool gather : {false, true})
    for (bool combine : {false, true}) {
      SCOPED_TRACE(std::string(gather ? "gather" : "sorted") + (combine ? " combine" : ""));
      LoraCase c{5, 2, 3, 6, 5, 2, true, gather, combine, DType::f32};
      Rng rng(std::to_string(gather) + std::to_string(combine));
      Inputs in(c, rng);
      auto r = in.ref_backward(in.w_v);
      auto numeric = [&](Vec& param) {
        Vec g(param.size());
        const double h = 1e-4;
        for (std::size_t i = 0; i < param.size(); ++i) {
          const double keep = param[i];
          double loss[2];
          for (int side = 0; side < 2; ++side) {
            param[i] = keep + (side ? -h : h);
            const Vec out = in.ref_forward(in.w_v);
            loss[side] = 0;
            for (std::size_t o = 0; o < out.size(); ++o) loss[side] += in.gout_v[o] * out[o];
          }
          param[i] = keep;
          g[i] = (loss[0] - loss[1]) / (2 * h);
        }
        return g;
      };
      EXPECT_CLOSE(r.x, numeric(in.x_v), 1e-9);
      EXPECT_CLOSE(r.a, numeric(in.a_v), 1e-9);
      EXPECT_CLOSE(r.b, numeric(in.b_v), 1e-9);
      if (combine) {
        EXPECT_CLOSE(r.combine, numeric(in.cw_v), 1e-9);
      }
    }
}

// The adapter equals its merge into the weight: forward, grad_x and grad_combine_weights of the base op on
// W + scale * B.A, and the adapter's gradients are the merged weight's gradient taken through the merge.
TEST(LoraMerged, MatchesBaseOpOnMergedWeight) {
  for (bool gather : {false, true})
    for (bool combine : {false, true}) {
      SCOPED_TRACE(std::string(gather ? "gather" : "sorted") + (combine ? " combine" : ""));
      LoraCase c{40, 2, 5, 37, 17, 4, true, gather, combine, DType::f32};
      Rng rng(std::to_string(gather) + std::to_string(combine));
      Inputs in(c, rng);
      Vec m_v = merged(in.w_v, in.a_v, in.b_v, c.E, in.d);
      Tensor m = make(c.dtype, {c.E, c.n_out, c.n_in}, m_v);
      auto plan = in.pt.plan();

      Tensor out_m(c.dtype, {c.combine ? c.T : in.M, c.n_out});
      Tensor ws = scratch(moefuse::moe_linear_workspace_bytes(plan, in.x.view(), m.view(), c.gather, in.cw_view()));
      moefuse::moe_linear_forward(plan, in.x.view(), m.view(), c.gather, in.cw_view(), out_m.view(), ws.view());
      EXPECT_CLOSE(forward(in, in.w).values(), out_m.values(), 1e-5);

      Tensor gx_m(c.dtype, {c.gather ? c.T : in.M, c.n_in}), gw_m(c.dtype, {c.E, c.n_out, c.n_in}),
          gcw_m(DType::f32, {c.T, c.k});
      Tensor bws = scratch(
          moefuse::moe_linear_backward_workspace_bytes(plan, in.x.view(), m.view(), c.gather, in.cw_view()));
      moefuse::moe_linear_backward(plan, in.x.view(), m.view(), c.gather, in.cw_view(), in.gout.view(), gx_m.view(),
                                   gw_m.view(), c.combine ? gcw_m.view() : TensorView{}, bws.view());
      Grads g = backward(in, in.w, kAll);
      EXPECT_CLOSE(g.x.values(), gx_m.values(), 1e-5);
      if (combine) {
        EXPECT_CLOSE(g.cw.values(), gcw_m.values(), 1e-5);
      }
      Vec da, db;
      through_merge(gw_m.values(), in.a_v, in.b_v, c.E, in.d, da, db);
      EXPECT_CLOSE(g.a.values(), da, 1e-5);
      EXPECT_CLOSE(g.b.values(), db, 1e-5);
    }
}

// Each gradient asked for alone equals the one computed with all of them; asking for none is fine.
TEST(LoraEdge, GradientSubsets) {
  for (bool gather : {false, true}) {
    LoraCase c{33, 2, 5, 37, 17, 3, true, gather, true, DType::f32};
    Rng rng(std::to_string(gather));
    Inputs in(c, rng);
    Grads all = backward(in, in.w, kAll);
    EXPECT_EQ(backward(in, in.w, {true, false, false, false}).x.values(), all.x.values());
    EXPECT_EQ(backward(in, in.w, {false, true, false, false}).a.values(), all.a.values());
    EXPECT_EQ(backward(in, in.w, {false, false, true, false}).b.values(), all.b.values());
    EXPECT_EQ(backward(in, in.w, {false, false, false, true}).cw.values(), all.cw.values());
    EXPECT_NO_THROW(backward(in, in.w, {false, false, false, false}));
  }
}

// Running twice gives the same bits (no accumulation across calls, no order-dependent sums).
TEST(LoraEdge, Repeatable) {
  LoraCase c{50, 2, 7, 24, 10, 4, true, true, true, DType::bf16};
  Rng rng;
  Inputs in(c, rng);
  EXPECT_EQ(forward(in, in.w).values(), forward(in, in.w).values());
  Grads g1 = backward(in, in.w, kAll), g2 = backward(in, in.w, kAll);
  EXPECT_EQ(g1.x.values(), g2.x.values());
  EXPECT_EQ(g1.a.values(), g2.a.values());
  EXPECT_EQ(g1.b.values(), g2.b.values());
  EXPECT_EQ(g1.cw.values(), g2.cw.values());
}

// ---- bad arguments ------------------------------------------------------------------------------------------------
TEST(LoraErrors, BadAdapters) {
  LoraCase c{7, 2, 3, 24, 10, 4, false, true, true, DType::f32};
  Rng rng;
  Inputs in(c, rng);
  auto plan = in.pt.plan();
  Tensor out(c.dtype, {c.T, c.n_out});
  Tensor ws = scratch(1 << 20);
  auto fwd = [&](const moefuse::Lora& l) {
    moefuse::moe_linear_forward(plan, in.x.view(), in.w.view(), l, c.gather, in.cw_view(), out.view(), ws.view());
  };
  auto size = [&](const moefuse::Lora& l) {
    moefuse::moe_linear_workspace_bytes(plan, in.x.view(), in.w.view(), l, c.gather, in.cw_view());
  };
  const float s = static_cast<float>(kScale);
  Tensor b_rank(c.dtype, {c.E, c.n_out, c.r + 1}), a_experts(c.dtype, {c.E + 1, c.r, c.n_in}),
      b_experts(c.dtype, {c.E - 1, c.n_out, c.r}), a_in(c.dtype, {c.E, c.r, c.n_in + 1}),
      b_out(c.dtype, {c.E, c.n_out + 1, c.r}), a_bf16(DType::bf16, {c.E, c.r, c.n_in}),
      b_f16(DType::f16, {c.E, c.n_out, c.r}), a_rank0(c.dtype, {c.E, 0, c.n_in}), b_rank0(c.dtype, {c.E, c.n_out, 0});
  for (auto run : {std::function<void(const moefuse::Lora&)>(fwd), std::function<void(const moefuse::Lora&)>(size)}) {
    EXPECT_ERROR_NAMING(run({in.a.view(), b_rank.view(), s}), "lora.b");  // ranks of a and b differ
    EXPECT_ERROR_NAMING(run({a_experts.view(), in.b.view(), s}), "lora.a");
    EXPECT_ERROR_NAMING(run({in.a.view(), b_experts.view(), s}), "lora.b");
    EXPECT_ERROR_NAMING(run({a_in.view(), in.b.view(), s}), "lora.a");
    EXPECT_ERROR_NAMING(run({in.a.view(), b_out.view(), s}), "lora.b");
    EXPECT_ERROR_NAMING(run({a_bf16.view(), in.b.view(), s}), "lora.a");
    EXPECT_ERROR_NAMING(run({in.a.view(), b_f16.view(), s}), "lora.b");
    EXPECT_ERROR_NAMING(run({a_rank0.view(), b_rank0.view(), s}), "lora.a");
    // Only one factor: core's message reads "lora needs both a and b, got a ... and b ...".
    EXPECT_ERROR_NAMING(run({in.a.view(), TensorView{}, s}), "lora");
    EXPECT_ERROR_NAMING(run({TensorView{}, in.b.view(), s}), "lora");
  }
  // Saved rows of the wrong count, rank or dtype.
  Tensor u_rows(c.dtype, {in.M + 1, c.r}), u_rank(c.dtype, {in.M, c.r + 1}), u_bf16(DType::bf16, {in.M, c.r});
  for (const Tensor* u : {&u_rows, &u_rank, &u_bf16}) {
    EXPECT_ERROR_NAMING(fwd({in.a.view(), in.b.view(), s, u->view()}), "lora.u");
    EXPECT_ERROR_NAMING(size({in.a.view(), in.b.view(), s, u->view()}), "lora.u");
  }
}

TEST(LoraErrors, BadGradients) {
  LoraCase c{7, 2, 3, 24, 10, 4, false, true, true, DType::f32};
  Rng rng;
  Inputs in(c, rng);
  auto plan = in.pt.plan();
  Tensor gx(c.dtype, {c.T, c.n_in}), ga(c.dtype, {c.E, c.r, c.n_in}), gb(c.dtype, {c.E, c.n_out, c.r});
  Tensor ga_bad(c.dtype, {c.E, c.r + 1, c.n_in}), gb_bad(DType::bf16, {c.E, c.n_out, c.r});
  Tensor ws = scratch(1 << 20);
  auto bwd = [&](const moefuse::Lora& l, const moefuse::LoraGrads& g) {
    moefuse::moe_linear_backward(plan, in.x.view(), in.w.view(), l, c.gather, in.cw_view(), in.gout.view(), gx.view(),
                                 g, TensorView{}, ws.view());
  };
  EXPECT_ERROR_NAMING(bwd(in.lora(), {ga_bad.view(), gb.view()}), "grad_lora.a");
  EXPECT_ERROR_NAMING(bwd(in.lora(), {ga.view(), gb_bad.view()}), "grad_lora.b");
  EXPECT_ERROR_NAMING(bwd(moefuse::Lora{}, {ga.view(), gb.view()}), "grad_lora");
  EXPECT_NO_THROW(bwd(in.lora(), {ga.view(), gb.view()}));
}

// ---- the MoE block with adapters ----------------------------------------------------------------------------------
struct BlockLoraCase {
  std::int64_t T, H, I;
  int E, k;
  std::int64_t r_up, r_down;
  DType dtype;
};

// A block with adapters on both projections, and the same block with the adapters merged in float64.
struct LoraBlock {
  LoraBlock(const BlockLoraCase& c_, Rng& rng)
      : c(c_),
        b{c.T, c.H, c.I, c.E, c.k, true},
        up{c.H, 2 * c.I, c.r_up},
        down{c.I, c.H, c.r_down},
        p{rng.normals(c.T * c.H), rng.normals(c.E * c.H, 1 / std::sqrt(double(c.H))),
          rng.normals(c.E * 2 * c.I * c.H, 1 / std::sqrt(double(c.H))),
          rng.normals(c.E * c.H * c.I, 1 / std::sqrt(double(c.I)))},
        a_up_v(rng.normals(c.E * c.r_up * c.H, 1 / std::sqrt(double(c.H)))),
        b_up_v(rng.normals(c.E * 2 * c.I * c.r_up, 1 / std::sqrt(double(c.r_up)))),
        a_down_v(rng.normals(c.E * c.r_down * c.I, 1 / std::sqrt(double(c.I)))),
        b_down_v(rng.normals(c.E * c.H * c.r_down, 1 / std::sqrt(double(c.r_down)))),
        x(make(c.dtype, {c.T, c.H}, p.x)),
        router(make(c.dtype, {c.E, c.H}, p.router)),
        gate_up(make(c.dtype, {c.E, 2 * c.I, c.H}, p.gate_up)),
        down_w(make(c.dtype, {c.E, c.H, c.I}, p.down)),
        a_up(make(c.dtype, {c.E, c.r_up, c.H}, a_up_v)),
        b_up(make(c.dtype, {c.E, 2 * c.I, c.r_up}, b_up_v)),
        a_down(make(c.dtype, {c.E, c.r_down, c.I}, a_down_v)),
        b_down(make(c.dtype, {c.E, c.H, c.r_down}, b_down_v)),
        merged_p{p.x, p.router, merged(p.gate_up, a_up_v, b_up_v, c.E, up), merged(p.down, a_down_v, b_down_v, c.E, down)},
        out(c.dtype, {c.T, c.H}),
        logits(c.dtype, {c.T, c.E}),
        saved(scratch(moefuse::moe_saved_bytes(config(), c.T, c.dtype))) {}

  moefuse::MoeConfig config() const { return {c.H, c.I, c.E, c.k, true}; }
  moefuse::MoeWeights weights() const {
    moefuse::MoeWeights w = weights_of(router.view(), gate_up.view(), down_w.view());
    const float s = static_cast<float>(kScale);
    w.gate_up_lora = {a_up.view(), b_up.view(), s};
    w.down_lora = {a_down.view(), b_down.view(), s};
    return w;
  }

  void forward() {
    Tensor ws = scratch(moefuse::moe_forward_workspace_bytes(config(), x.view(), weights()));
    moefuse::moe_forward(config(), x.view(), weights(), out.view(), logits.view(), saved.view(), ws.view());
  }

  struct Result {
    Vec x, router, a_up, b_up, a_down, b_down;
  };
  Result backward(const Tensor& grad_out) const {
    Tensor gx(c.dtype, {c.T, c.H}), gr(c.dtype, {c.E, c.H}), gau(c.dtype, {c.E, c.r_up, c.H}),
        gbu(c.dtype, {c.E, 2 * c.I, c.r_up}), gad(c.dtype, {c.E, c.r_down, c.I}), gbd(c.dtype, {c.E, c.H, c.r_down});
    moefuse::MoeGrads g = grads_of(gx.view(), gr.view(), TensorView{}, TensorView{});
    g.gate_up_lora = {gau.view(), gbu.view()};
    g.down_lora = {gad.view(), gbd.view()};
    Tensor ws = scratch(moefuse::moe_backward_workspace_bytes(config(), x.view(), weights(), g));
    moefuse::moe_backward(config(), x.view(), weights(), logits.view(), saved.view(), grad_out.view(), TensorView{}, g,
                          ws.view());
    return {gx.values(), gr.values(), gau.values(), gbu.values(), gad.values(), gbd.values()};
  }

  BlockLoraCase c;
  ref::Block b;
  LoraDims up, down;
  ref::BlockParams p;
  Vec a_up_v, b_up_v, a_down_v, b_down_v;
  Tensor x, router, gate_up, down_w, a_up, b_up, a_down, b_down;
  ref::BlockParams merged_p;
  Tensor out, logits, saved;
};

class MoeBlockLora : public ::testing::TestWithParam<BlockLoraCase> {};

// A run of the block (out, and the gradients for grad_out gout_v) against the float64 block on the merged weights,
// routed on the run's own logits (as in test_block).
void expect_matches_merged(const LoraBlock& blk, const Vec& logits, const Vec& out, const Vec& gout_v,
                           const LoraBlock::Result& g) {
  const BlockLoraCase& c = blk.c;
  auto r = ref::block_forward(blk.b, blk.merged_p, &logits);
  EXPECT_CLOSE(out, r.out, tol(c.dtype));
  auto rg = ref::block_backward(blk.b, blk.merged_p, logits, gout_v, nullptr);
  EXPECT_CLOSE(g.x, rg.x, tol(c.dtype));
  EXPECT_CLOSE(g.router, rg.router, tol(c.dtype));
  Vec da, db;
  through_merge(rg.gate_up, blk.a_up_v, blk.b_up_v, c.E, blk.up, da, db);
  EXPECT_CLOSE(g.a_up, da, tol(c.dtype));
  EXPECT_CLOSE(g.b_up, db, tol(c.dtype));
  through_merge(rg.down, blk.a_down_v, blk.b_down_v, c.E, blk.down, da, db);
  EXPECT_CLOSE(g.a_down, da, tol(c.dtype));
  EXPECT_CLOSE(g.b_down, db, tol(c.dtype));
}

TEST_P(MoeBlockLora, MatchesBlockOnMergedWeights) {
  const auto c = GetParam();
  Rng rng;
  LoraBlock blk(c, rng);
  blk.forward();
  Vec gout_v = rng.normals(c.T * c.H);
  Tensor gout = make(c.dtype, {c.T, c.H}, gout_v);
  auto g = blk.backward(gout);
  expect_matches_merged(blk, blk.logits.values(), blk.out.values(), gout_v, g);

  if (c.dtype != DType::f32) return;
  // The library block on the merged weights (rounded to f32) agrees too.
  Tensor mg = make(c.dtype, {c.E, 2 * c.I, c.H}, blk.merged_p.gate_up), md = make(c.dtype, {c.E, c.H, c.I}, blk.merged_p.down);
  auto w = weights_of(blk.router.view(), mg.view(), md.view());
  Tensor out(c.dtype, {c.T, c.H}), logits(c.dtype, {c.T, c.E}), saved = scratch(moefuse::moe_saved_bytes(blk.config(), c.T, c.dtype));
  Tensor ws = scratch(moefuse::moe_forward_workspace_bytes(blk.config(), blk.x.view(), w));
  moefuse::moe_forward(blk.config(), blk.x.view(), w, out.view(), logits.view(), saved.view(), ws.view());
  EXPECT_CLOSE(blk.out.values(), out.values(), 1e-5);
  Tensor gx(c.dtype, {c.T, c.H}), gr(c.dtype, {c.E, c.H});
  auto grads = grads_of(gx.view(), gr.view(), TensorView{}, TensorView{});
  Tensor bws = scratch(moefuse::moe_backward_workspace_bytes(blk.config(), blk.x.view(), w, grads));
  moefuse::moe_backward(blk.config(), blk.x.view(), w, logits.view(), saved.view(), gout.view(), TensorView{}, grads,
                        bws.view());
  EXPECT_CLOSE(g.x, gx.values(), 1e-5);
  EXPECT_CLOSE(g.router, gr.values(), 1e-5);
}

std::vector<BlockLoraCase> block_cases() {
  std::vector<BlockLoraCase> cases;
  for (DType dt : kFloatTypes)
    for (BlockLoraCase c : std::initializer_list<BlockLoraCase>{{33, 37, 17, 8, 2, 4, 3, dt},
                                                                {9, 24, 10, 60, 8, 16, 1, dt},  // idle experts
                                                                {5, 24, 10, 1, 1, 2, 2, dt},
                                                                {0, 24, 10, 3, 2, 4, 4, dt}})
      cases.push_back(c);
  return cases;
}

std::string block_case_name(const ::testing::TestParamInfo<BlockLoraCase>& i) {
  const auto& c = i.param;
  return std::string(name(c.dtype)) + "_T" + std::to_string(c.T) + "_H" + std::to_string(c.H) + "_I" +
         std::to_string(c.I) + "_E" + std::to_string(c.E) + "_k" + std::to_string(c.k) + "_r" +
         std::to_string(c.r_up) + "_" + std::to_string(c.r_down);
}

INSTANTIATE_TEST_SUITE_P(Cases, MoeBlockLora, ::testing::ValuesIn(block_cases()), block_case_name);

// An expert weight with an adapter is frozen: asking for its gradient is an error.
TEST(MoeBlockLoraErrors, FrozenBase) {
  BlockLoraCase c{7, 24, 10, 3, 2, 4, 3, DType::f32};
  Rng rng;
  LoraBlock blk(c, rng);
  blk.forward();
  Tensor gout(c.dtype, {c.T, c.H}), gx(c.dtype, {c.T, c.H}), gg(c.dtype, {c.E, 2 * c.I, c.H}), gd(c.dtype, {c.E, c.H, c.I});
  auto run = [&](const moefuse::MoeGrads& g) {
    Tensor ws = scratch(moefuse::moe_backward_workspace_bytes(blk.config(), blk.x.view(), blk.weights(), g));
    moefuse::moe_backward(blk.config(), blk.x.view(), blk.weights(), blk.logits.view(), blk.saved.view(), gout.view(),
                          TensorView{}, g, ws.view());
  };
  EXPECT_THROW(run(grads_of(gx.view(), TensorView{}, gg.view(), TensorView{})), moefuse::Error);
  EXPECT_THROW(run(grads_of(gx.view(), TensorView{}, TensorView{}, gd.view())), moefuse::Error);
}

// ---- adapters in other layouts and dtypes (PEFT's) -------------------------------------------------------------
// f32 storage of `v` [E, d1, d2] with the expert dim fastest, as PEFT's lora_B [out, r*E] holds [E, out, r]; the
// view reads it as [E, d1, d2].
struct ExpertMinor {
  ExpertMinor(const Vec& v, std::int64_t E, std::int64_t d1, std::int64_t d2) : storage(DType::f32, {d1, d2, E}) {
    Vec t(v.size());
    for (std::int64_t e = 0; e < E; ++e)
      for (std::int64_t i = 0; i < d1 * d2; ++i) t[i * E + e] = v[e * d1 * d2 + i];
    storage.set(t);
    view = storage.view();
    view.shape[0] = E, view.shape[1] = d1, view.shape[2] = d2;
    view.stride[0] = 1, view.stride[1] = d2 * E, view.stride[2] = E;
  }
  Tensor storage;
  TensorView view;
};

// Values of an expert-minor view, in [E, d1, d2] order.
Vec expert_major(const Vec& storage, const TensorView& v) {
  Vec out(storage.size());
  const std::int64_t per_expert = v.shape[1] * v.shape[2];
  for (std::int64_t e = 0; e < v.shape[0]; ++e)
    for (std::int64_t i = 0; i < per_expert; ++i) out[e * per_expert + i] = storage[i * v.shape[0] + e];
  return out;
}

// The block given f32 adapters as expert-minor views over bf16 weights, against the same adapters rounded to bf16
// and contiguous: the same bits out, and gradients of the same values (written cast, through the workspace). The
// adapters are fresh f32 values, so the staging's rounding is under test too. Again with rooms for the staged b's
// (Lora::staged_b), whose originals `poison` (0xff bytes: NaN) overwrites between forward and backward: the backward
// must read b where the forward kept it. `to_device` copies a host view to where the block runs; `values` reads one
// back. The default case has odd sizes; sizes in multiples of 8 let the CUDA copies run in 16-byte pieces.
constexpr BlockLoraCase kOddStaging{33, 37, 17, 8, 2, 4, 3, DType::bf16};

template <class ToDevice, class Values, class Poison>
void expect_staged_adapters_match(ToDevice to_device, Values values, Poison poison, BlockLoraCase c = kOddStaging) {
  Rng rng;
  LoraBlock blk(c, rng);
  const Vec raw[4] = {rng.normals(c.E * c.r_up * c.H, 0.2), rng.normals(c.E * 2 * c.I * c.r_up, 0.2),
                      rng.normals(c.E * c.r_down * c.I, 0.2), rng.normals(c.E * c.H * c.r_down, 0.2)};
  Tensor* rounded[4] = {&blk.a_up, &blk.b_up, &blk.a_down, &blk.b_down};
  const std::int64_t dims[4][2] = {{c.r_up, c.H}, {2 * c.I, c.r_up}, {c.r_down, c.I}, {c.H, c.r_down}};
  std::vector<ExpertMinor> f32;
  for (int i = 0; i < 4; ++i) {
    rounded[i]->set(raw[i]);
    f32.emplace_back(raw[i], c.E, dims[i][0], dims[i][1]);
  }
  const moefuse::MoeConfig cfg = blk.config();
  std::deque<Tensor> host;  // what the views handed to to_device point at
  auto fresh = [&](Tensor t) { return to_device(host.emplace_back(std::move(t)).view()); };
  Vec gout_v = rng.normals(c.T * c.H);
  const TensorView x = to_device(blk.x.view()), gout = fresh(make(c.dtype, {c.T, c.H}, gout_v));
  // Runs the block with adapters `l` (gate_up's a, b, down's a, b) and adapter gradients `g`, with `keep` the staged
  // b's kept; returns out, grad_x.
  auto run = [&](const TensorView (&l)[4], const TensorView (&g)[4], bool keep = false) {
    moefuse::MoeWeights w = weights_of(to_device(blk.router.view()), to_device(blk.gate_up.view()),
                                       to_device(blk.down_w.view()));
    w.gate_up_lora = {l[0], l[1], static_cast<float>(kScale)};
    w.down_lora = {l[2], l[3], static_cast<float>(kScale)};
    if (keep) {
      w.gate_up_lora.staged_b = fresh(Tensor(c.dtype, {c.E, 2 * c.I, c.r_up}));
      w.down_lora.staged_b = fresh(Tensor(c.dtype, {c.E, c.H, c.r_down}));
    }
    const TensorView out = fresh(Tensor(c.dtype, {c.T, c.H})), gx = fresh(Tensor(c.dtype, {c.T, c.H})),
                     logits = fresh(Tensor(c.dtype, {c.T, c.E})),
                     saved = fresh(scratch(moefuse::moe_saved_bytes(cfg, c.T, c.dtype)));
    const TensorView fws = fresh(scratch(moefuse::moe_forward_workspace_bytes(cfg, x, w)));
    moefuse::moe_forward(cfg, x, w, out, logits, saved, fws);
    if (keep) poison(l[1]), poison(l[3]);
    moefuse::MoeGrads grads = grads_of(gx, TensorView{}, TensorView{}, TensorView{});
    grads.gate_up_lora = {g[0], g[1]};
    grads.down_lora = {g[2], g[3]};
    moefuse::moe_backward(cfg, x, w, logits, saved, gout, TensorView{}, grads,
                          fresh(scratch(moefuse::moe_backward_workspace_bytes(cfg, x, w, grads))));
    return std::pair{values(out), values(gx)};
  };
  TensorView contiguous[4], contiguous_grads[4], strided[4], strided_grads[4], kept_grads[4];
  std::deque<ExpertMinor> grads_f32;
  for (int i = 0; i < 4; ++i) {
    contiguous[i] = to_device(rounded[i]->view());
    contiguous_grads[i] = fresh(Tensor(c.dtype, {c.E, dims[i][0], dims[i][1]}));
    strided[i] = to_device(f32[i].view);
    strided_grads[i] = to_device(grads_f32.emplace_back(Vec(raw[i].size(), std::nan("")), c.E, dims[i][0],
                                                        dims[i][1]).view);
    kept_grads[i] = to_device(grads_f32.emplace_back(Vec(raw[i].size(), std::nan("")), c.E, dims[i][0],
                                                     dims[i][1]).view);
  }
  const auto want = run(contiguous, contiguous_grads);
  const auto got = run(strided, strided_grads), kept = run(strided, kept_grads, true);  // kept last: it poisons b
  for (const auto* r : {&got, &kept}) {
    SCOPED_TRACE(r == &kept ? "staged b kept" : "staged b in the workspace");
    EXPECT_EQ(r->first, want.first);
    EXPECT_EQ(r->second, want.second);
    const TensorView* grads = r == &kept ? kept_grads : strided_grads;
    for (int i = 0; i < 4; ++i) {
      SCOPED_TRACE(i);
      EXPECT_EQ(expert_major(values(grads[i]), grads[i]), values(contiguous_grads[i]));
    }
  }
}

TEST(MoeBlockLoraStaging, StridedF32AdaptersMatchContiguous) {
  expect_staged_adapters_match([](const TensorView& v) { return v; }, [](const TensorView& v) { return values(v); },
                               [](const TensorView& v) { std::memset(v.data, 0xff, v.nbytes()); });
}

// Adapters and gradients the staging cannot take are errors that name them.
TEST(MoeBlockLoraStaging, BadAdapters) {
  BlockLoraCase c{7, 24, 10, 3, 2, 4, 3, DType::bf16};
  Rng rng;
  LoraBlock blk(c, rng);
  Vec v = rng.normals(c.E * 2 * c.I * c.r_up);
  ExpertMinor b(v, c.E, 2 * c.I, c.r_up);
  auto forward = [&](TensorView a, TensorView bv, TensorView staged_b = {}) {
    moefuse::MoeWeights w = blk.weights();
    w.gate_up_lora.a = a;
    w.gate_up_lora.b = bv;
    w.gate_up_lora.staged_b = staged_b;
    moefuse::moe_forward_workspace_bytes(blk.config(), blk.x.view(), w);
  };
  EXPECT_NO_THROW(forward(blk.a_up.view(), b.view));
  TensorView ints = b.view;
  ints.dtype = DType::i32;
  EXPECT_ERROR_NAMING(forward(blk.a_up.view(), ints), "gate_up_lora.b");
  TensorView flat = b.view;
  flat.ndim = 2;
  EXPECT_ERROR_NAMING(forward(blk.a_up.view(), flat), "gate_up_lora.b");
  TensorView wrong_rank = b.view;
  wrong_rank.shape[2] = c.r_up + 1;
  EXPECT_ERROR_NAMING(forward(blk.a_up.view(), wrong_rank), "gate_up_lora.b");
  TensorView fewer_experts = blk.a_up.view();
  fewer_experts.shape[0] = c.E - 1;
  EXPECT_ERROR_NAMING(forward(fewer_experts, b.view), "gate_up_lora.a");
  TensorView wrong_input = blk.a_up.view();
  wrong_input.shape[2] = c.H - 1;
  EXPECT_ERROR_NAMING(forward(wrong_input, b.view), "gate_up_lora.a");
  moefuse::MoeWeights short_down = blk.weights();
  short_down.down_lora.b.shape[1] = c.I;  // down's out is H
  EXPECT_ERROR_NAMING(moefuse::moe_forward_workspace_bytes(blk.config(), blk.x.view(), short_down), "down_lora.b");
  // A room for the staged b: b's shape, contiguous, in the weights' dtype.
  Tensor room(c.dtype, {c.E, 2 * c.I, c.r_up}), short_room(c.dtype, {c.E, 2 * c.I - 1, c.r_up}),
      f32_room(DType::f32, {c.E, 2 * c.I, c.r_up});
  EXPECT_NO_THROW(forward(blk.a_up.view(), b.view, room.view()));
  EXPECT_ERROR_NAMING(forward(blk.a_up.view(), b.view, short_room.view()), "gate_up_lora.staged_b");
  EXPECT_ERROR_NAMING(forward(blk.a_up.view(), b.view, f32_room.view()), "gate_up_lora.staged_b");
  EXPECT_ERROR_NAMING(forward(blk.a_up.view(), b.view, b.view), "gate_up_lora.staged_b");

  // Gradients: shaped like their adapter, never overlapping themselves.
  blk.forward();
  Tensor gout(c.dtype, {c.T, c.H}), gx(c.dtype, {c.T, c.H});
  auto backward = [&](TensorView ga) {
    moefuse::MoeGrads g = grads_of(gx.view(), TensorView{}, TensorView{}, TensorView{});
    g.gate_up_lora.a = ga;
    Tensor ws = scratch(moefuse::moe_backward_workspace_bytes(blk.config(), blk.x.view(), blk.weights(), g));
    moefuse::moe_backward(blk.config(), blk.x.view(), blk.weights(), blk.logits.view(), blk.saved.view(), gout.view(),
                          TensorView{}, g, ws.view());
  };
  Tensor ga(DType::f32, {c.E, c.r_up, c.H});
  EXPECT_NO_THROW(backward(ga.view()));
  TensorView overlapping = ga.view();
  overlapping.stride[0] = 1;
  EXPECT_ERROR_NAMING(backward(overlapping), "grads.gate_up_lora.a");
  TensorView misshapen = ga.view();
  misshapen.shape[1] = c.r_up - 1;
  EXPECT_ERROR_NAMING(backward(misshapen), "grads.gate_up_lora.a");
}

// ---- the CUDA backend against the same reference --------------------------------------------------------------------
#ifdef MOEFUSE_WITH_CUDA

int cuda_devices() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

// Device buffers of one test, freed at its end.
class DeviceArena {
 public:
  ~DeviceArena() {
    for (void* p : ptrs_) cudaFree(p);
  }
  // A device copy of a host view (or, with copy = false, a poisoned buffer of its shape).
  TensorView copy(const TensorView& host, bool copy = true) {
    void* p = nullptr;
    EXPECT_EQ(cudaMalloc(&p, std::max<std::size_t>(host.nbytes(), 256)), cudaSuccess);
    ptrs_.push_back(p);
    if (copy)
      EXPECT_EQ(cudaMemcpy(p, host.data, host.nbytes(), cudaMemcpyHostToDevice), cudaSuccess);
    else
      EXPECT_EQ(cudaMemset(p, 0xff, host.nbytes()), cudaSuccess);
    TensorView v = host;
    v.data = p;
    v.device = Device::cuda(0);
    return v;
  }
  TensorView opt(const TensorView& host) { return host.defined() ? copy(host) : TensorView{}; }
  TensorView workspace(std::size_t bytes) { return copy(scratch(bytes).view(), false); }

 private:
  std::vector<void*> ptrs_;
};

Vec device_values(const TensorView& d) {
  std::vector<std::int64_t> shape(d.shape, d.shape + d.ndim);
  Tensor host(d.dtype, shape);
  EXPECT_EQ(cudaMemcpy(host.data(), d.data, d.nbytes(), cudaMemcpyDeviceToHost), cudaSuccess);
  return host.values();
}

moefuse::Plan device_plan(DeviceArena& arena, const moefuse::Plan& h) {
  moefuse::Plan p = h;
  p.counts = arena.copy(h.counts);
  p.offsets = arena.copy(h.offsets);
  p.sorted_pairs = arena.copy(h.sorted_pairs);
  p.pair_positions = arena.copy(h.pair_positions);
  p.invalid = arena.copy(h.invalid);
  return p;
}

TEST_P(MoeLora, CudaMatchesReference) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
  Rng rng;
  Inputs in(GetParam(), rng);
  const auto& c = in.c;
  DeviceArena arena;
  const moefuse::Plan plan = device_plan(arena, in.pt.plan());
  const TensorView x = arena.copy(in.x.view()), w = arena.copy(in.w.view()), cw = arena.opt(in.cw_view()),
                   gout = arena.copy(in.gout.view());
  const moefuse::Lora lora{arena.copy(in.a.view()), arena.copy(in.b.view()), static_cast<float>(kScale)};

  const TensorView out = arena.copy(Tensor(c.dtype, {c.combine ? c.T : in.M, c.n_out}).view(), false);
  moefuse::moe_linear_forward(plan, x, w, lora, c.gather, cw, out,
                              arena.workspace(moefuse::moe_linear_workspace_bytes(plan, x, w, lora, c.gather, cw)));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_CLOSE(device_values(out), in.ref_forward(in.w_v), tol(c.dtype));

  auto r = in.ref_backward(in.w_v);
  const std::size_t bytes = moefuse::moe_linear_backward_workspace_bytes(plan, x, w, lora, c.gather, cw);
  Vec first[4];
  for (int run = 0; run < 2; ++run) {  // the second run must give the same bits
    const TensorView gx = arena.copy(Tensor(c.dtype, {c.gather ? c.T : in.M, c.n_in}).view(), false),
                     ga = arena.copy(in.a.view(), false), gb = arena.copy(in.b.view(), false),
                     gcw = c.combine ? arena.copy(in.cw.view(), false) : TensorView{};
    moefuse::moe_linear_backward(plan, x, w, lora, c.gather, cw, gout, gx, {ga, gb}, gcw, arena.workspace(bytes));
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    Vec got[4] = {device_values(gx), device_values(ga), device_values(gb), c.combine ? device_values(gcw) : Vec{}};
    if (run == 0) {
      EXPECT_CLOSE(got[0], r.x, tol(c.dtype));
      EXPECT_CLOSE(got[1], r.a, tol(c.dtype));
      EXPECT_CLOSE(got[2], r.b, tol(c.dtype));
      if (c.combine) {
        EXPECT_CLOSE(got[3], r.combine, tol(c.dtype));
      }
      expect_zero_for_idle_experts(in, got[1], c.r * c.n_in, "grad_lora.a");
      expect_zero_for_idle_experts(in, got[2], c.n_out * c.r, "grad_lora.b");
      for (int i = 0; i < 4; ++i) first[i] = got[i];
    } else {
      for (int i = 0; i < 4; ++i) EXPECT_EQ(got[i], first[i]) << "gradient " << i << " differs between runs";
    }
  }
}

// The block's weights and adapters on the device; u_up and u_down, where given, are the rows each adapter's forward
// keeps for its backward (Lora::u).
moefuse::MoeWeights device_weights(DeviceArena& arena, const LoraBlock& blk, const TensorView& u_up = {},
                                   const TensorView& u_down = {}) {
  moefuse::MoeWeights w = weights_of(arena.copy(blk.router.view()), arena.copy(blk.gate_up.view()),
                                     arena.copy(blk.down_w.view()));
  const float s = static_cast<float>(kScale);
  w.gate_up_lora = {arena.copy(blk.a_up.view()), arena.copy(blk.b_up.view()), s, u_up};
  w.down_lora = {arena.copy(blk.a_down.view()), arena.copy(blk.b_down.view()), s, u_down};
  return w;
}

// The block with adapters on both projections at sizes the Hopper forms take (multiples of 8, ranks up to 64, where
// the down projection's row pass also sums the up adapter's grad B), against the float64 block.
TEST(MoeBlockLora, CudaMatchesBlockOnMergedWeights) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
  for (DType dt : {DType::bf16, DType::f16})
    for (const BlockLoraCase& c : {BlockLoraCase{300, 64, 136, 12, 4, 16, 24, dt},  // I = 136: a part-filled slice
                                   BlockLoraCase{40, 128, 72, 60, 8, 40, 16, dt},   // idle experts, rank 40
                                   BlockLoraCase{1, 64, 64, 5, 1, 8, 64, dt}}) {    // one token, top_k = 1
      SCOPED_TRACE(std::string(name(dt)) + " T" + std::to_string(c.T) + " I" + std::to_string(c.I));
      Rng rng;
      LoraBlock blk(c, rng);
      DeviceArena arena;
      const moefuse::MoeConfig cfg = blk.config();
      const moefuse::MoeWeights w = device_weights(arena, blk);
      const TensorView x = arena.copy(blk.x.view()), out = arena.copy(blk.out.view(), false),
                       logits = arena.copy(blk.logits.view(), false), saved = arena.copy(blk.saved.view(), false);
      moefuse::moe_forward(cfg, x, w, out, logits, saved,
                           arena.workspace(moefuse::moe_forward_workspace_bytes(cfg, x, w)));

      Vec gout_v = rng.normals(c.T * c.H);
      const TensorView gout = arena.copy(make(c.dtype, {c.T, c.H}, gout_v).view());
      const TensorView gx = arena.copy(blk.x.view(), false), gr = arena.copy(blk.router.view(), false),
                       gau = arena.copy(blk.a_up.view(), false), gbu = arena.copy(blk.b_up.view(), false),
                       gad = arena.copy(blk.a_down.view(), false), gbd = arena.copy(blk.b_down.view(), false);
      moefuse::MoeGrads g = grads_of(gx, gr, TensorView{}, TensorView{});
      g.gate_up_lora = {gau, gbu};
      g.down_lora = {gad, gbd};
      moefuse::moe_backward(cfg, x, w, logits, saved, gout, TensorView{}, g,
                            arena.workspace(moefuse::moe_backward_workspace_bytes(cfg, x, w, g)));
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      expect_matches_merged(blk, device_values(logits), device_values(out), gout_v,
                            {device_values(gx), device_values(gr), device_values(gau), device_values(gbu),
                             device_values(gad), device_values(gbd)});
    }
}

// The block's step with the forward's rows u kept for the backward, as the torch ops keep them (the other block
// tests form u again): against the float64 block on a stream of the caller's, and captured in a CUDA graph (which a
// host sync would break) whose replay gives the same bits.
TEST(MoeBlockLora, CudaKeptRowsStepReplaysFromAGraph) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
  const BlockLoraCase c{300, 64, 136, 12, 4, 16, 24, DType::bf16};
  Rng rng;
  LoraBlock blk(c, rng);
  DeviceArena arena;
  const moefuse::MoeConfig cfg = blk.config();
  const auto kept_rows = [&](std::int64_t r) { return arena.copy(Tensor(c.dtype, {c.T * c.k, r}).view(), false); };
  const moefuse::MoeWeights w = device_weights(arena, blk, kept_rows(c.r_up), kept_rows(c.r_down));
  Vec gout_v = rng.normals(c.T * c.H);
  const TensorView x = arena.copy(blk.x.view()), gout = arena.copy(make(c.dtype, {c.T, c.H}, gout_v).view());
  const TensorView outputs[] = {arena.copy(blk.out.view(), false),    arena.copy(blk.logits.view(), false),
                                arena.copy(blk.x.view(), false),      arena.copy(blk.router.view(), false),
                                arena.copy(blk.a_up.view(), false),   arena.copy(blk.b_up.view(), false),
                                arena.copy(blk.a_down.view(), false), arena.copy(blk.b_down.view(), false)};
  const TensorView &out = outputs[0], &logits = outputs[1], saved = arena.copy(blk.saved.view(), false);
  moefuse::MoeGrads g = grads_of(outputs[2], outputs[3], TensorView{}, TensorView{});
  g.gate_up_lora = {outputs[4], outputs[5]};
  g.down_lora = {outputs[6], outputs[7]};
  const TensorView fws = arena.workspace(moefuse::moe_forward_workspace_bytes(cfg, x, w)),
                   bws = arena.workspace(moefuse::moe_backward_workspace_bytes(cfg, x, w, g));
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  const auto step = [&] {
    moefuse::moe_forward(cfg, x, w, out, logits, saved, fws, stream);
    moefuse::moe_backward(cfg, x, w, logits, saved, gout, TensorView{}, g, bws, stream);
  };
  step();
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  std::vector<Vec> eager;
  for (const TensorView& o : outputs) eager.push_back(device_values(o));
  expect_matches_merged(blk, eager[1], eager[0], gout_v, {eager[2], eager[3], eager[4], eager[5], eager[6], eager[7]});

  for (const TensorView& o : outputs) ASSERT_EQ(cudaMemset(o.data, 0xff, o.nbytes()), cudaSuccess);
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  step();
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  for (std::size_t i = 0; i < eager.size(); ++i) EXPECT_EQ(device_values(outputs[i]), eager[i]) << "output " << i;
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

TEST(MoeBlockLoraStaging, CudaStridedF32AdaptersMatchContiguous) {
  if (cuda_devices() == 0) GTEST_SKIP() << "no CUDA device";
  DeviceArena arena;  // copies a strided view's storage and keeps its strides
  for (const BlockLoraCase& c : {kOddStaging, BlockLoraCase{33, 32, 16, 8, 2, 8, 16, DType::bf16}}) {
    SCOPED_TRACE(c.H);
    expect_staged_adapters_match([&](const TensorView& v) { return arena.copy(v); }, device_values,
                                 [](const TensorView& v) { EXPECT_EQ(cudaMemset(v.data, 0xff, v.nbytes()), cudaSuccess); },
                                 c);
  }
}

#endif  // MOEFUSE_WITH_CUDA

}  // namespace
