// Bad arguments throw moefuse::Error naming the argument. Each test first runs a valid call (so a throw below is
// caused by the one thing changed), then breaks one argument at a time. Where a mismatch is between two arguments,
// either name is accepted.
#include <cmath>
#include <utility>

#include "common.h"
#include "reference.h"

namespace {

using namespace mt;
using moefuse::Plan;

// Keeps the tensors it makes alive for the whole test; they are zero-filled (valid ids, finite floats), so only
// their dtype/shape can be what is wrong.
class Fresh {
 public:
  TensorView operator()(DType dt, std::vector<std::int64_t> shape) {
    pool_.emplace_back(dt, std::move(shape));
    pool_.back().zero();
    return pool_.back().view();
  }

 private:
  std::vector<Tensor> pool_;
};

TensorView on_cuda(TensorView v) {
  v.device = Device::cuda(0);
  return v;
}

// Same shape and data, strides of the transpose of the last two dims: not contiguous.
TensorView transposed(TensorView v) {
  std::int64_t s = v.stride[v.ndim - 1];
  v.stride[v.ndim - 1] = v.stride[v.ndim - 2];
  v.stride[v.ndim - 2] = s;
  return v;
}

// Workspace views one byte too small (or absent when none is needed, which must still work).
TensorView short_workspace(Fresh& fresh, std::size_t bytes) {
  return bytes ? fresh(DType::u8, {static_cast<std::int64_t>(bytes) - 1}) : TensorView{};
}

// ---- router -------------------------------------------------------------------------------------------------------
struct RouterArgs {
  TensorView logits;
  int k;
  TensorView ids, weights;
};

TEST(Errors, RouterForward) {
  const std::int64_t T = 4;
  const int E = 6, k = 2;
  Fresh fresh;
  RouterArgs base{fresh(DType::f32, {T, E}), k, fresh(DType::i32, {T, k}), fresh(DType::f32, {T, k})};
  auto call = [](const RouterArgs& a) { moefuse::router_forward(a.logits, a.k, true, a.ids, a.weights); };
  ASSERT_NO_THROW(call(base));
  auto with = [&](auto f) { RouterArgs a = base; f(a); return a; };

  EXPECT_ERROR_NAMING(call(with([&](auto& a) { a.logits = fresh(DType::i32, {T, E}); })), "logits");
  EXPECT_ERROR_NAMING(call(with([&](auto& a) { a.logits = transposed(a.logits); })), "logits");
  for (int bad_k : {0, -1, E + 1})
    EXPECT_ERROR_NAMING(call(with([&](auto& a) {
                          a.k = bad_k;
                          a.ids = fresh(DType::i32, {T, std::max(bad_k, 1)});
                          a.weights = fresh(DType::f32, {T, std::max(bad_k, 1)});
                        })),
                        "top_k");
  EXPECT_ERROR_NAMING(call(with([&](auto& a) { a.ids = fresh(DType::i32, {T, k + 1}); })), "topk_ids");
  EXPECT_ERROR_NAMING(call(with([&](auto& a) { a.ids = fresh(DType::f32, {T, k}); })), "topk_ids");
  EXPECT_ERROR_NAMING(call(with([&](auto& a) { a.weights = fresh(DType::bf16, {T, k}); })), "topk_weights");
  EXPECT_ERROR_NAMING(call(with([&](auto& a) { a.weights = fresh(DType::f32, {T + 1, k}); })), "topk_weights");
  EXPECT_ERROR_NAMING(call(with([&](auto& a) { a.weights = on_cuda(a.weights); })), "topk_weights", "logits");
  if (!moefuse::has_cuda()) {  // all on a device this build lacks
    EXPECT_THROW(call({on_cuda(base.logits), k, on_cuda(base.ids), on_cuda(base.weights)}), moefuse::Error);
  }
}

TEST(Errors, RouterBackward) {
  const std::int64_t T = 4;
  const int E = 6, k = 2;
  Fresh fresh;
  struct Args {
    TensorView logits, ids, grad_w, grad_logits;
  } base{fresh(DType::f32, {T, E}), fresh(DType::i32, {T, k}), fresh(DType::f32, {T, k}), fresh(DType::f32, {T, E})};
  auto call = [](const Args& a) { moefuse::router_backward(a.logits, a.ids, true, a.grad_w, a.grad_logits); };
  ASSERT_NO_THROW(call(base));
  auto with = [&](auto f) { Args a = base; f(a); return a; };

  EXPECT_ERROR_NAMING(call(with([&](auto& a) { a.grad_w = fresh(DType::f32, {T, k + 1}); })), "grad_topk_weights");
  EXPECT_ERROR_NAMING(call(with([&](auto& a) { a.grad_w = fresh(DType::bf16, {T, k}); })), "grad_topk_weights");
  EXPECT_ERROR_NAMING(call(with([&](auto& a) { a.grad_logits = fresh(DType::f32, {T, E + 1}); })), "grad_logits");
  EXPECT_ERROR_NAMING(call(with([&](auto& a) { a.grad_logits = fresh(DType::i32, {T, E}); })), "grad_logits");
  EXPECT_ERROR_NAMING(call(with([&](auto& a) { a.ids = fresh(DType::f32, {T, k}); })), "topk_ids");
  EXPECT_ERROR_NAMING(call(with([&](auto& a) { a.logits = fresh(DType::f32, {T + 1, E}); })), "logits", "topk_ids",
                      "grad_logits");
  EXPECT_ERROR_NAMING(call(with([&](auto& a) { a.grad_logits = transposed(a.grad_logits); })), "grad_logits");
}

// ---- routing plan -------------------------------------------------------------------------------------------------
TEST(Errors, RoutingPlan) {
  const std::int64_t T = 5;
  const int k = 2, E = 4;
  Fresh fresh;
  Tensor ids(DType::i32, {T, k});
  ids.set(Ints{0, 1, 2, 3, 1, 0, 3, 2, 0, 9});
  PlanTensors pt(T, k, E);
  struct Args {
    TensorView ids;
    Plan plan;
    TensorView ws;  // absent: sized from the query
  };
  auto call = [&](Args a) {
    std::size_t bytes = moefuse::routing_plan_workspace_bytes(a.plan, a.ids);
    Tensor ws = scratch(bytes);
    moefuse::routing_plan(a.ids, a.plan, a.ws.defined() ? a.ws : ws.view());
  };
  Args base{ids.view(), pt.plan(), {}};
  ASSERT_NO_THROW(call(base));
  auto with = [&](auto f) { Args a = base; f(a); return a; };

  Tensor negative(DType::i32, {T, k});
  negative.set(Ints{0, 1, 2, 3, 1, -1, 3, 2, 0, 1});
  EXPECT_ERROR_NAMING(call(with([&](auto& a) { a.ids = negative.view(); })), "topk_ids", "negative");
  EXPECT_ERROR_NAMING(call(with([&](auto& a) { a.ids = fresh(DType::f32, {T, k}); })), "topk_ids");
  EXPECT_ERROR_NAMING(call(with([&](auto& a) { a.ids = fresh(DType::i32, {T + 1, k}); })), "topk_ids", "tokens",
                      "plan");
  EXPECT_ERROR_NAMING(call(with([&](auto& a) { a.ids = fresh(DType::i32, {T, k + 1}); })), "topk_ids", "top_k",
                      "plan");
  EXPECT_ERROR_NAMING(call(with([&](auto& a) { a.plan.counts = fresh(DType::i32, {E + 1}); })), "counts");
  EXPECT_ERROR_NAMING(call(with([&](auto& a) { a.plan.offsets = fresh(DType::f32, {E + 1}); })), "offsets");
  EXPECT_ERROR_NAMING(call(with([&](auto& a) { a.plan.sorted_pairs = fresh(DType::i32, {T * k + 1}); })),
                      "sorted_pairs");
  EXPECT_ERROR_NAMING(call(with([&](auto& a) { a.plan.pair_positions = fresh(DType::i32, {T * k - 1}); })),
                      "pair_positions");
  EXPECT_ERROR_NAMING(call(with([&](auto& a) { a.plan.invalid = fresh(DType::i32, {2}); })), "invalid");
  EXPECT_ERROR_NAMING(call(with([&](auto& a) { a.plan.sorted_pairs = on_cuda(a.plan.sorted_pairs); })),
                      "sorted_pairs", "topk_ids");
  std::size_t bytes = moefuse::routing_plan_workspace_bytes(base.plan, base.ids);
  if (bytes > 0) {
    EXPECT_ERROR_NAMING(call(with([&](auto& a) { a.ws = short_workspace(fresh, bytes); })), "workspace");
  }
}

// ---- moe_linear ---------------------------------------------------------------------------------------------------
struct LinearArgs {
  Plan plan;
  TensorView x, w, cw, out;
  bool gather = true;
  TensorView ws;  // absent: sized from the query
};

class LinearErrors : public ::testing::Test {
 protected:
  static constexpr std::int64_t T = 5, k = 2, E = 3, n_in = 7, n_out = 4, M = T * k;
  LinearErrors() : pt(plan_tensors(ref::routing_plan(Ints{0, 1, 2, 0, 1, 1, 2, 2, 0, 5}, T, k, E))) {
    base = {pt.plan(),
            fresh(DType::bf16, {T, n_in}),
            fresh(DType::bf16, {E, n_out, n_in}),
            fresh(DType::f32, {T, k}),
            fresh(DType::bf16, {T, n_out}),
            true,
            {}};
  }
  static void forward(LinearArgs a) {
    Tensor ws = scratch(moefuse::moe_linear_workspace_bytes(a.plan, a.x, a.w, a.gather, a.cw));
    moefuse::moe_linear_forward(a.plan, a.x, a.w, a.gather, a.cw, a.out, a.ws.defined() ? a.ws : ws.view());
  }
  template <class F>
  LinearArgs with(F f) {
    LinearArgs a = base;
    f(a);
    return a;
  }
  PlanTensors pt;
  Fresh fresh;
  LinearArgs base;
};

TEST_F(LinearErrors, Forward) {
  ASSERT_NO_THROW(forward(base));
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.w = fresh(DType::bf16, {E, n_out, n_in + 1}); })), "weight", "x");
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.w = fresh(DType::bf16, {E + 1, n_out, n_in}); })), "weight",
                      "experts", "plan");
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.w = fresh(DType::f32, {E, n_out, n_in}); })), "weight", "x");
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.w = transposed(a.w); })), "weight");
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) {
                        a.w = fresh(DType::bf16, {E, n_out, 0});
                        a.x = fresh(DType::bf16, {T, 0});
                      })),
                      "weight", "input feature");
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) {
                        a.w = fresh(DType::bf16, {E, 0, n_in});
                        a.out = fresh(DType::bf16, {T, 0});
                      })),
                      "weight", "output");
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.x = fresh(DType::i32, {T, n_in}); })), "x");
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.x = fresh(DType::bf16, {T + 1, n_in}); })), "x");
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) {
                        a.gather = false;  // x must then hold the M sorted rows
                        a.x = fresh(DType::bf16, {T, n_in});
                      })),
                      "x");
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.out = fresh(DType::bf16, {T, n_out + 1}); })), "out");
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.out = fresh(DType::bf16, {M, n_out}); })), "out");
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.out = fresh(DType::f16, {T, n_out}); })), "out");
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.cw = fresh(DType::bf16, {T, k}); })), "combine_weights");
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.cw = fresh(DType::f32, {T, k + 1}); })), "combine_weights");
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.out = on_cuda(a.out); })), "out", "x");
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.plan.offsets = fresh(DType::i32, {E}); })), "offsets");
  std::size_t bytes = moefuse::moe_linear_workspace_bytes(base.plan, base.x, base.w, true, base.cw);
  if (bytes > 0) {
    EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.ws = short_workspace(fresh, bytes); })), "workspace");
  }
}

// A plan routing_plan could not have made (built by hand, or changed since) is refused on the CPU before any row is
// read or written through it; a garbage plan once sent the forward past its buffers and into a hang.
TEST_F(LinearErrors, PlanContents) {
  const ref::Plan good = ref::routing_plan(Ints{0, 1, 2, 0, 1, 1, 2, 2, 0, 5}, T, k, E);  // offsets 0, 3, 6, 9
  const auto refused = [&](auto corrupt, const char* what) {
    PlanTensors bad = plan_tensors(good);
    corrupt(static_cast<std::int32_t*>(bad.offsets.data()), static_cast<std::int32_t*>(bad.sorted_pairs.data()));
    EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.plan = bad.plan(); })), "plan", what, "routing_plan");
  };
  refused([](std::int32_t* off, std::int32_t*) { off[0] = 1; }, "offsets[0]");
  refused([](std::int32_t* off, std::int32_t*) { std::swap(off[1], off[2]); }, "offsets[2]");
  refused([](std::int32_t* off, std::int32_t*) { off[E] = M + 1; }, "exceeds");
  refused([](std::int32_t*, std::int32_t* pairs) { pairs[4] = -1; }, "sorted_pairs[4]");
  refused([](std::int32_t*, std::int32_t* pairs) { pairs[4] = M; }, "sorted_pairs[4]");
  refused([](std::int32_t*, std::int32_t* pairs) { pairs[5] = pairs[4]; }, "sorted_pairs[5]");
}

TEST_F(LinearErrors, SwigluForward) {
  const std::int64_t I = n_out / 2;
  auto run = [&](TensorView w, TensorView h, TensorView a) {
    Tensor ws = scratch(moefuse::moe_linear_workspace_bytes(base.plan, base.x, base.w, true, TensorView{}));
    moefuse::moe_linear_swiglu_forward(base.plan, base.x, w, h, a, ws.view());
  };
  TensorView h = fresh(DType::bf16, {M, 2 * I}), a = fresh(DType::bf16, {M, I});
  ASSERT_NO_THROW(run(base.w, h, a));
  EXPECT_ERROR_NAMING(run(fresh(DType::bf16, {E, 2 * I + 1, n_in}), fresh(DType::bf16, {M, 2 * I + 1}), a), "weight",
                      "gate");
  EXPECT_ERROR_NAMING(run(base.w, fresh(DType::bf16, {T, 2 * I}), a), "h");
  EXPECT_ERROR_NAMING(run(base.w, h, fresh(DType::bf16, {M, I + 1})), "a", "h");
  EXPECT_ERROR_NAMING(run(base.w, h, fresh(DType::f16, {M, I})), "a", "h");
  EXPECT_ERROR_NAMING(run(base.w, fresh(DType::f32, {M, 2 * I}), fresh(DType::f32, {M, I})), "h");
}

TEST_F(LinearErrors, SwigluBackward) {
  const std::int64_t I = n_in;
  TensorView h = fresh(DType::bf16, {M, 2 * I}), gout = fresh(DType::bf16, {T, n_out});
  auto run = [&](TensorView hh, TensorView cw, TensorView g, TensorView gh) {
    Tensor ws = scratch(moefuse::swiglu_linear_backward_workspace_bytes(base.plan, h, base.w, base.cw));
    moefuse::swiglu_linear_backward(base.plan, hh, base.w, cw, g, gh, TensorView{}, TensorView{}, ws.view());
  };
  ASSERT_NO_THROW(run(h, base.cw, gout, fresh(DType::bf16, {M, 2 * I})));
  EXPECT_ERROR_NAMING(run(fresh(DType::bf16, {M, 2 * I + 2}), base.cw, gout, TensorView{}), "h");
  EXPECT_ERROR_NAMING(run(h, TensorView{}, gout, TensorView{}), "combine_weights");
  EXPECT_ERROR_NAMING(run(h, base.cw, fresh(DType::bf16, {M, n_out}), TensorView{}), "grad_out");
  EXPECT_ERROR_NAMING(run(h, base.cw, gout, fresh(DType::bf16, {M, I})), "grad_h");
  EXPECT_ERROR_NAMING(run(h, base.cw, gout, fresh(DType::f16, {M, 2 * I})), "grad_h");
  const TensorView no_features = fresh(DType::bf16, {E, n_out, 0}), h0 = fresh(DType::bf16, {M, 0});
  EXPECT_ERROR_NAMING((void)moefuse::swiglu_linear_backward_workspace_bytes(base.plan, h0, no_features, base.cw),
                      "weight", "input feature");
}

TEST_F(LinearErrors, SwigluBackwardLora) {
  const std::int64_t I = n_in, r = 4;
  TensorView h = fresh(DType::bf16, {M, 2 * I}), gout = fresh(DType::bf16, {T, n_out});
  const moefuse::Lora lora{fresh(DType::bf16, {E, r, I}), fresh(DType::bf16, {E, n_out, r}), 2.f};
  const moefuse::LoraGrads grads{fresh(DType::bf16, {E, r, I}), fresh(DType::bf16, {E, n_out, r})};
  auto run = [&](const moefuse::Lora& l, const moefuse::LoraGrads& g) {
    Tensor ws = scratch(moefuse::swiglu_linear_backward_workspace_bytes(base.plan, h, base.w, lora, base.cw));
    moefuse::swiglu_linear_backward(base.plan, h, base.w, l, base.cw, gout, TensorView{}, g, TensorView{}, ws.view());
  };
  ASSERT_NO_THROW(run(lora, grads));
  EXPECT_ERROR_NAMING(run(moefuse::Lora{}, grads), "grad_lora");
  EXPECT_ERROR_NAMING(run({lora.a, fresh(DType::bf16, {E, n_out, r + 1}), 2.f}, grads), "lora.b");
  EXPECT_ERROR_NAMING(run({fresh(DType::bf16, {E + 1, r, I}), lora.b, 2.f}, grads), "lora.a");
  EXPECT_ERROR_NAMING(run(lora, {fresh(DType::bf16, {E, r + 1, I}), grads.b}), "grad_lora.a");
  EXPECT_ERROR_NAMING(run(lora, {grads.a, fresh(DType::f16, {E, n_out, r})}), "grad_lora.b");
}

TEST_F(LinearErrors, Backward) {
  struct Grads {
    TensorView grad_out, gx, gw, gcw;
  };
  Grads g0{fresh(DType::bf16, {T, n_out}), fresh(DType::bf16, {T, n_in}), fresh(DType::bf16, {E, n_out, n_in}),
           fresh(DType::f32, {T, k})};
  auto backward = [&](const LinearArgs& a, const Grads& g) {
    Tensor ws = scratch(moefuse::moe_linear_backward_workspace_bytes(a.plan, a.x, a.w, a.gather, a.cw));
    moefuse::moe_linear_backward(a.plan, a.x, a.w, a.gather, a.cw, g.grad_out, g.gx, g.gw, g.gcw,
                                 a.ws.defined() ? a.ws : ws.view());
  };
  auto with_g = [&](auto f) { Grads g = g0; f(g); return g; };
  ASSERT_NO_THROW(backward(base, g0));
  EXPECT_ERROR_NAMING(backward(base, with_g([&](auto& g) { g.grad_out = fresh(DType::bf16, {M, n_out}); })),
                      "grad_out");
  EXPECT_ERROR_NAMING(backward(base, with_g([&](auto& g) { g.gx = fresh(DType::f32, {T, n_in}); })), "grad_x");
  EXPECT_ERROR_NAMING(backward(base, with_g([&](auto& g) { g.gx = fresh(DType::bf16, {T, n_in + 1}); })), "grad_x");
  EXPECT_ERROR_NAMING(backward(base, with_g([&](auto& g) { g.gw = fresh(DType::bf16, {E, n_out + 1, n_in}); })),
                      "grad_weight");
  EXPECT_ERROR_NAMING(backward(base, with_g([&](auto& g) { g.gcw = fresh(DType::bf16, {T, k}); })),
                      "grad_combine_weights");
  // grad_combine_weights only exists with combine_weights.
  EXPECT_ERROR_NAMING(backward(with([&](auto& a) {
                                 a.cw = TensorView{};
                                 a.out = fresh(DType::bf16, {M, n_out});
                               }),
                               with_g([&](auto& g) { g.grad_out = fresh(DType::bf16, {M, n_out}); })),
                      "grad_combine_weights", "combine_weights");
}

// ---- SwiGLU -------------------------------------------------------------------------------------------------------
TEST(Errors, Swiglu) {
  const std::int64_t R = 3, I = 5;
  Fresh fresh;
  TensorView h = fresh(DType::f32, {R, 2 * I}), a = fresh(DType::f32, {R, I});
  ASSERT_NO_THROW(moefuse::swiglu_forward(h, a));
  ASSERT_NO_THROW(moefuse::swiglu_backward(h, a, h));
  EXPECT_ERROR_NAMING(moefuse::swiglu_forward(fresh(DType::f32, {R, 2 * I + 1}), a), "h", "a");
  EXPECT_ERROR_NAMING(moefuse::swiglu_forward(h, fresh(DType::f32, {R, I + 1})), "a", "h");
  EXPECT_ERROR_NAMING(moefuse::swiglu_forward(h, fresh(DType::f32, {R + 1, I})), "a", "h");
  EXPECT_ERROR_NAMING(moefuse::swiglu_forward(fresh(DType::i32, {R, 2 * I}), a), "h");
  EXPECT_ERROR_NAMING(moefuse::swiglu_forward(h, fresh(DType::bf16, {R, I})), "a", "h");
  EXPECT_ERROR_NAMING(moefuse::swiglu_forward(h, transposed(a)), "a");
  EXPECT_ERROR_NAMING(moefuse::swiglu_forward(h, on_cuda(a)), "a", "h");
  EXPECT_ERROR_NAMING(moefuse::swiglu_backward(h, fresh(DType::f32, {R, I + 1}), h), "grad_a");
  EXPECT_ERROR_NAMING(moefuse::swiglu_backward(h, a, fresh(DType::f32, {R, 2 * I - 1})), "grad_h");
  EXPECT_ERROR_NAMING(moefuse::swiglu_backward(h, a, fresh(DType::f16, {R, 2 * I})), "grad_h", "h");
}

// ---- the MoE block ------------------------------------------------------------------------------------------------
struct BlockArgs {
  moefuse::MoeConfig cfg;
  TensorView x;
  moefuse::MoeWeights w;
  TensorView out, logits;
  TensorView saved, ws;  // absent: sized from the queries
};

class BlockErrors : public ::testing::Test {
 protected:
  static constexpr std::int64_t T = 4, H = 8, I = 5;
  static constexpr int E = 4, k = 2;
  BlockErrors() {
    base = {{H, I, E, k, true},
            fresh(DType::bf16, {T, H}),
            weights_of(fresh(DType::bf16, {E, H}), fresh(DType::bf16, {E, 2 * I, H}), fresh(DType::bf16, {E, H, I})),
            fresh(DType::bf16, {T, H}),
            fresh(DType::bf16, {T, E}),
            {},
            {}};
    saved = scratch(moefuse::moe_saved_bytes(base.cfg, T, DType::bf16));
    base.saved = saved.view();
  }
  // Runs forward with the queries made on these (possibly bad) arguments.
  static void forward(const BlockArgs& a) {
    Tensor saved_buf = a.saved.defined() ? Tensor() : scratch(moefuse::moe_saved_bytes(a.cfg, a.x.size(0), a.x.dtype));
    Tensor ws = scratch(moefuse::moe_forward_workspace_bytes(a.cfg, a.x, a.w));
    moefuse::moe_forward(a.cfg, a.x, a.w, a.out, a.logits, a.saved.defined() ? a.saved : saved_buf.view(),
                         a.ws.defined() ? a.ws : ws.view());
  }
  template <class F>
  BlockArgs with(F f) {
    BlockArgs a = base;
    f(a);
    return a;
  }
  Fresh fresh;
  Tensor saved;
  BlockArgs base;
};

TEST_F(BlockErrors, Forward) {
  ASSERT_NO_THROW(forward(base));
  for (int bad_k : {0, -1, E + 1})
    EXPECT_ERROR_NAMING(forward(with([&](auto& a) {
                          a.cfg.top_k = bad_k;
                          a.saved = TensorView{};
                        })),
                        "top_k");
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.cfg.experts = E + 1; })), "router", "gate_up", "down",
                      "experts", "router_logits");
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.x = fresh(DType::bf16, {T, H + 1}); })), "x", "hidden");
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) {  // f32 activations, bf16 weights
                        a.x = fresh(DType::f32, {T, H});
                        a.out = fresh(DType::f32, {T, H});
                        a.logits = fresh(DType::f32, {T, E});
                        a.saved = TensorView{};
                      })),
                      "x", "router", "gate_up", "down");
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.x = transposed(a.x); })), "x");
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.w.router = fresh(DType::bf16, {E, H + 1}); })), "router");
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.w.gate_up = fresh(DType::bf16, {E, 2 * I + 1, H}); })),
                      "gate_up");
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.w.down = fresh(DType::bf16, {E, H, I + 1}); })), "down");
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.w.down = fresh(DType::f32, {E, H, I}); })), "down");
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.w.router = on_cuda(a.w.router); })), "router", "x");
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.out = fresh(DType::bf16, {T + 1, H}); })), "out");
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.logits = fresh(DType::bf16, {T, E + 1}); })), "router_logits");
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.logits = fresh(DType::f32, {T, E}); })), "router_logits");
  std::size_t saved_bytes = moefuse::moe_saved_bytes(base.cfg, T, DType::bf16);
  EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.saved = fresh(DType::u8, {std::int64_t(saved_bytes) - 1}); })),
                      "saved");
  EXPECT_ERROR_NAMING(moefuse::moe_saved_view(base.cfg, T, DType::bf16, fresh(DType::u8, {16})), "saved");
  std::size_t bytes = moefuse::moe_forward_workspace_bytes(base.cfg, base.x, base.w);
  if (bytes > 0) {
    EXPECT_ERROR_NAMING(forward(with([&](auto& a) { a.ws = short_workspace(fresh, bytes); })), "workspace");
  }
}

TEST_F(BlockErrors, Backward) {
  ASSERT_NO_THROW(forward(base));
  struct Args {
    TensorView grad_out, grad_logits;
    moefuse::MoeGrads grads;
    TensorView logits, saved, ws;
  };
  Args b0{fresh(DType::bf16, {T, H}),
          fresh(DType::bf16, {T, E}),
          grads_of(fresh(DType::bf16, {T, H}), fresh(DType::bf16, {E, H}), fresh(DType::bf16, {E, 2 * I, H}),
                   fresh(DType::bf16, {E, H, I})),
          base.logits,
          base.saved,
          {}};
  auto backward = [&](const Args& b) {
    Tensor ws = scratch(moefuse::moe_backward_workspace_bytes(base.cfg, base.x, base.w, b.grads));
    moefuse::moe_backward(base.cfg, base.x, base.w, b.logits, b.saved, b.grad_out, b.grad_logits, b.grads,
                          b.ws.defined() ? b.ws : ws.view());
  };
  auto with_b = [&](auto f) { Args b = b0; f(b); return b; };
  ASSERT_NO_THROW(backward(b0));
  EXPECT_ERROR_NAMING(backward(with_b([&](auto& b) { b.grad_out = fresh(DType::bf16, {T, H + 1}); })), "grad_out");
  EXPECT_ERROR_NAMING(backward(with_b([&](auto& b) { b.grad_out = fresh(DType::f16, {T, H}); })), "grad_out");
  EXPECT_ERROR_NAMING(backward(with_b([&](auto& b) { b.grad_logits = fresh(DType::bf16, {T, E + 1}); })),
                      "grad_router_logits");
  EXPECT_ERROR_NAMING(backward(with_b([&](auto& b) { b.grads.x = fresh(DType::bf16, {T + 1, H}); })), "x");
  EXPECT_ERROR_NAMING(backward(with_b([&](auto& b) { b.grads.router = fresh(DType::bf16, {E, H - 1}); })), "router");
  EXPECT_ERROR_NAMING(backward(with_b([&](auto& b) { b.grads.gate_up = fresh(DType::f32, {E, 2 * I, H}); })),
                      "gate_up");
  EXPECT_ERROR_NAMING(backward(with_b([&](auto& b) { b.grads.down = on_cuda(b.grads.down); })), "down", "x");
  EXPECT_ERROR_NAMING(backward(with_b([&](auto& b) { b.logits = fresh(DType::bf16, {T, E - 1}); })),
                      "router_logits");
  EXPECT_ERROR_NAMING(backward(with_b([&](auto& b) { b.saved = fresh(DType::u8, {64}); })), "saved");
  std::size_t bytes = moefuse::moe_backward_workspace_bytes(base.cfg, base.x, base.w, b0.grads);
  if (bytes > 0) {
    EXPECT_ERROR_NAMING(backward(with_b([&](auto& b) { b.ws = short_workspace(fresh, bytes); })), "workspace");
  }
}

// T = 0 is valid everywhere (no throw), including the block's forward and backward.
TEST(Errors, ZeroTokensIsNotAnError) {
  Fresh fresh;
  moefuse::MoeConfig cfg{8, 5, 4, 2, true};
  auto w = weights_of(fresh(DType::f32, {4, 8}), fresh(DType::f32, {4, 10, 8}), fresh(DType::f32, {4, 8, 5}));
  TensorView x = fresh(DType::f32, {0, 8}), out = fresh(DType::f32, {0, 8}), logits = fresh(DType::f32, {0, 4});
  Tensor saved = scratch(moefuse::moe_saved_bytes(cfg, 0, DType::f32));
  Tensor fws = scratch(moefuse::moe_forward_workspace_bytes(cfg, x, w));
  ASSERT_NO_THROW(moefuse::moe_forward(cfg, x, w, out, logits, saved.view(), fws.view()));
  Tensor gr(DType::f32, {4, 8}), gg(DType::f32, {4, 10, 8}), gd(DType::f32, {4, 8, 5});
  auto grads = grads_of(fresh(DType::f32, {0, 8}), gr.view(), gg.view(), gd.view());
  Tensor bws = scratch(moefuse::moe_backward_workspace_bytes(cfg, x, w, grads));
  TensorView grad_out = out;  // as torch hands the gradient of out.sum(): expanded, strides 0
  grad_out.stride[0] = grad_out.stride[1] = 0;
  ASSERT_NO_THROW(moefuse::moe_backward(cfg, x, w, logits, saved.view(), grad_out, TensorView{}, grads, bws.view()));
  // No tokens: every weight gradient is zero (and written, though poisoned before).
  for (const Tensor* t : {&gr, &gg, &gd}) EXPECT_EQ(t->values(), Vec(t->numel(), 0.0));
}

// Workspace queries read shapes, dtypes and devices only: views with null data pointers must be accepted (ops.h).
TEST(Queries, AcceptNullDataPointers) {
  const std::int64_t T = 6, H = 8, I = 5;
  const int E = 4, k = 2;
  auto null = [](DType dt, std::initializer_list<std::int64_t> shape) {
    return moefuse::view(nullptr, dt, Device::cpu(), shape);
  };
  Plan plan;
  plan.tokens = T, plan.top_k = k, plan.experts = E;
  plan.counts = null(DType::i32, {E});
  plan.offsets = null(DType::i32, {E + 1});
  plan.sorted_pairs = null(DType::i32, {T * k});
  plan.pair_positions = null(DType::i32, {T * k});
  plan.invalid = null(DType::i32, {1});
  TensorView ids = null(DType::i32, {T, k}), x = null(DType::f32, {T, H}), w = null(DType::f32, {E, 2 * I, H});
  TensorView cw = null(DType::f32, {T, k});
  EXPECT_NO_THROW(moefuse::routing_plan_workspace_bytes(plan, ids));
  EXPECT_NO_THROW(moefuse::moe_linear_workspace_bytes(plan, x, w, true, cw));
  EXPECT_NO_THROW(moefuse::moe_linear_backward_workspace_bytes(plan, x, w, true, cw));
  moefuse::MoeConfig cfg{H, I, E, k, true};
  auto weights = weights_of(null(DType::f32, {E, H}), w, null(DType::f32, {E, H, I}));
  auto grads = grads_of(null(DType::f32, {T, H}), TensorView{}, TensorView{}, TensorView{});
  EXPECT_NO_THROW(moefuse::moe_forward_workspace_bytes(cfg, x, weights));
  EXPECT_NO_THROW(moefuse::moe_backward_workspace_bytes(cfg, x, weights, grads));
}

}  // namespace
