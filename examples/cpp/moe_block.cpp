// Using moefuse from C++ without Python: one Qwen3-MoE block with stacked LoRA adapters on both expert projections,
// forward and backward with the experts frozen (LoRA fine-tuning), then its forward with the experts in 4 bits
// (QLoRA), on the CPU. On a GPU the same calls take views with Device::cuda() and a cudaStream_t.
//   build/<dir>/examples/cpp/moe_block_example
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <vector>

#include "moefuse/moefuse.h"

using namespace moefuse;

namespace {

// moefuse never allocates: the caller owns every buffer. Workspaces and the saved state need 256-byte alignment.
struct Buffer {
  explicit Buffer(std::size_t bytes) : p(std::aligned_alloc(256, (bytes + 255) / 256 * 256 + 256), std::free) {}
  std::unique_ptr<void, decltype(&std::free)> p;
};

}  // namespace

int main() {
  const MoeConfig cfg{/*hidden*/ 96, /*intermediate*/ 40, /*experts*/ 12, /*top_k*/ 3, /*renormalize*/ true};
  const std::int64_t T = 50, H = cfg.hidden, I = cfg.intermediate, E = cfg.experts;

  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.f, 1.f);
  auto tensor = [&](std::vector<float>& v, std::initializer_list<std::int64_t> shape, float scale) {
    std::int64_t n = 1;
    for (auto s : shape) n *= s;
    v.resize(static_cast<std::size_t>(n));
    for (float& e : v) e = scale * normal(rng);
    return view(v.data(), DType::f32, Device::cpu(), shape);
  };
  std::vector<float> x_, router_, gate_up_, down_, out_, logits_, grad_out_, grad_x_, grad_router_;
  const TensorView x = tensor(x_, {T, H}, 1.f);
  MoeWeights w{tensor(router_, {E, H}, 0.1f), tensor(gate_up_, {E, 2 * I, H}, 0.1f), tensor(down_, {E, H, I}, 0.1f)};
  // Stacked LoRA of rank r on each projection W [E, out, in]: a [E, r, in], b [E, out, r], W[e] + scale * b[e] . a[e]
  // applied without forming it. Training starts from b = 0; b is random here so that the adapters change the output.
  const std::int64_t r = 4;
  const float scale = 2.f;  // lora_alpha / r
  std::vector<float> gu_a_, gu_b_, dn_a_, dn_b_, grad_gu_a_, grad_gu_b_, grad_dn_a_, grad_dn_b_;
  w.gate_up_lora = {tensor(gu_a_, {E, r, H}, 0.1f), tensor(gu_b_, {E, 2 * I, r}, 0.1f), scale};
  w.down_lora = {tensor(dn_a_, {E, r, I}, 0.1f), tensor(dn_b_, {E, H, r}, 0.1f), scale};
  const TensorView out = tensor(out_, {T, H}, 0.f), logits = tensor(logits_, {T, E}, 0.f);

  try {
    Buffer saved(moe_saved_bytes(cfg, T, DType::f32));
    Buffer fws(moe_forward_workspace_bytes(cfg, x, w));
    const auto bytes = [](const Buffer& b, std::size_t n) {
      return view(b.p.get(), DType::u8, Device::cpu(), {static_cast<std::int64_t>(n)});
    };
    const TensorView saved_v = bytes(saved, moe_saved_bytes(cfg, T, DType::f32));
    moe_forward(cfg, x, w, out, logits, saved_v, bytes(fws, moe_forward_workspace_bytes(cfg, x, w)));

    // The experts are frozen (an adapter freezes its weight): ask for the input, router and adapter gradients; no
    // expert weight gradient is formed.
    const MoeGrads grads{tensor(grad_x_, {T, H}, 0.f),
                         tensor(grad_router_, {E, H}, 0.f),
                         {},
                         {},
                         {tensor(grad_gu_a_, {E, r, H}, 0.f), tensor(grad_gu_b_, {E, 2 * I, r}, 0.f)},
                         {tensor(grad_dn_a_, {E, r, I}, 0.f), tensor(grad_dn_b_, {E, H, r}, 0.f)}};
    const std::size_t bws_bytes = moe_backward_workspace_bytes(cfg, x, w, grads);
    Buffer bws(bws_bytes);
    moe_backward(cfg, x, w, logits, saved_v, tensor(grad_out_, {T, H}, 1.f), /*grad_router_logits*/ {}, grads,
                 bytes(bws, bws_bytes));

    // What forward routed: the saved state is readable through moe_saved_view.
    const MoeSaved s = moe_saved_view(cfg, T, DType::f32, saved_v);
    std::printf("token 0 went to experts %d, %d, %d with weights %.3f, %.3f, %.3f\n", s.topk_ids.ptr<int>()[0],
                s.topk_ids.ptr<int>()[1], s.topk_ids.ptr<int>()[2], s.topk_weights.ptr<float>()[0],
                s.topk_weights.ptr<float>()[1], s.topk_weights.ptr<float>()[2]);
    std::printf("out[0, 0] = %.5f, grad_x[0, 0] = %.5f, grad of gate_up's a[0, 0, 0] = %.5f\n", out_[0], grad_x_[0],
                grad_gu_a_[0]);

    // QLoRA: the frozen expert weights packed into 4 bits (NF4), [E, out, nf4_row_bytes(in)] u8, in place of the
    // float ones; the ops dequantize them into their workspace, so only the workspace query changes.
    std::vector<std::uint8_t> gu4_(static_cast<std::size_t>(E * 2 * I * nf4_row_bytes(H))),
        dn4_(static_cast<std::size_t>(E * H * nf4_row_bytes(I)));
    MoeWeights w4 = w;
    w4.gate_up = view(gu4_.data(), DType::u8, Device::cpu(), {E, 2 * I, nf4_row_bytes(H)});
    w4.down = view(dn4_.data(), DType::u8, Device::cpu(), {E, H, nf4_row_bytes(I)});
    nf4_quantize(w.gate_up, w4.gate_up);
    nf4_quantize(w.down, w4.down);
    std::vector<float> out4_;
    const TensorView out4 = tensor(out4_, {T, H}, 0.f);
    const std::size_t fws4_bytes = moe_forward_workspace_bytes(cfg, x, w4);
    Buffer fws4(fws4_bytes);
    moe_forward(cfg, x, w4, out4, logits, saved_v, bytes(fws4, fws4_bytes));
    double err = 0, norm = 0;
    for (std::size_t i = 0; i < out_.size(); ++i) {
      err += (out4_[i] - out_[i]) * (out4_[i] - out_[i]);
      norm += out_[i] * out_[i];
    }
    std::printf("4-bit experts: %zu bytes of expert weights instead of %zu, the output off by %.1f %% (relative L2)\n",
                gu4_.size() + dn4_.size(), (gate_up_.size() + down_.size()) * sizeof(float),
                100 * std::sqrt(err / norm));

    // Bad arguments throw moefuse::Error naming the argument.
    moe_forward(cfg, view(x_.data(), DType::f32, Device::cpu(), {T, H - 1}), w, out, logits, saved_v, {});
  } catch (const Error& e) {
    std::printf("moefuse::Error: %s\n", e.what());
    return 0;
  }
  std::fprintf(stderr, "expected an error for the mis-shaped x\n");
  return 1;
}
