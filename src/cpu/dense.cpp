// Dense linear (the router projection): y = x . w^T and its backward.
#include <algorithm>
#include <cstdint>

#include "core/backend.h"
#include "cpu/cpu.h"

namespace moefuse::cpu {
namespace {

// A contiguous row-major matrix in any float dtype, read as op(M): element (i, j) is M[i, j], or M[j, i] if trans.
struct Mat {
  const void* data;
  DType dtype;
  std::int64_t ld;
  bool trans;
  float at(std::int64_t i, std::int64_t j) const { return load(data, dtype, trans ? j * ld + i : i * ld + j); }
};

// C[m, n] = op(A) . op(B), plus C when accumulate. f32 goes straight to BLAS. 16-bit operands need f32 copies, and
// these ops get no workspace, so 64x64 tiles are staged on the stack (fine for the small router projection).
void matmul(std::int64_t m, std::int64_t n, std::int64_t kk, Mat a, Mat b, const TensorView& c, bool accumulate) {
  if (a.dtype == DType::f32 && b.dtype == DType::f32 && c.dtype == DType::f32) {
    gemm(a.trans, b.trans, m, n, kk, static_cast<const float*>(a.data), static_cast<const float*>(b.data),
         accumulate ? 1.0f : 0.0f, c.ptr<float>());
    return;
  }
  constexpr std::int64_t kTile = 64;
  float at[kTile * kTile], bt[kTile * kTile], ct[kTile * kTile];
  for (std::int64_t i0 = 0; i0 < m; i0 += kTile) {
    for (std::int64_t j0 = 0; j0 < n; j0 += kTile) {
      const std::int64_t mi = std::min(kTile, m - i0), nj = std::min(kTile, n - j0);
      for (std::int64_t i = 0; i < mi; ++i)
        for (std::int64_t j = 0; j < nj; ++j) ct[i * nj + j] = accumulate ? load(c, (i0 + i) * n + j0 + j) : 0.0f;
      for (std::int64_t k0 = 0; k0 < kk; k0 += kTile) {
        const std::int64_t kl = std::min(kTile, kk - k0);
        for (std::int64_t i = 0; i < mi; ++i)
          for (std::int64_t q = 0; q < kl; ++q) at[i * kl + q] = a.at(i0 + i, k0 + q);
        for (std::int64_t q = 0; q < kl; ++q)
          for (std::int64_t j = 0; j < nj; ++j) bt[q * nj + j] = b.at(k0 + q, j0 + j);
        gemm(false, false, mi, nj, kl, at, bt, 1.0f, ct);
      }
      for (std::int64_t i = 0; i < mi; ++i)
        for (std::int64_t j = 0; j < nj; ++j) store(c, (i0 + i) * n + j0 + j, ct[i * nj + j]);
    }
  }
}

}  // namespace

void dense_linear_forward(const TensorView& x, const TensorView& w, const TensorView& y, void*) {
  const std::int64_t tokens = x.size(0), in = x.size(1), out = w.size(0);
  matmul(tokens, out, in, {x.data, x.dtype, in, false}, {w.data, w.dtype, in, true}, y, false);
}

void dense_linear_backward(const TensorView& x, const TensorView& w, const TensorView& dy, const TensorView& grad_x,
                           bool accumulate_grad_x, const TensorView& grad_w, void*) {
  const std::int64_t tokens = x.size(0), in = x.size(1), out = w.size(0);
  if (grad_x.defined())
    matmul(tokens, in, out, {dy.data, dy.dtype, out, false}, {w.data, w.dtype, in, false}, grad_x, accumulate_grad_x);
  if (grad_w.defined())
    matmul(out, in, tokens, {dy.data, dy.dtype, out, true}, {x.data, x.dtype, in, false}, grad_w, false);
}

}  // namespace moefuse::cpu
