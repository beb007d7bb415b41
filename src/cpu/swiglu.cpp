// SwiGLU on the concatenated [gate | up] layout: a = silu(g) * u, in f32.
#include <cmath>
#include <cstdint>

#include "core/backend.h"
#include "cpu/cpu.h"

namespace moefuse::cpu {
namespace {
float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
}  // namespace

void swiglu_forward(const TensorView& h, const TensorView& a, void*) {
  const std::int64_t rows = a.size(0), width = a.size(1);
#pragma omp parallel for
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t i = 0; i < width; ++i) {
      const float g = load(h, r * 2 * width + i), u = load(h, r * 2 * width + width + i);
      store(a, r * width + i, g * sigmoid(g) * u);
    }
  }
}

void moe_linear_swiglu_forward(const Plan& plan, const TensorView& x, const TensorView& weight, const Lora& lora,
                               const TensorView& h, const TensorView& a, const TensorView& workspace, void* stream) {
  cpu::moe_linear_forward(plan, x, weight, true, TensorView{}, h, workspace, stream);
  if (lora.defined()) cpu::moe_lora_forward_add(plan, x, lora, true, TensorView{}, h, workspace, stream);
  cpu::swiglu_forward(h, a, stream);
}

bool swiglu_linear_backward_fused(const Plan&, const TensorView&, const TensorView&, const Lora&, const TensorView&,
                                  const TensorView&, const TensorView&, const TensorView&, const LoraGrads&,
                                  const TensorView&, const TensorView&, UpLoraGrad*, void*) {
  return false;
}

void swiglu_backward(const TensorView& h, const TensorView& grad_a, const TensorView& grad_h, void*) {
  const std::int64_t rows = grad_a.size(0), width = grad_a.size(1);
#pragma omp parallel for
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t i = 0; i < width; ++i) {
      const std::int64_t gi = r * 2 * width + i, ui = gi + width;
      const float g = load(h, gi), u = load(h, ui), da = load(grad_a, r * width + i), s = sigmoid(g);
      store(grad_h, gi, da * u * s * (1.0f + g * (1.0f - s)));  // silu'(g) = s (1 + g (1 - s))
      store(grad_h, ui, da * g * s);
    }
  }
}

}  // namespace moefuse::cpu
