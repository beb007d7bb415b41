// swiglu_linear_backward's row pass with the down projection's adapter (lora.h: lora_swiglu_rows). Beside the
// dSwiGLU rows and the routing-weight dots it sums the adapter's grad A[e] = gb^T . (w * a) over the expert's rows
// itself, so w * a is never written for a wgrad to read back.
//
// A block owns one expert and 64 columns of I, and walks the expert's sorted rows 32 at a time: the chunk's dgrad
// rows, h's gate and up columns, routing weights and gb rows come by cp.async through a 4-stage ring; each thread
// forms 8 columns of one row (grad_h to memory, w * a to shared memory); then each warp adds its 8 columns of
// gb^T . (w * a) with mma.sync (M = rank, N = 8, K = the chunk's 32 rows). One block sums an expert's rows in a fixed
// order, so the result is deterministic; an expert without rows gets zeros.
#include "cuda/async_copy.cuh"
#include "cuda/common.cuh"
#include "cuda/grouped_gemm.cuh"
#include "cuda/lora.h"

namespace moefuse::cuda {
namespace {

constexpr int kRows = 32, kCols = 64, kStages = 4, kThreads = 256;

// Rows of the tiles the MMAs read are padded by 16 bytes, so that the 8 rows one ldmatrix reads hit distinct banks.
template <class T, int RA>
struct Smem {
  T raw[kStages][3][kRows][kCols];  // the dgrad rows, h's gate columns, h's up columns
  T gb[kStages][kRows][RA + 8];
  float w[kStages][kRows];
  T wa[kRows][kCols + 8];
};

template <class T>
struct Args {
  const T* rows;  // [M, I]: grad_out . W[e] (and the adapter's k-block), not yet scaled by w
  const T* h;     // [M, 2I]
  const float* sorted_w;  // [M]: the routing weight of each sorted row
  const int* offsets;
  int inter, slices;
  T* grad_h;     // [M, 2I] or null
  T* wa_out;     // [M, I]: w * a kept in memory (the caller's uw needs it), or null
  float* dots;   // [M, slices]: the row dots' partials, or null
  const T* gb;   // [M, rank]: s * grad_out . B[e]
  int rank;
  T* grad_a;     // [E, rank, I]
};

// sorted_w[pos] = w[sorted_pairs[pos]] for the routed rows.
__global__ void sort_weights(const float* __restrict__ w, const int* __restrict__ sorted_pairs,
                             const int* __restrict__ offsets, int experts, float* __restrict__ sorted_w) {
  const std::int64_t pos = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pos < offsets[experts]) sorted_w[pos] = w[sorted_pairs[pos]];
}

template <class T, int RA>
__global__ void __launch_bounds__(kThreads, 2) swiglu_rows_grad_a(const Args<T> p) {
  extern __shared__ __align__(16) unsigned char smem[];
  auto& sm = *reinterpret_cast<Smem<T, RA>*>(smem);
  const int e = blockIdx.x / p.slices, slice = blockIdx.x % p.slices, c0 = slice * kCols;
  const int start = p.offsets[e], end = p.offsets[e + 1], chunks = (end - start + kRows - 1) / kRows;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int r = tid / 8, part = tid % 8, col = c0 + part * 8;  // this thread's row of a chunk and its 8 columns
  const bool col_ok = col < p.inter;
  const std::int64_t inter = p.inter;

  const auto load = [&](int stage, int i) {
    const int pos = start + i * kRows + r;
    const bool ok = pos < end && col_ok;
    const T* hr = p.h + pos * 2 * inter + col;
    cp_async16(&sm.raw[stage][0][r][part * 8], ok ? p.rows + pos * inter + col : p.rows, ok);
    cp_async16(&sm.raw[stage][1][r][part * 8], ok ? hr : p.h, ok);
    cp_async16(&sm.raw[stage][2][r][part * 8], ok ? hr + inter : p.h, ok);
    if (tid < kRows) {
      const int q = start + i * kRows + tid;
      cp_async4(&sm.w[stage][tid], q < end ? p.sorted_w + q : p.sorted_w, q < end);
    }
    if (tid < kRows * (RA / 8)) {  // gb's rows in 16-byte pieces, zero past the rank
      const int rr = tid / (RA / 8), piece = tid % (RA / 8), q = start + i * kRows + rr;
      const bool gok = q < end && piece * 8 < p.rank;
      cp_async16(&sm.gb[stage][rr][piece * 8], gok ? p.gb + static_cast<std::int64_t>(q) * p.rank + piece * 8 : p.gb,
                 gok);
    }
  };

  float acc[RA / 16][4] = {};
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < chunks) load(s, s);
    cp_async_commit();
  }
  for (int i = 0; i < chunks; ++i) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // chunk i is in; every warp is done with chunk i - 1's stage and with sm.wa
    if (i + kStages - 1 < chunks) load((i + kStages - 1) % kStages, i + kStages - 1);
    cp_async_commit();
    const int st = i % kStages;
    const std::int64_t pos = start + i * kRows + r;

    // Rows past the expert's end arrive as zeros and give zeros.
    float v[8], g[8], u[8], dg[8], du[8], wa[8], dot = 0.f;
    load_vec<T, 8>(&sm.raw[st][0][r][part * 8], v);
    load_vec<T, 8>(&sm.raw[st][1][r][part * 8], g);
    load_vec<T, 8>(&sm.raw[st][2][r][part * 8], u);
    const float w = sm.w[st][r];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const DSwiglu d = dswiglu<T>(v[j], g[j], u[j], w);
      dot += v[j] * d.a;
      dg[j] = d.dg;
      du[j] = d.du;
      wa[j] = d.a * w;
    }
    if (pos < end && col_ok) {
      if (p.grad_h) {
        store_vec<T, 8>(p.grad_h + pos * 2 * inter + col, dg);
        store_vec<T, 8>(p.grad_h + pos * 2 * inter + inter + col, du);
      }
      if (p.wa_out) store_vec<T, 8>(p.wa_out + pos * inter + col, wa);
    }
    store_vec<T, 8>(&sm.wa[r][part * 8], wa);
    if (p.dots) {  // the 8 threads of a row are 8 adjacent lanes
#pragma unroll
      for (int o = 1; o < 8; o <<= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      if (part == 0 && pos < end) p.dots[pos * p.slices + slice] = dot;
    }
    __syncthreads();

    // acc += gb^T . wa over the chunk's rows: A[q][k] = gb[k][q] and B[k][n] = wa[k][8 warp + n], both stored k-major,
    // so both come through ldmatrix.trans; lane l addresses row l % 8 of 8x8 matrix l / 8.
    std::uint32_t b[4];  // wa rows 0-7, 8-15, 16-23, 24-31 of this warp's 8 columns: k16 steps 0 and 1
    tc::ldmatrix_x4<true>(b, &sm.wa[lane][8 * warp]);
#pragma unroll
    for (int kk = 0; kk < kRows / 16; ++kk) {
#pragma unroll
      for (int mi = 0; mi < RA / 16; ++mi) {
        std::uint32_t a[4];  // (k 0-7, q 0-7), (k 0-7, q 8-15), (k 8-15, q 0-7), (k 8-15, q 8-15) of this k step
        tc::ldmatrix_x4<true>(a, &sm.gb[st][16 * kk + (lane / 16) * 8 + lane % 8][16 * mi + (lane / 8) % 2 * 8]);
        tc::mma16816<T>(acc[mi], a, b[2 * kk], b[2 * kk + 1]);
      }
    }
  }

  // Accumulator (mi, c): q = 16 mi + lane / 4 (+ 8 for c >= 2), column 8 warp + 2 (lane % 4) + c % 2.
  const int cc = c0 + 8 * warp + 2 * (lane % 4);
  if (cc >= p.inter) return;
#pragma unroll
  for (int mi = 0; mi < RA / 16; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int q = 16 * mi + lane / 4 + 8 * half;
      if (q < p.rank)
        *reinterpret_cast<std::uint32_t*>(p.grad_a + (static_cast<std::int64_t>(e) * p.rank + q) * inter + cc) =
            pack2<T>(acc[mi][2 * half], acc[mi][2 * half + 1]);
    }
}

template <class T, int RA>
void launch(const Args<T>& args, int experts, cudaStream_t s) {
  const std::int64_t blocks = static_cast<std::int64_t>(experts) * args.slices;
  if (blocks > 0x7fffffff) throw Error("moefuse: LoRA row pass grid too large");
  auto kernel = swiglu_rows_grad_a<T, RA>;
  set_smem_limit(kernel, sizeof(Smem<T, RA>));
  kernel<<<static_cast<unsigned>(blocks), kThreads, sizeof(Smem<T, RA>), s>>>(args);
  MOEFUSE_CUDA_LAUNCH_CHECK();
}

}  // namespace

int lora_swiglu_rows_slices(std::int64_t inter) { return static_cast<int>(ceil_div<std::int64_t>(inter, kCols)); }

void lora_swiglu_rows(const Plan& plan, const TensorView& rows, const TensorView& h, const float* combine_weights,
                      const TensorView& gb, const TensorView& grad_a, bool keep_wa, const TensorView& grad_h,
                      const TensorView& dots, const TensorView& sorted_w, cudaStream_t s) {
  const std::int64_t m = plan.tokens * plan.top_k, inter = rows.shape[1];
  if (m == 0 || plan.experts == 0) return;
  sort_weights<<<static_cast<unsigned>(ceil_div<std::int64_t>(m, kThreads)), kThreads, 0, s>>>(
      combine_weights, plan.sorted_pairs.ptr<int>(), plan.offsets.ptr<int>(), plan.experts, sorted_w.ptr<float>());
  MOEFUSE_CUDA_LAUNCH_CHECK();
  const int rank = static_cast<int>(gb.shape[1]);
  dispatch_float(rows.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>) {
      const Args<T> args{rows.ptr<T>(), h.ptr<T>(), sorted_w.ptr<float>(), plan.offsets.ptr<int>(),
                         static_cast<int>(inter), lora_swiglu_rows_slices(inter),
                         grad_h.defined() ? grad_h.ptr<T>() : nullptr, keep_wa ? const_cast<T*>(rows.ptr<T>()) : nullptr,
                         dots.defined() ? dots.ptr<float>() : nullptr, gb.ptr<T>(), rank, grad_a.ptr<T>()};
      if (rank <= 16)
        launch<T, 16>(args, plan.experts, s);
      else if (rank <= 32)
        launch<T, 32>(args, plan.experts, s);
      else
        launch<T, 64>(args, plan.experts, s);
    }
  });
}

}  // namespace moefuse::cuda
