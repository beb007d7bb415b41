// CUTLASS 3 grouped GEMMs for Hopper (see grouped_gemm_sm90.h). Compiled for sm_90a only.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include "cuda/common.cuh"
#include "cuda/grouped_gemm_sm90.h"

namespace moefuse::cuda {
namespace {

using namespace cute;
using Element = cutlass::bfloat16_t;
using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // per-expert (M, N, K)
using RowMajor = cutlass::layout::RowMajor;
using ColumnMajor = cutlass::layout::ColumnMajor;
constexpr int kAlign = 8;  // elements per 16 bytes

// One kernel per operand layout. 128x256x64 tiles, cooperative (two consumer warpgroups share a tile), clusters of
// two M tiles sharing B through TMA multicast: the configuration torch._grouped_mm uses for bf16 at these sizes.
using TileShape = Shape<_128, _256, _64>;
using ClusterShape = Shape<_2, _1, _1>;
// Epilogue and its shared-memory size outside the template below: g++ 12 rejects CUTLASS's epilogue builder in a
// dependent context (nvcc's host pass).
using Epilogue = cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float, Element, RowMajor*, kAlign, Element, RowMajor*,
    kAlign, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
    cutlass::epilogue::fusion::LinearCombination<Element, float>>::CollectiveOp;
constexpr int kEpilogueSmem = static_cast<int>(sizeof(Epilogue::SharedStorage));

template <class LayoutA, class LayoutB>
struct GemmFor {
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlign, Element, LayoutB*, kAlign, float,
      TileShape, ClusterShape, cutlass::gemm::collective::StageCountAutoCarveout<kEpilogueSmem>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// CUTLASS's (M, N, K) view: A is M x K, B is N x K, D is M x N row-major.
using FwdGemm = GemmFor<RowMajor, ColumnMajor>::Gemm;    // B[e] [n, k]: k inner
using DgradGemm = GemmFor<RowMajor, RowMajor>::Gemm;     // B[e] [k, n]: n inner
using WgradGemm = GemmFor<ColumnMajor, RowMajor>::Gemm;  // A [s, m], B [s, n]: K runs over rows s

// Per-expert arguments the kernel reads, in workspace: pointers, strides, shapes, then CUTLASS's own workspace.
template <class Gemm>
struct Arrays {
  using K = typename Gemm::GemmKernel;
  const Element** a;
  const Element** b;
  Element** d;
  typename K::InternalStrideA* sa;
  typename K::InternalStrideB* sb;
  typename K::InternalStrideD* sd;
  ProblemShape::UnderlyingProblemShape* shapes;
  void* cutlass_ws;

  // Lays the arrays out from `base` (null: only sizes them); returns the bytes before CUTLASS's workspace.
  std::size_t carve(char* base, int experts) {
    std::size_t used = 0;
    auto take = [&](auto*& p, std::size_t elem) {
      using P = std::remove_reference_t<decltype(p)>;
      p = base ? reinterpret_cast<P>(base + used) : nullptr;
      used += (elem * experts + 255) / 256 * 256;
    };
    take(a, sizeof(*a));
    take(b, sizeof(*b));
    take(d, sizeof(*d));
    take(sa, sizeof(*sa));
    take(sb, sizeof(*sb));
    take(sd, sizeof(*sd));
    take(shapes, sizeof(*shapes));
    cutlass_ws = base ? base + used : nullptr;
    return used;
  }
};

// A packed stride: the one run-time element is the leading dimension.
template <class Stride>
Stride stride_with_ld(std::int64_t ld) {
  Stride s{};
  if constexpr (std::is_integral_v<std::remove_reference_t<decltype(get<0>(s))>>)
    get<0>(s) = ld;
  else
    get<1>(s) = ld;
  return s;
}

template <class Gemm>
typename Gemm::Arguments arguments(const Arrays<Gemm>& arr, int experts, int sm_count, int device) {
  typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGrouped,
                                {experts, arr.shapes, nullptr},
                                {arr.a, arr.sa, arr.b, arr.sb},
                                {{}, const_cast<const Element**>(arr.d), arr.sd, arr.d, arr.sd}};
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = 0.f;  // C is never read
  args.epilogue.thread.dAlpha = {_0{}, _0{}, 0};
  args.hw_info.device_id = device;
  args.hw_info.sm_count = sm_count;
  return args;
}

template <class Gemm>
__global__ void write_problems(Arrays<Gemm> arr, GemmKind kind, const Element* a, const Element* b, Element* d,
                               const int* __restrict__ offsets, int experts, int m, int n, int k,
                               typename Gemm::GemmKernel::InternalStrideA sa,
                               typename Gemm::GemmKernel::InternalStrideB sb,
                               typename Gemm::GemmKernel::InternalStrideD sd) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= experts) return;
  const std::int64_t begin = offsets[e];
  const int rows = offsets[e + 1] - offsets[e];
  if (kind == GemmKind::wgrad) {
    // An expert without rows gets no tiles (M = 0): CUTLASS leaves accumulators of a K = 0 tile unset.
    arr.shapes[e] = make_shape(rows > 0 ? m : 0, n, rows);
    arr.a[e] = a + begin * m;
    arr.b[e] = b + begin * n;
    arr.d[e] = d + e * static_cast<std::int64_t>(m) * n;
  } else {
    arr.shapes[e] = make_shape(rows, n, k);
    arr.a[e] = a + begin * k;
    arr.b[e] = b + e * static_cast<std::int64_t>(n) * k;
    arr.d[e] = d + begin * n;
  }
  arr.sa[e] = sa;
  arr.sb[e] = sb;
  arr.sd[e] = sd;
}

// dW[e] = 0 for experts without rows; blockIdx.y is the expert.
__global__ void zero_empty_experts(const int* __restrict__ offsets, std::int64_t size, Vec<Element>* __restrict__ d) {
  const int e = blockIdx.y;
  if (offsets[e + 1] != offsets[e]) return;
  Vec<Element>* out = d + e * (size / Vec<Element>::n);
  for (std::int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < size / Vec<Element>::n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    out[i] = Vec<Element>{};
}

struct DeviceInfo {
  int sm_count = 0;
  bool hopper = false;
};

// Read once per device.
DeviceInfo device_info(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];  // 0 unknown, else sm_count * 2 + hopper
  if (device < 0 || device >= kMaxDevices) return {};
  int v = cache[device].load(std::memory_order_relaxed);
  if (v == 0) {
    int major = 0, sms = 0;
    MOEFUSE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    MOEFUSE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    v = sms * 2 + (major == 9);
    cache[device].store(v, std::memory_order_relaxed);
  }
  return {v / 2, (v & 1) != 0};
}

void check(cutlass::Status status, const char* what) {
  if (status != cutlass::Status::kSuccess)
    throw Error(std::string("moefuse: CUTLASS grouped GEMM ") + what + ": " + cutlassGetStatusString(status));
}

template <class Gemm>
std::size_t workspace_bytes(int experts, const Device& device) {
  Arrays<Gemm> arr{};
  const std::size_t own = arr.carve(nullptr, experts);
  return own + Gemm::get_workspace_size(arguments<Gemm>(arr, experts, device_info(device.index).sm_count,
                                                        device.index));
}

template <class Gemm>
void run(const Sm90Gemm& g, const Device& device, void* workspace, cudaStream_t stream) {
  using K = typename Gemm::GemmKernel;
  Arrays<Gemm> arr{};
  arr.carve(static_cast<char*>(workspace), g.experts);
  const bool wgrad = g.kind == GemmKind::wgrad;
  const std::int64_t lda = wgrad ? g.m : g.k, ldb = g.kind == GemmKind::fwd ? g.k : g.n;
  write_problems<Gemm><<<ceil_div(g.experts, 128), 128, 0, stream>>>(
      arr, g.kind, static_cast<const Element*>(g.a), static_cast<const Element*>(g.b), static_cast<Element*>(g.d),
      g.offsets, g.experts, g.m, g.n, g.k, stride_with_ld<typename K::InternalStrideA>(lda),
      stride_with_ld<typename K::InternalStrideB>(ldb), stride_with_ld<typename K::InternalStrideD>(g.n));
  MOEFUSE_CUDA_LAUNCH_CHECK();

  const typename Gemm::Arguments args =
      arguments<Gemm>(arr, g.experts, device_info(device.index).sm_count, device.index);
  Gemm gemm;
  check(gemm.can_implement(args), "cannot implement");
  check(gemm.initialize(args, arr.cutlass_ws, stream), "initialize");
  check(gemm.run(stream), "run");
  MOEFUSE_CUDA_LAUNCH_CHECK();

  if (wgrad) {
    const std::int64_t size = static_cast<std::int64_t>(g.m) * g.n;
    zero_empty_experts<<<dim3(16, static_cast<unsigned>(g.experts)), 256, 0, stream>>>(
        g.offsets, size, static_cast<Vec<Element>*>(g.d));
    MOEFUSE_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace

bool sm90_gather_enabled(DType dtype, const Device& device) {
  static const bool disabled = [] {
    const char* v = std::getenv("MOEFUSE_SM90");
    return v && std::strcmp(v, "0") == 0;
  }();
  return !disabled && (dtype == DType::bf16 || dtype == DType::f16) && device.type == DeviceType::cuda &&
         device_info(device.index).hopper;
}

bool sm90_enabled(DType dtype, const Device& device) {
  return dtype == DType::bf16 && sm90_gather_enabled(dtype, device);
}

std::size_t sm90_workspace_bytes(GemmKind kind, int experts, const Device& device) {
  switch (kind) {
    case GemmKind::fwd: return workspace_bytes<FwdGemm>(experts, device);
    case GemmKind::dgrad: return workspace_bytes<DgradGemm>(experts, device);
    default: return workspace_bytes<WgradGemm>(experts, device);
  }
}

void run_grouped_gemm_sm90(const Sm90Gemm& g, const Device& device, void* workspace, cudaStream_t stream) {
  if (g.experts == 0) return;
  switch (g.kind) {
    case GemmKind::fwd: return run<FwdGemm>(g, device, workspace, stream);
    case GemmKind::dgrad: return run<DgradGemm>(g, device, workspace, stream);
    default: return run<WgradGemm>(g, device, workspace, stream);
  }
}

}  // namespace moefuse::cuda
