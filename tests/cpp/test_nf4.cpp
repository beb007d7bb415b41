// 4-bit expert weights (nf4_quantize / nf4_dequantize, and the ops taking them): the packed bytes against a float64
// reading of the format (ops.h), on odd shapes and every float dtype; the block and moe_fused_linear with 4-bit
// weights against the same ops given their dequantized copies, which must agree to the bit (on the CPU the ops
// dequantize, then run the float path); non-finite runs; bad arguments.
#include <cmath>
#include <cstring>

#include "common.h"

namespace {

using namespace mt;

// The 16 levels of the format, as the QLoRA paper lists them.
constexpr double kLevels[16] = {-1.0,
                                -0.6961928009986877,
                                -0.5250730514526367,
                                -0.39491748809814453,
                                -0.28444138169288635,
                                -0.18477343022823334,
                                -0.09105003625154495,
                                0.0,
                                0.07958029955625534,
                                0.16093020141124725,
                                0.24611230194568634,
                                0.33791524171829224,
                                0.44070982933044434,
                                0.5626170039176941,
                                0.7229568362236023,
                                1.0};

struct Shape {
  std::int64_t E, out, in;
};

// A packed weight read back as the format says: index of element i of row r, and the maximum of its run.
struct Packed {
  Shape s;
  std::vector<std::uint8_t> bytes;
  std::int64_t row_bytes() const { return moefuse::nf4_row_bytes(s.in); }
  std::int64_t index_bytes() const { return (s.in + 1) / 2 + 15 - ((s.in + 1) / 2 + 15) % 16; }
  int index(std::int64_t r, std::int64_t i) const {
    const std::uint8_t b = bytes[r * row_bytes() + i / 2];
    return i % 2 ? b & 15 : b >> 4;
  }
  double max(std::int64_t r, std::int64_t run) const {
    float m;
    std::memcpy(&m, &bytes[r * row_bytes() + index_bytes() + 4 * run], 4);
    return m;
  }
};

Packed quantize(const Tensor& w, Shape s) {
  Tensor packed(DType::u8, {s.E, s.out, moefuse::nf4_row_bytes(s.in)});
  packed.poison();
  moefuse::nf4_quantize(w.view(), packed.view());
  const auto* p = static_cast<const std::uint8_t*>(packed.data());
  return {s, std::vector<std::uint8_t>(p, p + packed.numel())};
}

Tensor packed_tensor(const Packed& p) {
  Tensor t(DType::u8, {p.s.E, p.s.out, p.row_bytes()});
  std::memcpy(t.data(), p.bytes.data(), p.bytes.size());
  return t;
}

// Calls f(dtype, shape, weights) for every float dtype and odd shape, with fresh weights per shape.
template <class F>
void for_each_case(F f) {
  for (DType dt : kFloatTypes)
    for (const Shape& s : std::initializer_list<Shape>{{3, 5, 200}, {2, 3, 1}, {1, 4, 63}, {4, 7, 129}, {2, 2, 64},
                                                       {1, 1, 24}}) {
      SCOPED_TRACE(std::string(name(dt)) + " in=" + std::to_string(s.in));
      Rng rng(std::to_string(s.in));
      f(dt, s, rng.normals(s.E * s.out * s.in, 0.05));
    }
}

TEST(Nf4, RowBytes) {
  EXPECT_EQ(moefuse::nf4_row_bytes(2048), 1024 + 128);  // 30B: H
  EXPECT_EQ(moefuse::nf4_row_bytes(768), 384 + 48);     // 30B: I
  EXPECT_EQ(moefuse::nf4_row_bytes(1), 16 + 16);
  EXPECT_EQ(moefuse::nf4_row_bytes(129), 80 + 16);
  EXPECT_ERROR_NAMING(moefuse::nf4_row_bytes(0), "in");
}

// Each element's index is a level nearest to w / m (m: its run's |max|, kept exactly), in the documented nibble,
// and every padding byte is zero.
TEST(Nf4, QuantizeMatchesFormat) {
  for_each_case([](DType dt, const Shape& s, Vec w) {
    const Tensor wt = make(dt, {s.E, s.out, s.in}, w);
    const Packed p = quantize(wt, s);
    for (std::int64_t r = 0; r < s.E * s.out; ++r) {
      for (std::int64_t run = 0; run * 64 < s.in; ++run) {
        double m = 0;
        const std::int64_t end = std::min(s.in, run * 64 + 64);
        for (std::int64_t i = run * 64; i < end; ++i) m = std::max(m, std::abs(w[r * s.in + i]));
        ASSERT_EQ(p.max(r, run), m) << "row " << r << " run " << run;
        for (std::int64_t i = run * 64; i < end; ++i) {
          const double v = w[r * s.in + i] / m;
          double best = 2;
          for (double l : kLevels) best = std::min(best, std::abs(v - l));
          ASSERT_LE(std::abs(v - kLevels[p.index(r, i)]), best + 1e-6) << "row " << r << " element " << i;
        }
      }
      const std::uint8_t* row = &p.bytes[r * p.row_bytes()];
      if (s.in % 2) {
        ASSERT_EQ(row[s.in / 2] & 15, 0) << "the last byte's free nibble, row " << r;
      }
      for (std::int64_t b = (s.in + 1) / 2; b < p.row_bytes(); ++b) {
        if (b >= p.index_bytes() && b < p.index_bytes() + 4 * ((s.in + 63) / 64)) continue;  // the maxima
        ASSERT_EQ(row[b], 0) << "padding byte " << b << " of row " << r;
      }
    }
  });
}

// Element 2i in the high nibble: [-1, 1, 0, 0.5625] packs as levels 0 and 15, then 7 and 13.
TEST(Nf4, NibbleOrder) {
  Vec w = {-1.0, 1.0, 0.0, 0.5625};
  const Packed p = quantize(make(DType::f32, {1, 1, 4}, w), {1, 1, 4});
  EXPECT_EQ(p.bytes[0], 0x0F);
  EXPECT_EQ(p.bytes[1], 0x7D);
  EXPECT_EQ(p.max(0, 0), 1.0);
}

// Dequantized: level * m, rounded once to the dtype, every element written; a quantized dequantized weight packs to
// the same bytes.
TEST(Nf4, DequantizeIsLevelTimesMax) {
  for_each_case([](DType dt, const Shape& s, Vec w) {
    const Packed p = quantize(make(DType::f32, {s.E, s.out, s.in}, w), s);
    Tensor out(dt, {s.E, s.out, s.in});
    out.poison();
    moefuse::nf4_dequantize(packed_tensor(p).view(), out.view());
    const Vec got = out.values();
    for (std::int64_t r = 0; r < s.E * s.out; ++r)
      for (std::int64_t i = 0; i < s.in; ++i)
        ASSERT_EQ(got[r * s.in + i],
                  round_to(dt, static_cast<float>(kLevels[p.index(r, i)]) * static_cast<float>(p.max(r, i / 64))))
            << "row " << r << " element " << i;
    if (dt == DType::f32) {
      EXPECT_EQ(quantize(out, s).bytes, p.bytes);
    }
  });
}

// A run with a NaN or an Inf dequantizes to non-finite values; the other runs of its row stay exact.
TEST(Nf4, NonFiniteRunsStayNonFinite) {
  const Shape s{1, 2, 130};
  Rng rng;
  Vec w = rng.normals(s.out * s.in, 0.05);
  w[5] = std::nan("");
  w[s.in + 70] = INFINITY;
  const Packed p = quantize(make(DType::bf16, {s.E, s.out, s.in}, w), s);
  Tensor out(DType::bf16, {s.E, s.out, s.in});
  moefuse::nf4_dequantize(packed_tensor(p).view(), out.view());
  const Vec got = out.values();
  for (std::int64_t i = 0; i < 64; ++i) EXPECT_TRUE(std::isnan(got[i])) << i;
  EXPECT_TRUE(std::isinf(got[s.in + 70]));
  for (std::int64_t i = 64; i < s.in; ++i) EXPECT_TRUE(std::isfinite(got[i])) << i;
  for (std::int64_t i = 0; i < 64; ++i) EXPECT_TRUE(std::isfinite(got[s.in + i])) << i;
}

// ---- the block with 4-bit expert weights --------------------------------------------------------------------------
struct BlockCase {
  std::int64_t T, H, I;
  int E, k;
  DType dtype;
  bool lora;
};

std::string name_of(const BlockCase& c) {
  return std::string(name(c.dtype)) + "_T" + std::to_string(c.T) + "_H" + std::to_string(c.H) + "_I" +
         std::to_string(c.I) + "_E" + std::to_string(c.E) + "_k" + std::to_string(c.k) + (c.lora ? "_lora" : "");
}
MT_PRINTABLE_CASE(BlockCase)

class Nf4Block : public ::testing::TestWithParam<BlockCase> {};

// What one forward+backward of the block wrote: out, logits, grads of x and the router, and the adapters' grads.
std::vector<Vec> block_step(const BlockCase& c, const TensorView& x, const TensorView& router,
                            const TensorView& gate_up, const TensorView& down, const moefuse::Lora& up,
                            const moefuse::Lora& dn, const TensorView& gout) {
  const moefuse::MoeConfig cfg{c.H, c.I, c.E, c.k, true};
  moefuse::MoeWeights w = weights_of(router, gate_up, down);
  w.gate_up_lora = up;
  w.down_lora = dn;
  Tensor out(c.dtype, {c.T, c.H}), logits(c.dtype, {c.T, c.E}), gx(c.dtype, {c.T, c.H}), gr(c.dtype, {c.E, c.H});
  for (Tensor* t : {&out, &logits, &gx, &gr}) t->poison();
  Tensor saved = scratch(moefuse::moe_saved_bytes(cfg, c.T, c.dtype));
  Tensor fws = scratch(moefuse::moe_forward_workspace_bytes(cfg, x, w));
  moefuse::moe_forward(cfg, x, w, out.view(), logits.view(), saved.view(), fws.view());
  std::vector<Tensor> lg;
  moefuse::MoeGrads g = grads_of(gx.view(), gr.view(), TensorView{}, TensorView{});
  if (c.lora) {
    for (const TensorView& t : {up.a, up.b, dn.a, dn.b}) {
      lg.emplace_back(c.dtype, std::vector<std::int64_t>(t.shape, t.shape + 3));
      lg.back().poison();
    }
    g.gate_up_lora = {lg[0].view(), lg[1].view()};
    g.down_lora = {lg[2].view(), lg[3].view()};
  }
  Tensor bws = scratch(moefuse::moe_backward_workspace_bytes(cfg, x, w, g));
  moefuse::moe_backward(cfg, x, w, logits.view(), saved.view(), gout, TensorView{}, g, bws.view());
  std::vector<Vec> r = {out.values(), logits.values(), gx.values(), gr.values()};
  for (const Tensor& t : lg) r.push_back(t.values());
  return r;
}

TEST_P(Nf4Block, MatchesBlockOnDequantizedWeights) {
  const BlockCase c = GetParam();
  Rng rng;
  Vec xv = rng.normals(c.T * c.H), rv = rng.normals(c.E * c.H, 1 / std::sqrt(double(c.H))),
      guv = rng.normals(c.E * 2 * c.I * c.H, 1 / std::sqrt(double(c.H))),
      dv = rng.normals(c.E * c.H * c.I, 1 / std::sqrt(double(c.I))), gv = rng.normals(c.T * c.H);
  const Tensor x = make(c.dtype, {c.T, c.H}, xv), router = make(c.dtype, {c.E, c.H}, rv),
               gout = make(c.dtype, {c.T, c.H}, gv);
  const Packed pgu = quantize(make(c.dtype, {c.E, 2 * c.I, c.H}, guv), {c.E, 2 * c.I, c.H}),
               pdn = quantize(make(c.dtype, {c.E, c.H, c.I}, dv), {c.E, c.H, c.I});
  const Tensor gu4 = packed_tensor(pgu), dn4 = packed_tensor(pdn);
  Tensor gu(c.dtype, {c.E, 2 * c.I, c.H}), dn(c.dtype, {c.E, c.H, c.I});
  moefuse::nf4_dequantize(gu4.view(), gu.view());
  moefuse::nf4_dequantize(dn4.view(), dn.view());
  const std::int64_t r = 6;
  Vec av = rng.normals(c.E * r * c.H, 0.1), bv = rng.normals(c.E * 2 * c.I * r, 0.1),
      adv = rng.normals(c.E * r * c.I, 0.1), bdv = rng.normals(c.E * c.H * r, 0.1);
  const Tensor a_up = make(c.dtype, {c.E, r, c.H}, av), b_up = make(c.dtype, {c.E, 2 * c.I, r}, bv),
               a_dn = make(c.dtype, {c.E, r, c.I}, adv), b_dn = make(c.dtype, {c.E, c.H, r}, bdv);
  const moefuse::Lora up = c.lora ? moefuse::Lora{a_up.view(), b_up.view(), 0.75f} : moefuse::Lora{},
                      down = c.lora ? moefuse::Lora{a_dn.view(), b_dn.view(), 0.75f} : moefuse::Lora{};
  const auto want = block_step(c, x.view(), router.view(), gu.view(), dn.view(), up, down, gout.view());
  const auto got = block_step(c, x.view(), router.view(), gu4.view(), dn4.view(), up, down, gout.view());
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i], want[i]) << "output " << i;
  // And only one of the two weights 4-bit.
  const auto mixed = block_step(c, x.view(), router.view(), gu.view(), dn4.view(), up, down, gout.view());
  for (std::size_t i = 0; i < got.size(); ++i) EXPECT_EQ(mixed[i], want[i]) << "output " << i << " (down 4-bit)";
}

INSTANTIATE_TEST_SUITE_P(Cases, Nf4Block,
                         ::testing::Values(BlockCase{7, 24, 10, 3, 2, DType::f32, false},
                                           BlockCase{1, 37, 17, 60, 8, DType::bf16, false},  // most experts idle
                                           BlockCase{13, 96, 48, 128, 1, DType::f16, true},
                                           BlockCase{0, 24, 10, 3, 2, DType::bf16, true},
                                           BlockCase{64, 130, 67, 12, 4, DType::bf16, true}),
                         CaseName());

// ---- moe_fused_linear with a 4-bit weight ---------------------------------------------------------------------------
// The forward (gather and combine) and backward (grad_x, routing-weight gradient) on a 4-bit weight give the bits the
// same op gives on its dequantized copy; placeholders and idle experts included. grad_weight is refused.
TEST(Nf4Linear, MatchesOpsOnDequantizedWeight) {
  Rng rng;
  const std::int64_t T = 9, in = 70, out = 33;
  const int k = 2, E = 7;
  const ref::Plan plan_ref = ref::routing_plan(random_ids(rng, T, k, E, true), T, k, E);
  const PlanTensors pt = plan_tensors(plan_ref);
  const moefuse::Plan plan = pt.plan();
  for (DType d : kFloatTypes) {
    SCOPED_TRACE(name(d));
    Vec xv = rng.normals(T * in), wv = rng.normals(E * out * in, 0.1), cwv = rng.normals(T * k),
        gv = rng.normals(T * out);
    const Tensor x = make(d, {T, in}, xv), cw = make(DType::f32, {T, k}, cwv), gout = make(d, {T, out}, gv);
    const Packed p = quantize(make(d, {E, out, in}, wv), {E, out, in});
    const Tensor w4 = packed_tensor(p);
    Tensor w(d, {E, out, in});
    moefuse::nf4_dequantize(w4.view(), w.view());
    const auto step = [&](const TensorView& weight) {
      Tensor y(d, {T, out}), gx(d, {T, in}), gcw(DType::f32, {T, k});
      for (Tensor* t : {&y, &gx, &gcw}) t->poison();
      Tensor fws = scratch(moefuse::moe_linear_workspace_bytes(plan, x.view(), weight, true, cw.view()));
      moefuse::moe_linear_forward(plan, x.view(), weight, true, cw.view(), y.view(), fws.view());
      Tensor bws = scratch(moefuse::moe_linear_backward_workspace_bytes(plan, x.view(), weight, true, cw.view()));
      moefuse::moe_linear_backward(plan, x.view(), weight, true, cw.view(), gout.view(), gx.view(), TensorView{},
                                   gcw.view(), bws.view());
      return std::vector<Vec>{y.values(), gx.values(), gcw.values()};
    };
    const auto want = step(w.view()), got = step(w4.view());
    for (std::size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i], want[i]) << "output " << i;

    Tensor gw(d, {E, out, in}), gx(d, {T, in});
    Tensor bws = scratch(moefuse::moe_linear_backward_workspace_bytes(plan, x.view(), w4.view(), true, cw.view()));
    EXPECT_ERROR_NAMING(moefuse::moe_linear_backward(plan, x.view(), w4.view(), true, cw.view(), gout.view(),
                                                     gx.view(), gw.view(), TensorView{}, bws.view()),
                        "grad_weight");
    Tensor x_odd(d, {T, in + 64});  // rows of another width
    EXPECT_ERROR_NAMING(moefuse::moe_linear_workspace_bytes(plan, x_odd.view(), w4.view(), true, cw.view()),
                        "weight");
  }
}

TEST(Nf4Errors, BadArgumentsAreNamed) {
  const moefuse::MoeConfig cfg{64, 32, 4, 2, true};
  Tensor x(DType::bf16, {5, 64}), router(DType::bf16, {4, 64}), out(DType::bf16, {5, 64}), logits(DType::bf16, {5, 4});
  Tensor gu4(DType::u8, {4, 64, moefuse::nf4_row_bytes(64)}), dn4(DType::u8, {4, 64, moefuse::nf4_row_bytes(32)});
  for (Tensor* t : {&x, &router, &gu4, &dn4}) t->zero();
  const moefuse::MoeWeights w = weights_of(router.view(), gu4.view(), dn4.view());
  Tensor saved = scratch(moefuse::moe_saved_bytes(cfg, 5, DType::bf16));
  Tensor fws = scratch(moefuse::moe_forward_workspace_bytes(cfg, x.view(), w));
  moefuse::moe_forward(cfg, x.view(), w, out.view(), logits.view(), saved.view(), fws.view());  // valid

  Tensor short_rows(DType::u8, {4, 64, 32});
  EXPECT_ERROR_NAMING(
      moefuse::moe_forward_workspace_bytes(cfg, x.view(), weights_of(router.view(), short_rows.view(), dn4.view())),
      "gate_up");
  TensorView shifted = gu4.view();
  shifted.data = static_cast<char*>(shifted.data) + 4;
  EXPECT_ERROR_NAMING(moefuse::moe_forward(cfg, x.view(), weights_of(router.view(), shifted, dn4.view()), out.view(),
                                           logits.view(), saved.view(), fws.view()),
                      "gate_up");
  Tensor ggu(DType::bf16, {4, 64, 64}), gx(DType::bf16, {5, 64});
  const moefuse::MoeGrads g = grads_of(gx.view(), TensorView{}, ggu.view(), TensorView{});
  Tensor bws = scratch(moefuse::moe_backward_workspace_bytes(cfg, x.view(), w, g));
  EXPECT_ERROR_NAMING(moefuse::moe_backward(cfg, x.view(), w, logits.view(), saved.view(), out.view(), TensorView{}, g,
                                            bws.view()),
                      "grads.gate_up");

  Tensor wf(DType::f32, {2, 3, 100}), packed(DType::u8, {2, 3, moefuse::nf4_row_bytes(100)});
  wf.zero();
  moefuse::nf4_quantize(wf.view(), packed.view());  // valid
  Tensor wrong(DType::u8, {2, 3, 50});
  EXPECT_ERROR_NAMING(moefuse::nf4_quantize(wf.view(), wrong.view()), "packed");
  EXPECT_ERROR_NAMING(moefuse::nf4_dequantize(wrong.view(), wf.view()), "packed");
  Tensor wi(DType::i32, {2, 3, 100});
  EXPECT_ERROR_NAMING(moefuse::nf4_quantize(wi.view(), packed.view()), "weight");
  Tensor empty(DType::f32, {2, 3, 0});
  EXPECT_ERROR_NAMING(moefuse::nf4_quantize(empty.view(), packed.view()), "weight");
}

}  // namespace
