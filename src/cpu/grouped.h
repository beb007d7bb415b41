// Building blocks of the grouped (per-expert) products on the CPU. Rows live in f32 staging in sorted order:
// expert e owns rows [offsets[e], offsets[e+1]); rows at or past `routed` (= offsets[E]) are placeholders and are
// never touched. Each expert's block goes through one sgemm (BLAS threads it); the per-row work uses OpenMP.
#pragma once

#include <cstdint>

#include "core/workspace.h"
#include "moefuse/ops.h"

namespace moefuse::cpu {

// The plan's arrays, checked to be a plan routing_plan could have made: every loop below indexes rows with them, so
// a plan built by hand or changed since must fail here, not read or write past the buffers. O(T*k), next to the
// expert GEMMs nothing; the CUDA backend cannot check without a host sync and trusts the plan.
struct Routing {
  const std::int32_t *offsets, *sorted_pairs, *pair_positions;
  std::int64_t tokens, k, routed;
  int experts;

  explicit Routing(const Plan& p)
      : offsets(p.offsets.ptr<std::int32_t>()), sorted_pairs(p.sorted_pairs.ptr<std::int32_t>()),
        pair_positions(p.pair_positions.ptr<std::int32_t>()), tokens(p.tokens), k(p.top_k),
        routed(offsets[p.experts]), experts(p.experts) {
    check();
  }

 private:
  void check() const;
};

// An f32 [rows, cols] region of the workspace.
inline float* take_f32(detail::Carver& c, std::int64_t rows, std::int64_t cols) {
  return c.take(DType::f32, {rows, cols}).ptr<float>();
}

// dst[s] = src[s's token] when by_token, else src[s], as f32, for every routed row s; src is [*, width].
void stage_rows(float* dst, const TensorView& src, std::int64_t width, const Routing& r, bool by_token);

// rows[s] *= scale * cw[pair(s)] for every routed row s (cw absent: weights of 1).
void scale_rows(float* rows, std::int64_t width, const Routing& r, const TensorView& cw, float scale);

// Per expert: out = in . W[e]^T (trans) or in . W[e] (!trans), with weight [E, p, q]: in is [n, q] or [n, p].
// 16-bit weights are converted to f32 one expert at a time in `staging` (p*q floats).
void expert_matmul(const Routing& r, const float* in, const TensorView& weight, bool trans, float* out,
                   float* staging);

// grad[e] = a_e^T . b_e over expert e's rows, with grad [E, p, q], a [M, p], b [M, q]; experts without rows get
// zeros. 16-bit grads go through `staging` (p*q floats).
void expert_grad(const Routing& r, const float* a, const float* b, const TensorView& grad, float* staging);

// gcw[p] (+)= scale * <a[pos(p)], b[pos(p)]> for every pair p; placeholders add 0.
void pair_rowdot(const float* a, const float* b, std::int64_t width, const Routing& r, float scale, bool accumulate,
                 const TensorView& gcw);

// Writes sorted rows out, scaled by cw (weights of 1 when absent), added to dst's values when accumulate.
// by_token: dst[t] = sum_j cw[t, j] * rows[pos(t, j)] over t's routed pairs, in j order (deterministic).
// else: dst[s] = cw[pair(s)] * rows[s] in sorted order, zero for placeholders.
void write_rows(const float* rows, std::int64_t width, const Routing& r, const TensorView& cw, bool by_token,
                bool accumulate, const TensorView& dst);

}  // namespace moefuse::cpu
