// Dense linear (the router projection) through cuBLAS, f32 accumulation. Row-major y[T, N] = x[T, K] . w[N, K]^T
// is column-major y^T = w^T-as-stored . x^T, so row-major operands map onto cuBLAS without copies.
#include <cublas_v2.h>

#include <array>
#include <mutex>
#include <string>

#include "core/backend.h"
#include "cuda/common.cuh"

namespace moefuse::cuda {
namespace {

void check_cublas(cublasStatus_t st, const char* what) {
  if (st != CUBLAS_STATUS_SUCCESS)
    throw Error(std::string("moefuse cuBLAS error ") + cublasGetStatusString(st) + " in " + what);
}

// One handle per device, created on first use and kept for the process.
cublasHandle_t handle_for(int device) {
  static std::mutex mutex;
  static std::array<cublasHandle_t, 64> handles{};
  if (device < 0 || device >= static_cast<int>(handles.size())) throw Error("moefuse: CUDA device index out of range");
  std::lock_guard<std::mutex> lock(mutex);
  if (!handles[device]) check_cublas(cublasCreate(&handles[device]), "cublasCreate");
  return handles[device];
}

cudaDataType_t cuda_type(DType d) {
  switch (d) {
    case DType::bf16: return CUDA_R_16BF;
    case DType::f16: return CUDA_R_16F;
    default: return CUDA_R_32F;
  }
}

// Column-major C[m, n] = op(A)[m, k] . op(B)[k, n], all of dtype `d`.
void gemm(const Device& device, void* stream, DType d, cublasOperation_t ta, cublasOperation_t tb, std::int64_t m,
          std::int64_t n, std::int64_t k, const void* a, std::int64_t lda, const void* b, std::int64_t ldb, float beta,
          void* c, std::int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty product: zero, or nothing to add
    if (beta == 0.f)
      MOEFUSE_CUDA_CHECK(cudaMemsetAsync(c, 0, static_cast<std::size_t>(m * n) * dtype_size(d), as_stream(stream)));
    return;
  }
  cublasHandle_t h = handle_for(device.index);
  check_cublas(cublasSetStream(h, as_stream(stream)), "cublasSetStream");
  const float alpha = 1.f;
  const cudaDataType_t t = cuda_type(d);
  check_cublas(cublasGemmEx(h, ta, tb, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), &alpha, a, t,
                            static_cast<int>(lda), b, t, static_cast<int>(ldb), &beta, c, t, static_cast<int>(ldc),
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               "cublasGemmEx");
}

}  // namespace

void dense_linear_forward(const TensorView& x, const TensorView& w, const TensorView& y, void* stream) {
  DeviceGuard guard(x.device);
  const std::int64_t t = x.shape[0], k = x.shape[1], n = w.shape[0];
  gemm(x.device, stream, x.dtype, CUBLAS_OP_T, CUBLAS_OP_N, n, t, k, w.data, k, x.data, k, 0.f, y.data, n);
}

void dense_linear_backward(const TensorView& x, const TensorView& w, const TensorView& dy, const TensorView& grad_x,
                           bool accumulate_grad_x, const TensorView& grad_w, void* stream) {
  DeviceGuard guard(x.device);
  const std::int64_t t = x.shape[0], k = x.shape[1], n = w.shape[0];
  if (grad_x.defined())  // grad_x^T [K, T] = w^T [K, N] . dy^T [N, T]
    gemm(x.device, stream, x.dtype, CUBLAS_OP_N, CUBLAS_OP_N, k, t, n, w.data, k, dy.data, n,
         accumulate_grad_x ? 1.f : 0.f, grad_x.data, k);
  if (grad_w.defined())  // grad_w^T [K, N] = x^T [K, T] . dy [T, N]
    gemm(x.device, stream, x.dtype, CUBLAS_OP_N, CUBLAS_OP_T, k, n, t, x.data, k, dy.data, n, 0.f, grad_w.data, k);
}

}  // namespace moefuse::cuda
