// Router: softmax in f32 -> top-k -> optional renormalisation, and its exact backward. One token per iteration.
#include <cmath>
#include <cstdint>

#include "core/backend.h"
#include "cpu/cpu.h"

namespace moefuse::cpu {
namespace {

// Softmax over one token's logits, recomputed on demand (no scratch). A NaN logit makes the sum, so every
// probability, NaN.
struct SoftmaxRow {
  const TensorView& logits;
  std::int64_t base;
  float max = -INFINITY, sum = 0.0f;

  SoftmaxRow(const TensorView& l, std::int64_t t, int num_experts) : logits(l), base(t * num_experts) {
    for (int e = 0; e < num_experts; ++e) max = std::fmax(max, load(logits, base + e));
    for (int e = 0; e < num_experts; ++e) sum += std::exp(load(logits, base + e) - max);
  }
  float operator()(int e) const { return std::exp(load(logits, base + e) - max) / sum; }
};

// Does (p, e) rank before (q, f)? Larger probability first, ties to the lower expert id; NaN ranks above every
// number, so NaN rows still pick k distinct in-range ids (the lowest ones).
bool ranks_before(float p, int e, float q, int f) {
  if (std::isnan(p) || std::isnan(q)) return std::isnan(p) && (!std::isnan(q) || e < f);
  return p > q || (p == q && e < f);
}

}  // namespace

void router_forward(const TensorView& logits, int top_k, bool renormalize, const TensorView& topk_ids,
                    const TensorView& topk_weights, void*) {
  const std::int64_t tokens = logits.size(0);
  const int num_experts = static_cast<int>(logits.size(1)), k = top_k;
#pragma omp parallel for
  for (std::int64_t t = 0; t < tokens; ++t) {
    const SoftmaxRow prob(logits, t, num_experts);
    std::int32_t* ids = topk_ids.ptr<std::int32_t>() + t * k;
    float* w = topk_weights.ptr<float>() + t * k;
    // Insertion sort into the running top-k, kept in the outputs themselves.
    int n = 0;
    for (int e = 0; e < num_experts; ++e) {
      const float p = prob(e);
      if (n == k && !ranks_before(p, e, w[k - 1], ids[k - 1])) continue;
      int j = n < k ? n++ : k - 1;
      for (; j > 0 && ranks_before(p, e, w[j - 1], ids[j - 1]); --j) {
        w[j] = w[j - 1];
        ids[j] = ids[j - 1];
      }
      w[j] = p;
      ids[j] = e;
    }
    if (renormalize) {
      float sum = 0.0f;
      for (int j = 0; j < k; ++j) sum += w[j];
      for (int j = 0; j < k; ++j) w[j] /= sum;
    }
  }
}

void router_backward(const TensorView& logits, const TensorView& topk_ids, bool renormalize,
                     const TensorView& grad_topk_weights, const TensorView& extra_grad_logits,
                     const TensorView& grad_logits, void*) {
  const std::int64_t tokens = logits.size(0);
  const int num_experts = static_cast<int>(logits.size(1)), k = static_cast<int>(topk_ids.size(1));
#pragma omp parallel for
  for (std::int64_t t = 0; t < tokens; ++t) {
    const SoftmaxRow prob(logits, t, num_experts);
    const std::int32_t* ids = topk_ids.ptr<std::int32_t>() + t * k;
    const float* g = grad_topk_weights.ptr<float>() + t * k;
    auto routed = [&](int j) { return ids[j] >= 0 && ids[j] < num_experts; };  // other ids carry no gradient

    // Through the renormalisation w_j = p_j / z:  dL/dp_j = (g_j - sum_m g_m w_m) / z.
    float z = 1.0f, gw = 0.0f;
    if (renormalize) {
      z = 0.0f;
      for (int j = 0; j < k; ++j) z += routed(j) ? prob(ids[j]) : 0.0f;
      for (int j = 0; j < k; ++j) gw += routed(j) ? g[j] * prob(ids[j]) / z : 0.0f;
    }
    auto grad_p = [&](int j) { return (g[j] - gw) / z; };

    // Through the softmax:  dL/dl_e = p_e * (dL/dp_e - sum_i p_i dL/dp_i).
    float dot = 0.0f;
    for (int j = 0; j < k; ++j) dot += routed(j) ? grad_p(j) * prob(ids[j]) : 0.0f;
    for (int e = 0; e < num_experts; ++e) {
      float gp = 0.0f;
      for (int j = 0; j < k; ++j) gp += ids[j] == e ? grad_p(j) : 0.0f;
      float v = prob(e) * (gp - dot);
      if (extra_grad_logits.defined()) v += load(extra_grad_logits, t * num_experts + e);
      store(grad_logits, t * num_experts + e, v);
    }
  }
}

}  // namespace moefuse::cpu
