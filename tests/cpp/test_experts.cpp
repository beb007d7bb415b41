// moe_experts_forward/backward (routing given from outside) against the block, which runs the same experts after
// its router: given the block's own routing, the experts alone must reproduce its output and gradients bit for bit.
#include "common.h"

namespace {

using mt::DType;
using mt::Tensor;
using mt::TensorView;

struct Case {
  moefuse::MoeConfig cfg{37, 17, 7, 3, true};
  std::int64_t T = 29;
  DType d = DType::f32;
  Tensor x, router, gate_up, down, gout;

  explicit Case(DType dtype) : d(dtype) {
    mt::Rng rng("experts" + std::string(mt::name(dtype)));
    const std::int64_t H = cfg.hidden, I = cfg.intermediate, E = cfg.experts;
    auto rand = [&](std::vector<std::int64_t> shape, double scale) {
      std::int64_t n = 1;
      for (auto s : shape) n *= s;
      mt::Vec v = rng.normals(static_cast<std::size_t>(n), scale);
      return mt::make(d, std::move(shape), v);
    };
    x = rand({T, H}, 1.0);
    router = rand({E, H}, 0.3);
    gate_up = rand({E, 2 * I, H}, 0.2);
    down = rand({E, H, I}, 0.2);
    gout = rand({T, H}, 1.0);
  }
  moefuse::MoeWeights weights() const { return mt::weights_of(router.view(), gate_up.view(), down.view()); }
  Tensor fresh(std::vector<std::int64_t> shape, DType dtype) const {
    Tensor t(dtype, std::move(shape));
    t.poison();
    return t;
  }
};

TEST(Experts, MatchTheBlockBitForBit) {
  for (DType d : {DType::f32, DType::bf16}) {
    SCOPED_TRACE(mt::name(d));
    Case s(d);
    const std::int64_t T = s.T, H = s.cfg.hidden, I = s.cfg.intermediate, E = s.cfg.experts, k = s.cfg.top_k;
    const moefuse::MoeWeights w = s.weights();

    // The block: forward, then backward with every gradient.
    Tensor out = s.fresh({T, H}, d), logits = s.fresh({T, E}, d);
    Tensor saved = mt::scratch(moefuse::moe_saved_bytes(s.cfg, T, d));
    Tensor fws = mt::scratch(moefuse::moe_forward_workspace_bytes(s.cfg, s.x.view(), w));
    moefuse::moe_forward(s.cfg, s.x.view(), w, out.view(), logits.view(), saved.view(), fws.view());
    const moefuse::MoeSaved sv = moefuse::moe_saved_view(s.cfg, T, d, saved.view());
    Tensor ggu = s.fresh({E, 2 * I, H}, d), gdown = s.fresh({E, H, I}, d);
    const moefuse::MoeGrads block_grads = mt::grads_of(TensorView{}, TensorView{}, ggu.view(), gdown.view());
    Tensor bws = mt::scratch(moefuse::moe_backward_workspace_bytes(s.cfg, s.x.view(), w, block_grads));
    moefuse::moe_backward(s.cfg, s.x.view(), w, logits.view(), saved.view(), s.gout.view(), TensorView{},
                          block_grads, bws.view());

    // The experts alone on the block's routing.
    moefuse::MoeWeights ew = w;
    ew.router = TensorView{};
    Tensor eout = s.fresh({T, H}, d);
    Tensor esaved = mt::scratch(moefuse::moe_experts_saved_bytes(s.cfg, T, d));
    Tensor efws = mt::scratch(moefuse::moe_experts_forward_workspace_bytes(s.cfg, s.x.view(), ew));
    moefuse::moe_experts_forward(s.cfg, s.x.view(), sv.topk_ids, sv.topk_weights, ew, eout.view(), esaved.view(),
                                 efws.view());
    EXPECT_EQ(eout.values(), out.values());

    Tensor egx = s.fresh({T, H}, d), eggu = s.fresh({E, 2 * I, H}, d), egdown = s.fresh({E, H, I}, d);
    Tensor egw = s.fresh({T, k}, DType::f32);
    Tensor ebws = mt::scratch(moefuse::moe_experts_backward_workspace_bytes(s.cfg, s.x.view(), ew));
    moefuse::moe_experts_backward(s.cfg, s.x.view(), sv.topk_weights, ew, esaved.view(), s.gout.view(),
                                  mt::grads_of(egx.view(), TensorView{}, eggu.view(), egdown.view()), egw.view(),
                                  ebws.view());
    EXPECT_EQ(eggu.values(), ggu.values());
    EXPECT_EQ(egdown.values(), gdown.values());
    for (double v : egx.values()) ASSERT_FALSE(std::isnan(v)) << "grad_x not fully written";
    for (double v : egw.values()) ASSERT_FALSE(std::isnan(v)) << "grad_topk_weights not fully written";
  }
}

TEST(Experts, BadArgumentsAreNamed) {
  Case s(DType::f32);
  const std::int64_t T = s.T, H = s.cfg.hidden, k = s.cfg.top_k;
  moefuse::MoeWeights ew = s.weights();
  ew.router = TensorView{};
  Tensor ids(DType::i32, {T, k}), wts = s.fresh({T, k}, DType::f32), out = s.fresh({T, H}, DType::f32);
  ids.set(mt::Ints(static_cast<std::size_t>(T * k), 0));
  Tensor saved = mt::scratch(moefuse::moe_experts_saved_bytes(s.cfg, T, DType::f32));
  Tensor ws = mt::scratch(moefuse::moe_experts_forward_workspace_bytes(s.cfg, s.x.view(), ew));
  Tensor bad_ids(DType::i32, {T, k + 1});
  EXPECT_ERROR_NAMING(moefuse::moe_experts_forward(s.cfg, s.x.view(), bad_ids.view(), wts.view(), ew, out.view(),
                                                   saved.view(), ws.view()),
                      "topk_ids");
  Tensor small = mt::scratch(16);
  EXPECT_ERROR_NAMING(moefuse::moe_experts_forward(s.cfg, s.x.view(), ids.view(), wts.view(), ew, out.view(),
                                                   small.view(), ws.view()),
                      "saved");
  Tensor grouter = s.fresh({s.cfg.experts, H}, DType::f32);
  EXPECT_ERROR_NAMING(moefuse::moe_experts_backward(s.cfg, s.x.view(), wts.view(), ew, saved.view(), s.gout.view(),
                                                    mt::grads_of(TensorView{}, grouter.view(), TensorView{},
                                                                 TensorView{}),
                                                    TensorView{}, ws.view()),
                      "grads.router");
}

}  // namespace
