// swiglu_linear_backward's row pass with the down projection's adapter (lora.h: lora_swiglu_rows). Beside the
// dSwiGLU rows and the routing-weight dots it sums the adapter's grad A[e] = gb^T . (w * a) over the expert's rows
// itself, so w * a is never written for a wgrad to read back; given the up projection's u, also that adapter's
// grad B[e] = grad_h^T . u, so grad_h is not read back for it either.
//
// A block owns one expert and 64 columns of I, and walks the expert's sorted rows 32 at a time: the chunk's dgrad
// rows, h's gate and up columns, routing weights, gb rows (and u rows) come by cp.async through a 3-stage ring; each
// thread forms 8 columns of one row (grad_h to memory, w * a and grad_h to shared memory); then mma.sync adds the
// chunk (K = its 32 rows): each warp 8 columns of gb^T . (w * a) (M = rank) and 16 of the block's 128 grad_h columns
// of grad_h^T . u (N = rank). One block sums an expert's rows in a fixed order, so the result is deterministic; an
// expert without rows gets zeros. Given the down adapter's u, the expert's blocks also write its rows w * u (for that
// adapter's grad B), which took a kernel of its own 25 µs on the H200.
#include "cuda/async_copy.cuh"
#include "cuda/common.cuh"
#include "cuda/grouped_gemm.cuh"
#include "cuda/lora.h"

namespace moefuse::cuda {
namespace {

// 3 stages: 318 µs on the 30B layer against 324-328 with 4 and 371 with 6 (H200, bench/RESULTS.md 2026-11-28 fourth).
constexpr int kRows = 32, kCols = 64, kStages = 3, kThreads = 256;

// Rows of the tiles the MMAs read are padded by 16 bytes, so that the 8 rows one ldmatrix reads hit distinct banks.
template <class T, int RA, int RB>
struct Smem {
  static constexpr int kUpRows = RB > 0 ? kRows : 1;
  T raw[kStages][3][kRows][kCols];  // the dgrad rows, h's gate columns, h's up columns
  T gb[kStages][kRows][RA + 8];
  T u[kStages][kUpRows][RB + 8];
  float w[kStages][kRows];
  T wa[kRows][kCols + 8];
  T gh[kUpRows][2 * kCols + 8];  // the chunk's grad_h: gate columns, then up columns
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
  const T* up_u;  // [M, up_rank]: the up projection adapter's u = s * x . A[e]^T, or null
  int up_rank;
  T* grad_up_b;   // [E, 2I, up_rank]
  const T* down_u;  // [M, rank]: the down adapter's u, or null
  T* down_uw;       // [M, rank]: where w * u goes
};

// sorted_w[pos] = w[sorted_pairs[pos]] for the routed rows.
__global__ void sort_weights(const float* __restrict__ w, const int* __restrict__ sorted_pairs,
                             const int* __restrict__ offsets, int experts, float* __restrict__ sorted_w) {
  const std::int64_t pos = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pos < offsets[experts]) sorted_w[pos] = w[sorted_pairs[pos]];
}

// The low-rank rows of a chunk into shared memory in 16-byte pieces, zero past the rank and the expert's end.
template <class T, int R, int LD>
__device__ __forceinline__ void load_low(T (*dst)[LD], const T* src, int rank, int first, int end, int tid) {
  if (tid < kRows * (R / 8)) {
    const int rr = tid / (R / 8), piece = tid % (R / 8), q = first + rr;
    const bool ok = q < end && piece * 8 < rank;
    cp_async16(&dst[rr][piece * 8], ok ? src + static_cast<std::int64_t>(q) * rank + piece * 8 : src, ok);
  }
}

template <class T, int RA, int RB>
__global__ void __launch_bounds__(kThreads, 2) swiglu_rows_lora_grads(const Args<T> p) {
  extern __shared__ __align__(16) unsigned char smem[];
  auto& sm = *reinterpret_cast<Smem<T, RA, RB>*>(smem);
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
    load_low<T, RA>(sm.gb[stage], p.gb, p.rank, start + i * kRows, end, tid);
    if constexpr (RB > 0) load_low<T, RB>(sm.u[stage], p.up_u, p.up_rank, start + i * kRows, end, tid);
  };

  float acc[RA / 16][4] = {}, acc_b[RB > 0 ? RB / 8 : 1][4] = {};
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < chunks) load(s, s);
    cp_async_commit();
  }
  // The down adapter's w * u while the first chunks arrive, spread over all the expert's blocks (done by one block
  // per expert, at its end, it lengthened the pass by as much as it saved).
  if (p.down_uw) {
    const int pairs = p.rank / 2;
    const std::int64_t n = static_cast<std::int64_t>(end - start) * pairs, step = std::int64_t{p.slices} * kThreads;
    for (std::int64_t i = std::int64_t{slice} * kThreads + tid; i < n; i += step) {
      const std::int64_t s = start + i / pairs, at = s * p.rank + i % pairs * 2;
      const float w = p.sorted_w[s];
      *reinterpret_cast<std::uint32_t*>(p.down_uw + at) =
          pack2<T>(w * to_f32(p.down_u[at]), w * to_f32(p.down_u[at + 1]));
    }
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
    if constexpr (RB > 0) {
      store_vec<T, 8>(&sm.gh[r][part * 8], dg);
      store_vec<T, 8>(&sm.gh[r][kCols + part * 8], du);
    }
    if (p.dots) {  // the 8 threads of a row are 8 adjacent lanes
#pragma unroll
      for (int o = 1; o < 8; o <<= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      if (part == 0 && pos < end) p.dots[pos * p.slices + slice] = dot;
    }
    __syncthreads();

    // acc += gb^T . wa over the chunk's rows: A[q][k] = gb[k][q] and B[k][n] = wa[k][8 warp + n], both stored k-major,
    // so both come through ldmatrix.trans; lane l addresses row l % 8 of 8x8 matrix l / 8. An A operand's four
    // matrices are (k 0-7, m 0-7), (k 0-7, m 8-15), (k 8-15, m 0-7), (k 8-15, m 8-15) of its k step.
    std::uint32_t b[4];  // wa rows 0-7, 8-15, 16-23, 24-31 of this warp's 8 columns: k16 steps 0 and 1
    tc::ldmatrix_x4<true>(b, &sm.wa[lane][8 * warp]);
#pragma unroll
    for (int kk = 0; kk < kRows / 16; ++kk) {
#pragma unroll
      for (int mi = 0; mi < RA / 16; ++mi) {
        std::uint32_t a[4];
        tc::ldmatrix_x4<true>(a, &sm.gb[st][16 * kk + (lane / 16) * 8 + lane % 8][16 * mi + (lane / 8) % 2 * 8]);
        tc::mma16816<T>(acc[mi], a, b[2 * kk], b[2 * kk + 1]);
      }
      // acc_b += grad_h^T . u: A[c][k] = gh[k][16 warp + c], B[k][q] = u[k][q]; one ldmatrix gives two n8 tiles' B.
      if constexpr (RB > 0) {
        std::uint32_t a[4];
        tc::ldmatrix_x4<true>(a, &sm.gh[16 * kk + (lane / 16) * 8 + lane % 8][16 * warp + (lane / 8) % 2 * 8]);
#pragma unroll
        for (int nj = 0; nj < RB / 16; ++nj) {
          std::uint32_t bu[4];  // (k 0-7, q 0-7), (k 8-15, q 0-7), (k 0-7, q 8-15), (k 8-15, q 8-15) of 16 nj
          tc::ldmatrix_x4<true>(bu, &sm.u[st][16 * kk + (lane / 8) % 2 * 8 + lane % 8][16 * nj + (lane / 16) * 8]);
          tc::mma16816<T>(acc_b[2 * nj], a, bu[0], bu[1]);
          tc::mma16816<T>(acc_b[2 * nj + 1], a, bu[2], bu[3]);
        }
      }
    }
  }

  // Accumulator (mi, c): q = 16 mi + lane / 4 (+ 8 for c >= 2), column 8 warp + 2 (lane % 4) + c % 2.
  const int cc = c0 + 8 * warp + 2 * (lane % 4);
#pragma unroll
  for (int mi = 0; mi < RA / 16; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int q = 16 * mi + lane / 4 + 8 * half;
      if (q < p.rank && cc < p.inter)
        *reinterpret_cast<std::uint32_t*>(p.grad_a + (static_cast<std::int64_t>(e) * p.rank + q) * inter + cc) =
            pack2<T>(acc[mi][2 * half], acc[mi][2 * half + 1]);
    }
  // acc_b (ni, c): grad_h column 16 warp + lane / 4 (+ 8 for c >= 2) of the block's 128,
  // q = 8 ni + 2 (lane % 4) + c % 2.
  if constexpr (RB > 0) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int c = 16 * warp + lane / 4 + 8 * half, j = c0 + c % kCols;
      if (j >= p.inter) continue;
      T* row = p.grad_up_b + (static_cast<std::int64_t>(e) * 2 * inter + c / kCols * inter + j) * p.up_rank;
#pragma unroll
      for (int ni = 0; ni < RB / 8; ++ni) {
        const int q = 8 * ni + 2 * (lane % 4);
        if (q < p.up_rank)
          *reinterpret_cast<std::uint32_t*>(row + q) = pack2<T>(acc_b[ni][2 * half], acc_b[ni][2 * half + 1]);
      }
    }
  }
}

template <class T, int RA, int RB>
void launch(const Args<T>& args, int experts, cudaStream_t s) {
  const std::int64_t blocks = static_cast<std::int64_t>(experts) * args.slices;
  if (blocks > 0x7fffffff) throw Error("moefuse: LoRA row pass grid too large");
  auto kernel = swiglu_rows_lora_grads<T, RA, RB>;
  constexpr std::size_t smem = sizeof(Smem<T, RA, RB>);
  set_smem_limit(kernel, smem);
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, s>>>(args);
  MOEFUSE_CUDA_LAUNCH_CHECK();
}

}  // namespace

int lora_swiglu_rows_slices(std::int64_t inter) { return static_cast<int>(ceil_div<std::int64_t>(inter, kCols)); }

bool lora_swiglu_rows(const Plan& plan, const TensorView& rows, const TensorView& h, const float* combine_weights,
                      const TensorView& gb, const TensorView& grad_a, const TensorView& up_u,
                      const TensorView& grad_up_b, const TensorView& grad_h, const TensorView& dots,
                      const TensorView& sorted_w, const TensorView& down_u, const TensorView& down_uw,
                      cudaStream_t s) {
  const std::int64_t m = plan.tokens * plan.top_k, inter = rows.shape[1];
  const bool uw_formed = down_u.defined() && down_uw.defined();
  if (plan.experts == 0) return uw_formed;
  if (m > 0) {
    sort_weights<<<static_cast<unsigned>(ceil_div<std::int64_t>(m, kThreads)), kThreads, 0, s>>>(
        combine_weights, plan.sorted_pairs.ptr<int>(), plan.offsets.ptr<int>(), plan.experts, sorted_w.ptr<float>());
    MOEFUSE_CUDA_LAUNCH_CHECK();
  }
  const int rank = static_cast<int>(gb.shape[1]), up_rank = up_u.defined() ? static_cast<int>(up_u.shape[1]) : 0;
  dispatch_float(rows.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>) {
      const Args<T> args{rows.ptr<T>(), h.ptr<T>(), sorted_w.ptr<float>(), plan.offsets.ptr<int>(),
                         static_cast<int>(inter), lora_swiglu_rows_slices(inter),
                         grad_h.defined() ? grad_h.ptr<T>() : nullptr,
                         down_uw.defined() && !down_u.defined() ? rows.ptr<T>() : nullptr,
                         dots.defined() ? dots.ptr<float>() : nullptr, gb.ptr<T>(), rank, grad_a.ptr<T>(),
                         up_u.defined() ? up_u.ptr<T>() : nullptr, up_rank,
                         grad_up_b.defined() ? grad_up_b.ptr<T>() : nullptr,
                         down_u.defined() ? down_u.ptr<T>() : nullptr,
                         uw_formed ? down_uw.ptr<T>() : nullptr};
      with_rank(rank, [&](auto ra) {
        if constexpr (decltype(ra)::value > 0)
          with_rank(up_rank, [&](auto rb) {
            launch<T, decltype(ra)::value, decltype(rb)::value>(args, plan.experts, s);
          });
      });
    }
  });
  return uw_formed;
}

}  // namespace moefuse::cuda
