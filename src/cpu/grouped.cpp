#include "cpu/grouped.h"

#include <cstring>

#include "core/check.h"
#include "cpu/cpu.h"

namespace moefuse::cpu {
namespace {

float combine_weight(const TensorView& cw, std::int64_t pair) { return cw.defined() ? cw.ptr<float>()[pair] : 1.0f; }

// Expert e of a [E, p, q] weight as f32: in place when stored as f32, else converted into `staging`.
const float* expert_f32(const TensorView& weight, std::int64_t e, float* staging) {
  const std::int64_t size = weight.size(1) * weight.size(2);
  if (weight.dtype == DType::f32) return weight.ptr<float>() + e * size;
#pragma omp parallel for
  for (std::int64_t i = 0; i < size; ++i) staging[i] = load(weight, e * size + i);
  return staging;
}

}  // namespace

void Routing::check() const {
  const char* op = "plan";
  const char* why = ": not a plan routing_plan made for these tokens, top_k and experts (or it was changed since)";
  const std::int64_t m = tokens * k;
  MOEFUSE_CHECK(offsets[0] == 0, op, "offsets[0] = ", offsets[0], why);
  for (int e = 0; e < experts; ++e)
    MOEFUSE_CHECK(offsets[e] <= offsets[e + 1], op, "offsets[", e + 1, "] = ", offsets[e + 1], " < offsets[", e,
                  "] = ", offsets[e], why);
  MOEFUSE_CHECK(routed <= m, op, "offsets[", experts, "] = ", routed, " exceeds the ", m, " routed pairs", why);
  for (std::int64_t s = 0; s < m; ++s) {
    const std::int32_t pair = sorted_pairs[s];
    MOEFUSE_CHECK(pair >= 0 && pair < m && pair_positions[pair] == s, op, "sorted_pairs[", s, "] = ", pair,
                  " and pair_positions are not inverse permutations of the ", m, " pairs", why);
  }
}

void stage_rows(float* dst, const TensorView& src, std::int64_t width, const Routing& r, bool by_token) {
#pragma omp parallel for
  for (std::int64_t s = 0; s < r.routed; ++s) {
    const std::int64_t row = by_token ? r.sorted_pairs[s] / r.k : s;
    for (std::int64_t c = 0; c < width; ++c) dst[s * width + c] = load(src, row * width + c);
  }
}

void scale_rows(float* rows, std::int64_t width, const Routing& r, const TensorView& cw, float scale) {
#pragma omp parallel for
  for (std::int64_t s = 0; s < r.routed; ++s) {
    const float f = scale * combine_weight(cw, r.sorted_pairs[s]);
    for (std::int64_t c = 0; c < width; ++c) rows[s * width + c] *= f;
  }
}

void expert_matmul(const Routing& r, const float* in, const TensorView& weight, bool trans, float* out,
                   float* staging) {
  const std::int64_t p = weight.size(1), q = weight.size(2);
  const std::int64_t in_width = trans ? q : p, out_width = trans ? p : q;
  for (int e = 0; e < r.experts; ++e) {
    const std::int64_t r0 = r.offsets[e], n = r.offsets[e + 1] - r0;
    if (n > 0)
      gemm(false, trans, n, out_width, in_width, in + r0 * in_width, expert_f32(weight, e, staging), 0.0f,
           out + r0 * out_width);
  }
}

void expert_grad(const Routing& r, const float* a, const float* b, const TensorView& grad, float* staging) {
  const std::int64_t p = grad.size(1), q = grad.size(2), size = p * q;
  const bool direct = grad.dtype == DType::f32;
  for (int e = 0; e < r.experts; ++e) {
    const std::int64_t r0 = r.offsets[e], n = r.offsets[e + 1] - r0;
    if (n == 0) {  // all-zero bits are +0 in every float dtype
      const std::size_t bytes = static_cast<std::size_t>(size) * dtype_size(grad.dtype);
      std::memset(static_cast<char*>(grad.data) + e * bytes, 0, bytes);
      continue;
    }
    float* dst = direct ? grad.ptr<float>() + e * size : staging;
    gemm(true, false, p, q, n, a + r0 * p, b + r0 * q, 0.0f, dst);
    if (!direct) {
#pragma omp parallel for
      for (std::int64_t i = 0; i < size; ++i) store(grad, e * size + i, staging[i]);
    }
  }
}

void pair_rowdot(const float* a, const float* b, std::int64_t width, const Routing& r, float scale, bool accumulate,
                 const TensorView& gcw) {
  float* out = gcw.ptr<float>();
#pragma omp parallel for
  for (std::int64_t p = 0; p < r.tokens * r.k; ++p) {
    const std::int64_t pos = r.pair_positions[p];
    float dot = 0.0f;
    if (pos < r.routed)
      for (std::int64_t c = 0; c < width; ++c) dot += a[pos * width + c] * b[pos * width + c];
    out[p] = (accumulate ? out[p] : 0.0f) + scale * dot;
  }
}

void write_rows(const float* rows, std::int64_t width, const Routing& r, const TensorView& cw, bool by_token,
                bool accumulate, const TensorView& dst) {
  if (by_token) {
#pragma omp parallel for
    for (std::int64_t t = 0; t < r.tokens; ++t) {
      for (std::int64_t c = 0; c < width; ++c) {
        const std::int64_t i = t * width + c;
        float acc = accumulate ? load(dst, i) : 0.0f;
        for (std::int64_t p = t * r.k; p < (t + 1) * r.k; ++p) {
          const std::int64_t pos = r.pair_positions[p];
          if (pos < r.routed) acc += combine_weight(cw, p) * rows[pos * width + c];
        }
        store(dst, i, acc);
      }
    }
  } else {
#pragma omp parallel for
    for (std::int64_t s = 0; s < r.tokens * r.k; ++s) {
      const bool routed = s < r.routed;
      const float f = routed ? combine_weight(cw, r.sorted_pairs[s]) : 0.0f;
      for (std::int64_t c = 0; c < width; ++c) {
        const std::int64_t i = s * width + c;
        store(dst, i, (accumulate ? load(dst, i) : 0.0f) + (routed ? f * rows[i] : 0.0f));
      }
    }
  }
}

}  // namespace moefuse::cpu
