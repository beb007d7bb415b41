// The CUDA backend against the CPU backend: every op through the public API on copies of the same data, outputs
// poisoned with NaN first, odd shapes, all float dtypes, forward and backward; the whole block; determinism.
// Skips when no GPU is present.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>

#include "common.h"

namespace {

using moefuse::Device;
using moefuse::DType;
using moefuse::TensorView;
using mt::Ints;
using mt::Tensor;
using mt::Vec;

#define CUDA_OK(call) ASSERT_EQ((call), cudaSuccess) << #call

bool have_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

#define REQUIRE_GPU() \
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device"

// GPU results vs the CPU backend: both accumulate in f32; the GPU rounds some intermediates to the storage dtype.
double gpu_tol(DType d) { return d == DType::bf16 ? 2e-2 : d == DType::f16 ? 5e-3 : 1e-4; }

// A device copy of a host tensor (same dtype and shape).
class Dev {
 public:
  Dev() = default;
  explicit Dev(const Tensor& host) : host_(host) {
    bytes_ = static_cast<std::size_t>(host.numel()) * moefuse::dtype_size(host.dtype());
    void* p = nullptr;
    if (cudaMalloc(&p, bytes_ ? bytes_ : 1) != cudaSuccess) throw std::runtime_error("cudaMalloc failed");
    ptr_ = std::shared_ptr<void>(p, [](void* q) { cudaFree(q); });
    if (bytes_ && cudaMemcpy(p, host.data(), bytes_, cudaMemcpyHostToDevice) != cudaSuccess)
      throw std::runtime_error("upload failed");
  }
  TensorView view() const {
    TensorView v = host_.view();
    v.data = ptr_.get();
    v.device = Device::cuda(0);
    return v;
  }
  Tensor download() const {  // a fresh host tensor, not sharing host_'s buffer
    TensorView v = host_.view();
    Tensor t(v.dtype, std::vector<std::int64_t>(v.shape, v.shape + v.ndim));
    if (bytes_ && cudaMemcpy(t.data(), ptr_.get(), bytes_, cudaMemcpyDeviceToHost) != cudaSuccess)
      throw std::runtime_error("download failed");
    return t;
  }
  Vec values() const { return download().values(); }
  Ints ints() const { return download().ints(); }
  std::vector<char> bytes() const {
    Tensor t = download();
    return std::vector<char>(static_cast<char*>(t.data()), static_cast<char*>(t.data()) + bytes_);
  }
  void poison() const { cudaMemset(ptr_.get(), 0xFF, bytes_); }

 private:
  Tensor host_;
  std::shared_ptr<void> ptr_;
  std::size_t bytes_ = 0;
};

// A host tensor and its device twin, both poisoned (outputs) or both holding the same data (inputs).
struct Both {
  Tensor cpu;
  Dev gpu;
  Both() = default;
  explicit Both(const Tensor& t) : cpu(t), gpu(t) {}
  static Both poisoned(DType d, std::vector<std::int64_t> shape) {
    Tensor t(d, std::move(shape));
    t.poison();
    return Both(t);
  }
  static Both random(mt::Rng& rng, DType d, std::vector<std::int64_t> shape, double scale = 1.0) {
    std::int64_t n = 1;
    for (auto s : shape) n *= s;
    Vec v = rng.normals(static_cast<std::size_t>(n), scale);
    return Both(mt::make(d, std::move(shape), v));
  }
  TensorView c() const { return cpu.view(); }
  TensorView g() const { return gpu.view(); }
};

Both workspace(std::size_t cpu_bytes, std::size_t gpu_bytes) {
  Both b;
  b.cpu = mt::scratch(cpu_bytes);
  b.gpu = Dev(mt::scratch(gpu_bytes));
  return b;
}

// Plan buffers on both sides, planned from the same ids.
struct BothPlan {
  mt::PlanTensors cpu;
  Dev counts, offsets, sorted, positions, invalid;
  Both ws;
  BothPlan(const Ints& ids_v, std::int64_t T, int k, int E) : cpu(T, k, E) {
    cpu.poison();
    counts = Dev(cpu.counts);
    offsets = Dev(cpu.offsets);
    sorted = Dev(cpu.sorted_pairs);
    positions = Dev(cpu.pair_positions);
    invalid = Dev(cpu.invalid);
    Tensor ids(DType::i32, {T, k});
    ids.set(ids_v);
    Dev ids_gpu(ids);
    ws = workspace(moefuse::routing_plan_workspace_bytes(cpu.plan(), ids.view()),
                   moefuse::routing_plan_workspace_bytes(gpu(), ids_gpu.view()));
    moefuse::routing_plan(ids.view(), cpu.plan(), ws.c());
    moefuse::routing_plan(ids_gpu.view(), gpu(), ws.g());
  }
  moefuse::Plan gpu() const {
    moefuse::Plan p = cpu.plan();
    p.counts = counts.view();
    p.offsets = offsets.view();
    p.sorted_pairs = sorted.view();
    p.pair_positions = positions.view();
    p.invalid = invalid.view();
    return p;
  }
};

#define EXPECT_MATCH(both, dtype) EXPECT_CLOSE((both).gpu.values(), (both).cpu.values(), gpu_tol(dtype))

std::string dname(DType d) { return mt::name(d); }

// ---------------------------------------------------------------------------------------------------------------------
TEST(CudaRouter, MatchesCpu) {
  REQUIRE_GPU();
  struct Case { std::int64_t T; int E, k; };
  for (DType d : mt::kFloatTypes)
    for (Case c : {Case{0, 3, 1}, Case{1, 3, 2}, Case{7, 60, 8}, Case{1000, 128, 8}, Case{7, 128, 1}, Case{5, 1, 1}})
      for (bool renorm : {true, false}) {
        SCOPED_TRACE(dname(d) + " T" + std::to_string(c.T) + " E" + std::to_string(c.E) + " k" +
                     std::to_string(c.k) + (renorm ? " renorm" : ""));
        mt::Rng rng(std::to_string(c.T * 1000 + c.E));
        Vec lv = mt::separated_logits(rng, c.T, c.E);
        Both logits(mt::make(d, {c.T, c.E}, lv));
        Both ids = Both::poisoned(DType::i32, {c.T, c.k}), w = Both::poisoned(DType::f32, {c.T, c.k});
        moefuse::router_forward(logits.c(), c.k, renorm, ids.c(), w.c());
        moefuse::router_forward(logits.g(), c.k, renorm, ids.g(), w.g());
        EXPECT_EQ(ids.gpu.ints(), ids.cpu.ints());
        EXPECT_CLOSE(w.gpu.values(), w.cpu.values(), 1e-5);

        Both gw = Both::random(rng, DType::f32, {c.T, c.k});
        Both gl = Both::poisoned(d, {c.T, c.E});
        moefuse::router_backward(logits.c(), ids.c(), renorm, gw.c(), gl.c());
        moefuse::router_backward(logits.g(), ids.g(), renorm, gw.g(), gl.g());
        // With one expert, or renormalised weights over one or every expert, the weights are constant and the
        // gradient is zero up to rounding: a relative comparison would compare rounding noise.
        if (c.E == 1 || (renorm && (c.k == 1 || c.k == c.E))) {
          for (const Vec& v : {gl.gpu.values(), gl.cpu.values()})
            for (double e : v) EXPECT_LE(std::fabs(e), 1e-6);
        } else {
          EXPECT_MATCH(gl, d);
        }
      }
}

// ---------------------------------------------------------------------------------------------------------------------
TEST(CudaPlan, MatchesCpu) {
  REQUIRE_GPU();
  struct Case { std::int64_t T; int E, k; };
  for (Case c : {Case{0, 3, 1}, Case{1, 1, 1}, Case{7, 3, 2}, Case{1000, 60, 8}, Case{1000, 128, 8}, Case{5000, 128, 2},
                 Case{7, 128, 8}})
    for (bool placeholders : {false, true}) {
      SCOPED_TRACE("T" + std::to_string(c.T) + " E" + std::to_string(c.E) + " k" + std::to_string(c.k));
      mt::Rng rng(std::to_string(c.T * 1000 + c.E));
      BothPlan p(mt::random_ids(rng, c.T, c.k, c.E, placeholders), c.T, c.k, c.E);
      EXPECT_EQ(p.counts.ints(), p.cpu.counts.ints());
      EXPECT_EQ(p.offsets.ints(), p.cpu.offsets.ints());
      EXPECT_EQ(p.sorted.ints(), p.cpu.sorted_pairs.ints());
      EXPECT_EQ(p.positions.ints(), p.cpu.pair_positions.ints());
      EXPECT_EQ(p.invalid.ints(), Ints{0});
      EXPECT_NO_THROW(moefuse::check_plan(p.gpu()));
    }
}

TEST(CudaPlan, NegativeIdsAreCountedAndReported) {
  REQUIRE_GPU();
  const std::int64_t T = 50;
  const int k = 2, E = 8;
  mt::Rng rng;
  Ints ids = mt::random_ids(rng, T, k, E, false);
  ids[3] = -1;
  ids[40] = -7;
  mt::PlanTensors host(T, k, E);
  Dev counts(host.counts), offsets(host.offsets), sorted(host.sorted_pairs), positions(host.pair_positions),
      invalid(host.invalid);
  moefuse::Plan p = host.plan();
  p.counts = counts.view();
  p.offsets = offsets.view();
  p.sorted_pairs = sorted.view();
  p.pair_positions = positions.view();
  p.invalid = invalid.view();
  Tensor idt(DType::i32, {T, k});
  idt.set(ids);
  Dev idg(idt);
  Dev ws(mt::scratch(moefuse::routing_plan_workspace_bytes(p, idg.view())));
  moefuse::routing_plan(idg.view(), p, ws.view());
  EXPECT_EQ(invalid.ints(), Ints{2});
  EXPECT_EQ(offsets.ints().back(), T * k - 2);
  EXPECT_THROW(moefuse::check_plan(p), moefuse::Error);
}

// ---------------------------------------------------------------------------------------------------------------------
struct LinearCase {
  int E, k;
  std::int64_t T, in, out;
};

const LinearCase kLinearCases[] = {
    {3, 2, 7, 40, 24},       // tensor-core path, every tile partial
    {60, 8, 100, 136, 200},  // many experts, some empty; n and k not multiples of the tile
    {128, 8, 300, 256, 264}, // most experts get a handful of rows
    {1, 1, 7, 13, 7},        // odd dims: SIMT path for every dtype
    {3, 1, 0, 16, 16},       // no tokens
    {8, 2, 1000, 72, 1000},  // larger M, N past one tile row
};

std::string linear_name(const LinearCase& c, DType d, bool gather, bool combine) {
  return dname(d) + " E" + std::to_string(c.E) + " k" + std::to_string(c.k) + " T" + std::to_string(c.T) + " in" +
         std::to_string(c.in) + " out" + std::to_string(c.out) + (gather ? " gather" : "") +
         (combine ? " combine" : "");
}

TEST(CudaLinear, ForwardBackwardMatchCpu) {
  REQUIRE_GPU();
  for (DType d : mt::kFloatTypes)
    for (const LinearCase& c : kLinearCases)
      for (bool gather : {false, true})
        for (bool combine : {false, true}) {
          SCOPED_TRACE(linear_name(c, d, gather, combine));
          mt::Rng rng(linear_name(c, d, gather, combine));
          const std::int64_t M = c.T * c.k;
          BothPlan plan(mt::random_ids(rng, c.T, c.k, c.E, true), c.T, c.k, c.E);
          Both x = Both::random(rng, d, {gather ? c.T : M, c.in});
          Both w = Both::random(rng, d, {c.E, c.out, c.in}, 1.0 / std::sqrt(static_cast<double>(c.in)));
          Both cw;
          if (combine) {
            Vec v(static_cast<std::size_t>(M));
            for (auto& e : v) e = rng.uniform(0.1, 1.0);
            cw = Both(mt::make(DType::f32, {c.T, c.k}, v));
          }
          const std::int64_t rows_out = combine ? c.T : M;
          Both out = Both::poisoned(d, {rows_out, c.out});
          TensorView cwc = combine ? cw.c() : TensorView{}, cwg = combine ? cw.g() : TensorView{};
          Both ws = workspace(moefuse::moe_linear_workspace_bytes(plan.cpu.plan(), x.c(), w.c(), gather, cwc),
                              moefuse::moe_linear_workspace_bytes(plan.gpu(), x.g(), w.g(), gather, cwg));
          moefuse::moe_linear_forward(plan.cpu.plan(), x.c(), w.c(), gather, cwc, out.c(), ws.c());
          moefuse::moe_linear_forward(plan.gpu(), x.g(), w.g(), gather, cwg, out.g(), ws.g());
          EXPECT_MATCH(out, d);

          Both gout = Both::random(rng, d, {rows_out, c.out});
          for (bool frozen : {false, true}) {
            SCOPED_TRACE(frozen ? "frozen" : "all grads");
            Both gx = Both::poisoned(d, {gather ? c.T : M, c.in});
            Both gw = Both::poisoned(d, {c.E, c.out, c.in});
            Both gcw = Both::poisoned(DType::f32, {c.T, c.k});
            Both bws = workspace(
                moefuse::moe_linear_backward_workspace_bytes(plan.cpu.plan(), x.c(), w.c(), gather, cwc),
                moefuse::moe_linear_backward_workspace_bytes(plan.gpu(), x.g(), w.g(), gather, cwg));
            TensorView gwc = frozen ? TensorView{} : gw.c(), gwg = frozen ? TensorView{} : gw.g();
            TensorView gcwc = combine ? gcw.c() : TensorView{}, gcwg = combine ? gcw.g() : TensorView{};
            moefuse::moe_linear_backward(plan.cpu.plan(), x.c(), w.c(), gather, cwc, gout.c(), gx.c(), gwc, gcwc,
                                         bws.c());
            moefuse::moe_linear_backward(plan.gpu(), x.g(), w.g(), gather, cwg, gout.g(), gx.g(), gwg, gcwg, bws.g());
            EXPECT_MATCH(gx, d);
            if (!frozen) {
              EXPECT_MATCH(gw, d);
            }
            if (combine) {
              EXPECT_CLOSE(gcw.gpu.values(), gcw.cpu.values(), gpu_tol(d));
            }
          }
        }
}

// moe_linear forward and backward with an adapter, gpu against cpu; with saved_u, each forward leaves its rows
// s * x . A^T in lora.u and the backward reads them there.
void check_lora(const LinearCase& c, DType d, int rank, bool combine, bool saved_u = false) {
  const bool gather = !combine;  // the block's two uses
  SCOPED_TRACE(linear_name(c, d, gather, combine) + " r" + std::to_string(rank) + (saved_u ? " saved u" : ""));
  mt::Rng rng(linear_name(c, d, gather, combine) + std::to_string(rank));
  const std::int64_t M = c.T * c.k, rows_out = combine ? c.T : M;
  BothPlan plan(mt::random_ids(rng, c.T, c.k, c.E, true), c.T, c.k, c.E);
  Both x = Both::random(rng, d, {gather ? c.T : M, c.in});
  Both w = Both::random(rng, d, {c.E, c.out, c.in}, 1.0 / std::sqrt(static_cast<double>(c.in)));
  Both la = Both::random(rng, d, {c.E, rank, c.in}, 1.0 / std::sqrt(static_cast<double>(c.in)));
  Both lb = Both::random(rng, d, {c.E, c.out, rank}, 0.5);
  Both cw;
  if (combine) {
    Vec v(static_cast<std::size_t>(M));
    for (auto& e : v) e = rng.uniform(0.1, 1.0);
    cw = Both(mt::make(DType::f32, {c.T, c.k}, v));
  }
  TensorView cwc = combine ? cw.c() : TensorView{}, cwg = combine ? cw.g() : TensorView{};
  Both u = Both::poisoned(d, {M, rank});
  moefuse::Lora lc{la.c(), lb.c(), 2.0f, saved_u ? u.c() : TensorView{}},
      lg{la.g(), lb.g(), 2.0f, saved_u ? u.g() : TensorView{}};
  Both out = Both::poisoned(d, {rows_out, c.out});
  Both ws = workspace(moefuse::moe_linear_workspace_bytes(plan.cpu.plan(), x.c(), w.c(), lc, gather, cwc),
                      moefuse::moe_linear_workspace_bytes(plan.gpu(), x.g(), w.g(), lg, gather, cwg));
  moefuse::moe_linear_forward(plan.cpu.plan(), x.c(), w.c(), lc, gather, cwc, out.c(), ws.c());
  moefuse::moe_linear_forward(plan.gpu(), x.g(), w.g(), lg, gather, cwg, out.g(), ws.g());
  EXPECT_MATCH(out, d);
  if (saved_u) {
    EXPECT_MATCH(u, d);
  }

  Both gout = Both::random(rng, d, {rows_out, c.out});
  Both gx = Both::poisoned(d, {gather ? c.T : M, c.in});
  Both ga = Both::poisoned(d, {c.E, rank, c.in}), gb = Both::poisoned(d, {c.E, c.out, rank});
  Both gcw = Both::poisoned(DType::f32, {c.T, c.k});
  Both bws =
      workspace(moefuse::moe_linear_backward_workspace_bytes(plan.cpu.plan(), x.c(), w.c(), lc, gather, cwc),
                moefuse::moe_linear_backward_workspace_bytes(plan.gpu(), x.g(), w.g(), lg, gather, cwg));
  moefuse::moe_linear_backward(plan.cpu.plan(), x.c(), w.c(), lc, gather, cwc, gout.c(), gx.c(),
                               moefuse::LoraGrads{ga.c(), gb.c()}, combine ? gcw.c() : TensorView{}, bws.c());
  moefuse::moe_linear_backward(plan.gpu(), x.g(), w.g(), lg, gather, cwg, gout.g(), gx.g(),
                               moefuse::LoraGrads{ga.g(), gb.g()}, combine ? gcw.g() : TensorView{}, bws.g());
  EXPECT_MATCH(gx, d);
  EXPECT_MATCH(ga, d);
  EXPECT_MATCH(gb, d);
  if (combine) {
    EXPECT_CLOSE(gcw.gpu.values(), gcw.cpu.values(), gpu_tol(d));
  }
}

TEST(CudaLinear, LoraMatchesCpu) {
  REQUIRE_GPU();
  for (DType d : mt::kFloatTypes)
    for (const LinearCase& c : {kLinearCases[0], kLinearCases[1], kLinearCases[3], kLinearCases[4]})
      // Hopper's rank-side accumulator 16, 32 and 64 wide (8, 24 and 40 zero-padded), the portable kernel's narrow
      // (r <= 32) and wide tiles, SIMT (r % 8 != 0)
      for (int rank : {16, 8, 24, 4, 40})
        for (bool combine : {false, true}) check_lora(c, d, rank, combine);
}

TEST(CudaLinear, LoraSavedRowsMatchCpu) {
  REQUIRE_GPU();
  for (DType d : mt::kFloatTypes)
    for (const LinearCase& c : {kLinearCases[1], kLinearCases[3]})  // Hopper with bf16 / f16; odd dims
      for (int rank : {16, 40, 4})
        for (bool combine : {false, true}) check_lora(c, d, rank, combine, true);
}

// ~256 Hopper tiles in the forward and in the dgrad: more tiles than SMs; two n-tiles in each, so the later one reads
// low from the first (rank-side accumulators 16 and 64 wide).
TEST(CudaLinear, LoraManyTilesMatchesCpu) {
  REQUIRE_GPU();
  for (int rank : {16, 40})
    for (bool combine : {false, true}) check_lora({128, 8, 200, 264, 264}, DType::bf16, rank, combine);
}

// The up projection with its activation (one kernel on Hopper when I is a multiple of 8, else the two ops).
TEST(CudaLinear, SwigluForwardMatchesCpu) {
  REQUIRE_GPU();
  const LinearCase cases[] = {
      {3, 2, 7, 40, 24},       // one partial tile
      {60, 8, 100, 136, 192},  // many experts, some empty; I = 96
      {128, 8, 300, 256, 272}, // I = 136: a partial column tile
      {8, 2, 1000, 72, 1040},  // larger M, several column tiles
      {1, 1, 7, 13, 14},       // odd dims: the two ops
      {3, 1, 0, 16, 16},       // no tokens
  };
  for (DType d : mt::kFloatTypes)
    for (const LinearCase& c : cases)
      for (bool with_lora : {false, true}) {  // with an r = 16 adapter: its rows first, then the GEMM adds to them
        SCOPED_TRACE(linear_name(c, d, true, false) + (with_lora ? " lora r16" : ""));
        mt::Rng rng("swiglu " + linear_name(c, d, true, false) + (with_lora ? " lora" : ""));
        const std::int64_t M = c.T * c.k, r = 16;
        BothPlan plan(mt::random_ids(rng, c.T, c.k, c.E, true), c.T, c.k, c.E);
        Both x = Both::random(rng, d, {c.T, c.in});
        Both w = Both::random(rng, d, {c.E, c.out, c.in}, 2.0 / std::sqrt(static_cast<double>(c.in)));
        Both la = Both::random(rng, d, {c.E, r, c.in}, 1.0 / std::sqrt(static_cast<double>(c.in)));
        Both lb = Both::random(rng, d, {c.E, c.out, r}, 0.5);
        const moefuse::Lora lc = with_lora ? moefuse::Lora{la.c(), lb.c(), 1.5f} : moefuse::Lora{};
        const moefuse::Lora lg = with_lora ? moefuse::Lora{la.g(), lb.g(), 1.5f} : moefuse::Lora{};
        Both h = Both::poisoned(d, {M, c.out}), a = Both::poisoned(d, {M, c.out / 2});
        Both ws = workspace(moefuse::moe_linear_workspace_bytes(plan.cpu.plan(), x.c(), w.c(), lc, true, TensorView{}),
                            moefuse::moe_linear_workspace_bytes(plan.gpu(), x.g(), w.g(), lg, true, TensorView{}));
        moefuse::moe_linear_swiglu_forward(plan.cpu.plan(), x.c(), w.c(), lc, h.c(), a.c(), ws.c());
        moefuse::moe_linear_swiglu_forward(plan.gpu(), x.g(), w.g(), lg, h.g(), a.g(), ws.g());
        EXPECT_MATCH(h, d);
        EXPECT_MATCH(a, d);
      }
}

// The down projection's backward from h (one row pass after the dgrad on Hopper with bf16, else the three ops).
TEST(CudaLinear, SwigluBackwardMatchesCpu) {
  REQUIRE_GPU();
  const LinearCase cases[] = {
      {3, 2, 7, 24, 40},        // in = I = 24
      {60, 8, 100, 96, 136},    // many experts, some empty
      {128, 8, 300, 136, 256},  // I = 136
      {128, 8, 300, 264, 200},  // I = 264: ~256 dgrad tiles, more than SMs
      {1, 1, 7, 7, 13},         // odd dims: the three ops
      {3, 1, 0, 16, 16},        // no tokens
  };
  enum Mode { kTrained, kFrozen, kLora, kLoraSavedU };
  for (DType d : mt::kFloatTypes)
    for (const LinearCase& c : cases)
      for (Mode mode : {kTrained, kFrozen, kLora, kLoraSavedU}) {
        const char* mode_names[] = {" trained", " frozen", " lora r16", " lora r40 saved u"};
        SCOPED_TRACE(linear_name(c, d, false, true) + mode_names[mode]);
        mt::Rng rng("swiglu bwd " + linear_name(c, d, false, true) + std::to_string(mode));
        const std::int64_t M = c.T * c.k, r = mode == kLoraSavedU ? 40 : 16;  // 40: zero-padded to 64 inside
        BothPlan plan(mt::random_ids(rng, c.T, c.k, c.E, true), c.T, c.k, c.E);
        Both h = Both::random(rng, d, {M, 2 * c.in}, 2.0);
        Both w = Both::random(rng, d, {c.E, c.out, c.in}, 1.0 / std::sqrt(static_cast<double>(c.in)));
        Both la = Both::random(rng, d, {c.E, r, c.in}, 1.0 / std::sqrt(static_cast<double>(c.in)));
        Both lb = Both::random(rng, d, {c.E, c.out, r}, 0.5);
        Vec v(static_cast<std::size_t>(M));
        for (auto& e : v) e = rng.uniform(0.1, 1.0);
        Both cw(mt::make(DType::f32, {c.T, c.k}, v));
        Both gout = Both::random(rng, d, {c.T, c.out});
        Both gh = Both::poisoned(d, {M, 2 * c.in}), gw = Both::poisoned(d, {c.E, c.out, c.in});
        Both ga = Both::poisoned(d, {c.E, r, c.in}), gb = Both::poisoned(d, {c.E, c.out, r});
        Both gcw = Both::poisoned(DType::f32, {c.T, c.k});
        if (mode >= kLora) {
          moefuse::Lora lc{la.c(), lb.c(), 0.75f}, lg{la.g(), lb.g(), 0.75f};
          Both u = Both::poisoned(d, {M, r});
          if (mode == kLoraSavedU) {  // u from each backend's own forward of a = swiglu(h), as the block leaves it
            lc.u = u.c();
            lg.u = u.g();
            Both a = Both::poisoned(d, {M, c.in}), out = Both::poisoned(d, {c.T, c.out});
            moefuse::swiglu_forward(h.c(), a.c());
            moefuse::swiglu_forward(h.g(), a.g());
            Both fws = workspace(moefuse::moe_linear_workspace_bytes(plan.cpu.plan(), a.c(), w.c(), lc, false, cw.c()),
                                 moefuse::moe_linear_workspace_bytes(plan.gpu(), a.g(), w.g(), lg, false, cw.g()));
            moefuse::moe_linear_forward(plan.cpu.plan(), a.c(), w.c(), lc, false, cw.c(), out.c(), fws.c());
            moefuse::moe_linear_forward(plan.gpu(), a.g(), w.g(), lg, false, cw.g(), out.g(), fws.g());
            EXPECT_MATCH(u, d);
          }
          Both ws = workspace(
              moefuse::swiglu_linear_backward_workspace_bytes(plan.cpu.plan(), h.c(), w.c(), lc, cw.c()),
              moefuse::swiglu_linear_backward_workspace_bytes(plan.gpu(), h.g(), w.g(), lg, cw.g()));
          moefuse::swiglu_linear_backward(plan.cpu.plan(), h.c(), w.c(), lc, cw.c(), gout.c(), gh.c(), {ga.c(), gb.c()},
                                          gcw.c(), ws.c());
          moefuse::swiglu_linear_backward(plan.gpu(), h.g(), w.g(), lg, cw.g(), gout.g(), gh.g(), {ga.g(), gb.g()},
                                          gcw.g(), ws.g());
          EXPECT_MATCH(ga, d);
          EXPECT_MATCH(gb, d);
        } else {
          const bool frozen = mode == kFrozen;
          Both ws = workspace(moefuse::swiglu_linear_backward_workspace_bytes(plan.cpu.plan(), h.c(), w.c(), cw.c()),
                              moefuse::swiglu_linear_backward_workspace_bytes(plan.gpu(), h.g(), w.g(), cw.g()));
          moefuse::swiglu_linear_backward(plan.cpu.plan(), h.c(), w.c(), cw.c(), gout.c(), gh.c(),
                                          frozen ? TensorView{} : gw.c(), gcw.c(), ws.c());
          moefuse::swiglu_linear_backward(plan.gpu(), h.g(), w.g(), cw.g(), gout.g(), gh.g(),
                                          frozen ? TensorView{} : gw.g(), gcw.g(), ws.g());
          if (!frozen) {
            EXPECT_MATCH(gw, d);
          }
        }
        EXPECT_MATCH(gh, d);
        EXPECT_CLOSE(gcw.gpu.values(), gcw.cpu.values(), gpu_tol(d));
      }
}

// ---------------------------------------------------------------------------------------------------------------------
// Sizes past int32: a projection whose row buffers hold more than 2^31 elements, so offsets into them need 64-bit
// arithmetic. Such buffers are too big to mirror on the host: the inputs repeat a random block of rows with an odd
// period (an offset wrapped by 2^32 elements, 2^20 rows here, would read another row), and rows at both ends of the
// sorted order and at element 2^31 are compared with a float64 reference, with the weight gradient of the one
// expert whose rows all lie past element 2^31.

// A device buffer [rows, cols], poisoned (0xFF bytes).
struct Big {
  DType dtype;
  std::int64_t rows, cols;
  std::shared_ptr<void> ptr;
  Big(DType d, std::int64_t r, std::int64_t c) : dtype(d), rows(r), cols(c) {
    void* p = nullptr;
    if (cudaMalloc(&p, std::max<std::size_t>(bytes(r), 1)) != cudaSuccess)
      throw std::runtime_error("cudaMalloc failed");
    ptr = std::shared_ptr<void>(p, [](void* q) { cudaFree(q); });
    cudaMemset(p, 0xFF, bytes(r));
  }
  std::size_t bytes(std::int64_t r) const { return static_cast<std::size_t>(r * cols) * moefuse::dtype_size(dtype); }
  char* at(std::int64_t r) const { return static_cast<char*>(ptr.get()) + bytes(r); }
  TensorView view() const { return moefuse::view(ptr.get(), dtype, Device::cuda(0), {rows, cols}); }
  TensorView flat() const { return moefuse::view(ptr.get(), dtype, Device::cuda(0), {rows * cols}); }
  Vec get(std::int64_t r0, std::int64_t r1) const {  // rows [r0, r1)
    Tensor t(dtype, {r1 - r0, cols});
    if (cudaMemcpy(t.data(), at(r0), bytes(r1 - r0), cudaMemcpyDeviceToHost) != cudaSuccess)
      throw std::runtime_error("download failed");
    return t.values();
  }
  // Row i becomes row i % P of `block` [P, cols]: copies of whole periods, doubling.
  void repeat(const Tensor& block, std::int64_t period) {
    std::int64_t n = std::min(period, rows);
    cudaMemcpy(at(0), block.data(), bytes(n), cudaMemcpyHostToDevice);
    for (; n < rows; n *= 2) cudaMemcpy(at(n), at(0), bytes(std::min(n, rows - n)), cudaMemcpyDeviceToDevice);
  }
};

TEST(CudaLinear, RowsPastInt32ElementsMatchReference) {
  REQUIRE_GPU();
  // Every token but the last `tail` picks experts 0-7, those pick 1-8: expert 8's rows come last in sorted order.
  constexpr std::int64_t T = 65600, tail = 100, in = 64, out = 4096, P = 1021, M = T * 8;
  constexpr int k = 8, E = 9;
  constexpr std::int64_t edge = (std::int64_t{1} << 31) / out;  // the row holding element 2^31
  static_assert((M - tail) * out > (std::int64_t{1} << 31), "expert 8's rows must lie past element 2^31");
  Ints ids(static_cast<std::size_t>(M));
  for (std::int64_t t = 0; t < T; ++t)
    for (int j = 0; j < k; ++j) ids[t * k + j] = j + (t >= T - tail);
  BothPlan plan(ids, T, k, E);
  const Ints offsets = plan.cpu.offsets.ints(), sorted = plan.cpu.sorted_pairs.ints(),
             positions = plan.cpu.pair_positions.ints();
  ASSERT_EQ(offsets[E - 1], M - tail);
  ASSERT_EQ(plan.offsets.ints(), offsets);
  ASSERT_EQ(plan.sorted.ints(), sorted);
  std::vector<std::int64_t> rows = {0, 1, 2, 3, edge - 2, edge - 1, edge, edge + 1}, tokens = {0, 1, 2, 3};
  for (std::int64_t i = M - tail; i < M; ++i) rows.push_back(i);
  for (std::int64_t i = edge - 2; i < edge + 2; ++i) tokens.push_back(sorted[i] / k);
  for (std::int64_t t = T - tail; t < T; ++t) tokens.push_back(t);
  const auto expert_of = [&](std::int64_t i) {
    return static_cast<int>(std::upper_bound(offsets.begin(), offsets.end(), i) - offsets.begin() - 1);
  };

  for (DType d : {DType::bf16, DType::f32}) {
    mt::Rng rng(dname(d));
    Vec wv = rng.normals(static_cast<std::size_t>(E * out * in), 1.0 / std::sqrt(static_cast<double>(in)));
    Vec xb = rng.normals(static_cast<std::size_t>(P * in)), gb = rng.normals(static_cast<std::size_t>(P * out));
    Vec cwv(static_cast<std::size_t>(M));
    for (auto& e : cwv) e = rng.uniform(0.1, 1.0);
    const Dev w(mt::make(d, {E, out, in}, wv)), cw(mt::make(DType::f32, {T, k}, cwv));
    const Tensor xblock = mt::make(d, {P, in}, xb), gblock = mt::make(d, {P, out}, gb);
    const auto proj = [&](int e, const double* v) {  // W[e] . v
      Vec y(out, 0.0);
      for (std::int64_t c = 0; c < out; ++c)
        for (std::int64_t q = 0; q < in; ++q) y[c] += wv[(e * out + c) * in + q] * v[q];
      return y;
    };
    const auto proj_t = [&](int e, const Vec& g, Vec& y) {  // y += W[e]^T . g
      for (std::int64_t c = 0; c < out; ++c)
        for (std::int64_t q = 0; q < in; ++q) y[q] += wv[(e * out + c) * in + q] * g[c];
    };
    for (bool gather : {false, true})
      for (bool combine : {false, true}) {
        SCOPED_TRACE(dname(d) + (gather ? " gather" : "") + (combine ? " combine" : ""));
        // Sorted row i reads x row i, or its token's row when gathering; its gradient is grad_out's row i, or its
        // token's row times the routing weight when combining.
        const auto input = [&](std::int64_t i) { return &xb[((gather ? sorted[i] / k : i) % P) * in]; };
        const auto grad_row = [&](std::int64_t i) {
          const std::int64_t r = combine ? sorted[i] / k : i;
          const double s = combine ? cwv[sorted[i]] : 1.0;
          Vec g(gb.begin() + (r % P) * out, gb.begin() + (r % P + 1) * out);
          for (double& e : g) e *= s;
          return g;
        };
        Big x(d, gather ? T : M, in), y(d, combine ? T : M, out), gy(d, combine ? T : M, out);
        Big gx(d, gather ? T : M, in), gcw(DType::f32, T, k);
        x.repeat(xblock, P);
        gy.repeat(gblock, P);
        const TensorView cwg = combine ? cw.view() : TensorView{};
        const auto bytes = [](std::size_t n) { return static_cast<std::int64_t>(n); };
        Big ws(DType::u8, 1, bytes(moefuse::moe_linear_workspace_bytes(plan.gpu(), x.view(), w.view(), gather, cwg)));
        moefuse::moe_linear_forward(plan.gpu(), x.view(), w.view(), gather, cwg, y.view(), ws.flat());
        Dev gw(Tensor(d, {E, out, in}));  // poisoned
        Big bws(DType::u8, 1,
                bytes(moefuse::moe_linear_backward_workspace_bytes(plan.gpu(), x.view(), w.view(), gather, cwg)));
        moefuse::moe_linear_backward(plan.gpu(), x.view(), w.view(), gather, cwg, gy.view(), gx.view(), gw.view(),
                                     combine ? gcw.view() : TensorView{}, bws.flat());
        CUDA_OK(cudaDeviceSynchronize());

        Vec got, want;  // forward rows (or tokens), then gx rows (or tokens)
        const auto add = [&](const Vec& g, const Vec& r) {
          got.insert(got.end(), g.begin(), g.end());
          want.insert(want.end(), r.begin(), r.end());
        };
        Vec got_cw, want_cw;
        for (std::int64_t t : combine ? tokens : rows) {  // forward: sorted rows, or tokens' combined rows
          Vec ref(out, 0.0);
          if (!combine) {
            ref = proj(expert_of(t), input(t));
          } else {
            for (int j = 0; j < k; ++j) {
              const std::int64_t i = positions[t * k + j];
              const Vec r = proj(ids[t * k + j], input(i));
              double dot = 0;
              for (std::int64_t c = 0; c < out; ++c) {
                ref[c] += cwv[t * k + j] * r[c];
                dot += gb[(t % P) * out + c] * r[c];
              }
              want_cw.push_back(dot);
            }
            const Vec g = gcw.get(t, t + 1);
            got_cw.insert(got_cw.end(), g.begin(), g.end());
          }
          add(y.get(t, t + 1), ref);
        }
        for (std::int64_t t : gather ? tokens : rows) {  // dX: sorted rows, or tokens summing their k rows
          Vec ref(in, 0.0);
          if (!gather)
            proj_t(expert_of(t), grad_row(t), ref);
          else
            for (int j = 0; j < k; ++j) proj_t(ids[t * k + j], grad_row(positions[t * k + j]), ref);
          add(gx.get(t, t + 1), ref);
        }
        EXPECT_CLOSE(got, want, gpu_tol(d));
        if (combine) {
          EXPECT_CLOSE(got_cw, want_cw, gpu_tol(d));
        }
        // dW: every expert written; expert 8's rows, all past element 2^31 of the rows, against the reference.
        const Vec gwv = gw.values();
        for (double e : gwv) ASSERT_FALSE(std::isnan(e)) << "an unwritten weight gradient";
        Vec ref(static_cast<std::size_t>(out * in), 0.0);
        for (std::int64_t i = M - tail; i < M; ++i) {
          const Vec g = grad_row(i);
          const double* v = input(i);
          for (std::int64_t c = 0; c < out; ++c)
            for (std::int64_t q = 0; q < in; ++q) ref[c * in + q] += g[c] * v[q];
        }
        EXPECT_CLOSE(Vec(gwv.end() - out * in, gwv.end()), ref, gpu_tol(d));
      }
  }
}

// ---------------------------------------------------------------------------------------------------------------------
TEST(CudaSwiglu, MatchesCpu) {
  REQUIRE_GPU();
  for (DType d : mt::kFloatTypes)
    for (std::int64_t R : {0, 1, 7, 1000})
      for (std::int64_t I : {1, 8, 13, 768}) {
        SCOPED_TRACE(dname(d) + " R" + std::to_string(R) + " I" + std::to_string(I));
        mt::Rng rng(dname(d) + std::to_string(R * 10000 + I));
        Both h = Both::random(rng, d, {R, 2 * I}, 2.0);
        Both a = Both::poisoned(d, {R, I});
        moefuse::swiglu_forward(h.c(), a.c());
        moefuse::swiglu_forward(h.g(), a.g());
        EXPECT_MATCH(a, d);
        Both ga = Both::random(rng, d, {R, I});
        Both gh = Both::poisoned(d, {R, 2 * I});
        moefuse::swiglu_backward(h.c(), ga.c(), gh.c());
        moefuse::swiglu_backward(h.g(), ga.g(), gh.g());
        EXPECT_MATCH(gh, d);
      }
}

// ---------------------------------------------------------------------------------------------------------------------
// The block on both backends. Router choices can differ between backends where two logits round to neighbours
// (16-bit dtypes); tokens whose choices differ are left out of the output comparison, and weight gradients are
// compared only when every choice agrees.
struct Block {
  moefuse::MoeConfig cfg;
  std::int64_t T;
  DType d;
  Both x, router, gate_up, down, out, logits, saved, fws, gout, gx, grouter, ggu, gdown, bws;

  Block(moefuse::MoeConfig c, std::int64_t tokens, DType dtype, const std::string& seed) : cfg(c), T(tokens), d(dtype) {
    mt::Rng rng(seed);
    const std::int64_t H = cfg.hidden, I = cfg.intermediate, E = cfg.experts;
    x = Both::random(rng, d, {T, H});
    router = Both::random(rng, d, {E, H}, 1.0 / std::sqrt(static_cast<double>(H)));
    gate_up = Both::random(rng, d, {E, 2 * I, H}, 0.02);
    down = Both::random(rng, d, {E, H, I}, 0.02);
    gout = Both::random(rng, d, {T, H});
  }
  moefuse::MoeWeights weights(bool gpu) const {
    return gpu ? mt::weights_of(router.g(), gate_up.g(), down.g()) : mt::weights_of(router.c(), gate_up.c(), down.c());
  }
  // Runs forward and backward on one side (its outputs poisoned first). Only that side's buffers are replaced, so
  // the other side's results stay for the comparison.
  void run(bool gpu, bool frozen) {
    const std::int64_t H = cfg.hidden, I = cfg.intermediate, E = cfg.experts;
    auto fresh = [&](Both& b, std::vector<std::int64_t> shape) {
      Tensor t(d, std::move(shape));
      t.poison();
      if (gpu) b.gpu = Dev(t); else b.cpu = t;
    };
    auto scratch = [&](Both& b, std::size_t bytes) {
      if (gpu) b.gpu = Dev(mt::scratch(bytes)); else b.cpu = mt::scratch(bytes);
    };
    fresh(out, {T, H});
    fresh(logits, {T, E});
    fresh(gx, {T, H});
    fresh(grouter, {E, H});
    fresh(ggu, {E, 2 * I, H});
    fresh(gdown, {E, H, I});
    const moefuse::MoeWeights w = weights(gpu);
    auto v = [&](const Both& b) { return gpu ? b.g() : b.c(); };
    scratch(saved, moefuse::moe_saved_bytes(cfg, T, d));
    scratch(fws, moefuse::moe_forward_workspace_bytes(cfg, v(x), w));
    const moefuse::MoeGrads g = frozen ? mt::grads_of(v(gx), v(grouter), TensorView{}, TensorView{})
                                       : mt::grads_of(v(gx), v(grouter), v(ggu), v(gdown));
    scratch(bws, moefuse::moe_backward_workspace_bytes(cfg, v(x), w, g));
    step(gpu, frozen);
    if (gpu) {
      EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    }
  }
  // Forward and backward on the buffers run() allocated: launches only, so a CUDA graph can capture it.
  void step(bool gpu, bool frozen, void* stream = nullptr) {
    auto v = [&](const Both& b) { return gpu ? b.g() : b.c(); };
    const moefuse::MoeWeights w = weights(gpu);
    moefuse::moe_forward(cfg, v(x), w, v(out), v(logits), v(saved), v(fws), stream);
    const moefuse::MoeGrads g = frozen ? mt::grads_of(v(gx), v(grouter), TensorView{}, TensorView{})
                                       : mt::grads_of(v(gx), v(grouter), v(ggu), v(gdown));
    moefuse::moe_backward(cfg, v(x), w, v(logits), v(saved), v(gout), TensorView{}, g, v(bws), stream);
  }
  Ints ids(bool gpu) const {
    const TensorView sv = gpu ? saved.g() : saved.c();
    moefuse::MoeSaved s = moefuse::moe_saved_view(cfg, T, d, sv);
    if (!gpu) return mt::ints(s.topk_ids);
    Tensor t(DType::i32, {T, cfg.top_k});
    cudaMemcpy(t.data(), s.topk_ids.data, t.numel() * 4, cudaMemcpyDeviceToHost);
    return t.ints();
  }
};

void compare_block(Block& b, bool frozen, double tol) {
  b.run(false, frozen);
  b.run(true, frozen);
  const Ints ic = b.ids(false), ig = b.ids(true);
  const std::int64_t H = b.cfg.hidden, k = b.cfg.top_k;
  std::vector<bool> same(static_cast<std::size_t>(b.T), true);
  std::int64_t differ = 0;
  for (std::int64_t t = 0; t < b.T; ++t) {
    for (std::int64_t j = 0; j < k; ++j) same[t] = same[t] && ic[t * k + j] == ig[t * k + j];
    differ += !same[t];
  }
  EXPECT_LE(differ, b.T / 50 + 1) << "tokens whose router choices differ between backends";
  auto rows = [&](const Vec& v) {
    Vec r;
    for (std::int64_t t = 0; t < b.T; ++t)
      if (same[t]) r.insert(r.end(), v.begin() + t * H, v.begin() + (t + 1) * H);
    return r;
  };
  EXPECT_CLOSE(b.logits.gpu.values(), b.logits.cpu.values(), tol);
  EXPECT_CLOSE(rows(b.out.gpu.values()), rows(b.out.cpu.values()), tol);
  if (differ == 0) {
    EXPECT_CLOSE(b.gx.gpu.values(), b.gx.cpu.values(), tol);
    EXPECT_CLOSE(b.grouter.gpu.values(), b.grouter.cpu.values(), tol);
    if (!frozen) {
      EXPECT_CLOSE(b.ggu.gpu.values(), b.ggu.cpu.values(), tol);
      EXPECT_CLOSE(b.gdown.gpu.values(), b.gdown.cpu.values(), tol);
    }
  }
}

TEST(CudaBlock, SmallShapesMatchCpu) {
  REQUIRE_GPU();
  for (DType d : mt::kFloatTypes)
    for (bool frozen : {false, true}) {
      SCOPED_TRACE(dname(d) + (frozen ? " frozen" : ""));
      Block b({96, 40, 8, 2, true}, 100, d, "small" + dname(d));
      compare_block(b, frozen, gpu_tol(d));
      Block odd({50, 13, 3, 3, false}, 7, d, "odd" + dname(d));
      compare_block(odd, frozen, gpu_tol(d));
    }
}

const moefuse::MoeConfig kQwen30B{2048, 768, 128, 8, true};

TEST(CudaBlock, Qwen3_30B_A3B_MatchesCpu) {
  REQUIRE_GPU();
  Block b(kQwen30B, 256, DType::bf16, "qwen");
  compare_block(b, false, gpu_tol(DType::bf16));
}

// Two runs of the full-size bf16 block give the same bits (no atomics in any float sum).
TEST(CudaBlock, Qwen3_30B_A3B_Deterministic) {
  REQUIRE_GPU();
  Block b(kQwen30B, 4096, DType::bf16, "det");
  b.run(true, false);
  const auto out = b.out.gpu.bytes(), gx = b.gx.gpu.bytes(), ggu = b.ggu.gpu.bytes(), gdown = b.gdown.gpu.bytes(),
             grouter = b.grouter.gpu.bytes();
  b.run(true, false);
  EXPECT_TRUE(out == b.out.gpu.bytes());
  EXPECT_TRUE(gx == b.gx.gpu.bytes());
  EXPECT_TRUE(ggu == b.ggu.gpu.bytes());
  EXPECT_TRUE(gdown == b.gdown.gpu.bytes());
  EXPECT_TRUE(grouter == b.grouter.gpu.bytes());
  // And no NaN anywhere.
  for (const Vec& v : {b.out.gpu.values(), b.gx.gpu.values(), b.gdown.gpu.values()})
    for (double e : v) ASSERT_FALSE(std::isnan(e));
}

// A forward+backward step captured in a CUDA graph replays to the eager step's bits: nothing in it synchronises
// with the host, allocates, or depends on the routing on the host side. Both grouped-GEMM paths (bf16 at these
// 8-aligned sizes takes the sm_90a one on Hopper; f32 the portable one).
TEST(CudaBlock, StepReplaysFromACudaGraph) {
  REQUIRE_GPU();
  for (DType d : {DType::bf16, DType::f32}) {
    SCOPED_TRACE(dname(d));
    Block b({96, 40, 8, 2, true}, 333, d, "graph" + dname(d));
    b.run(true, false);  // the eager reference; allocates every buffer the step uses
    const std::vector<const Both*> outs = {&b.out, &b.logits, &b.gx, &b.grouter, &b.ggu, &b.gdown};
    std::vector<std::vector<char>> eager;
    for (const Both* o : outs) eager.push_back(o->gpu.bytes());
    for (const Both* o : outs) o->gpu.poison();
    CUDA_OK(cudaDeviceSynchronize());

    cudaStream_t stream;
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    b.step(true, false, stream);
    CUDA_OK(cudaStreamEndCapture(stream, &graph));
    CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
    CUDA_OK(cudaGraphLaunch(exec, stream));
    CUDA_OK(cudaStreamSynchronize(stream));
    for (std::size_t i = 0; i < outs.size(); ++i) EXPECT_TRUE(eager[i] == outs[i]->gpu.bytes()) << "output " << i;
    CUDA_OK(cudaGraphExecDestroy(exec));
    CUDA_OK(cudaGraphDestroy(graph));
    CUDA_OK(cudaStreamDestroy(stream));
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// 4-bit weights: the same bytes as the CPU backend from quantizing, the same values from dequantizing (both paths:
// rows of a multiple of 8 and odd ones), and the block given 4-bit weights the same bits as given their dequantized
// copies, with its adapters or without, at a Hopper shape and an odd one.
TEST(CudaNf4, QuantizeDequantizeMatchCpu) {
  REQUIRE_GPU();
  mt::Rng rng;
  for (DType d : mt::kFloatTypes)
    for (const std::int64_t in : {768, 200, 63, 1}) {
      SCOPED_TRACE(dname(d) + " in=" + std::to_string(in));
      Both w = Both::random(rng, d, {3, 5, in}, 0.05);
      Both packed = Both::poisoned(DType::u8, {3, 5, moefuse::nf4_row_bytes(in)});
      moefuse::nf4_quantize(w.c(), packed.c());
      moefuse::nf4_quantize(w.g(), packed.g());
      const auto* c = static_cast<const char*>(packed.cpu.data());
      EXPECT_TRUE(packed.gpu.bytes() == std::vector<char>(c, c + packed.cpu.numel()));
      Both out = Both::poisoned(d, {3, 5, in});
      moefuse::nf4_dequantize(packed.c(), out.c());
      moefuse::nf4_dequantize(packed.g(), out.g());
      EXPECT_EQ(out.gpu.values(), out.cpu.values());
    }
}

// The block on 4-bit weights against the block on the dequantized weights: the ops dequantize into workspace, then
// run the same kernels, so every output agrees to the bit, frozen and with adapters of every rank the Hopper forms
// take (and 64).
void expect_nf4_block_matches(const moefuse::MoeConfig& cfg, std::int64_t T, DType d) {
  mt::Rng rng("nf4" + std::to_string(cfg.hidden) + dname(d));
  const std::int64_t H = cfg.hidden, I = cfg.intermediate, E = cfg.experts;
  Both x = Both::random(rng, d, {T, H}), router = Both::random(rng, d, {E, H}, 1.0 / std::sqrt(double(H))),
       gout = Both::random(rng, d, {T, H});
  Dev packed[2], dense[2];
  const std::int64_t shapes[2][3] = {{E, 2 * I, H}, {E, H, I}};
  for (int i = 0; i < 2; ++i) {
    Both w = Both::random(rng, d, {shapes[i][0], shapes[i][1], shapes[i][2]}, 0.02);
    packed[i] = Dev(Tensor(DType::u8, {shapes[i][0], shapes[i][1], moefuse::nf4_row_bytes(shapes[i][2])}));
    dense[i] = Dev(Tensor(d, {shapes[i][0], shapes[i][1], shapes[i][2]}));
    moefuse::nf4_quantize(w.g(), packed[i].view());
    moefuse::nf4_dequantize(packed[i].view(), dense[i].view());
  }
  for (const std::int64_t r : {0, 16, 32, 64}) {
    SCOPED_TRACE(std::to_string(cfg.hidden) + " " + dname(d) + " rank " + std::to_string(r));
    const std::int64_t rr = r ? r : 8;
    Both a_up = Both::random(rng, d, {E, rr, H}, 0.05), b_up = Both::random(rng, d, {E, 2 * I, rr}, 0.05),
         a_dn = Both::random(rng, d, {E, rr, I}, 0.05), b_dn = Both::random(rng, d, {E, H, rr}, 0.05);
    auto step = [&](const TensorView& gate_up, const TensorView& down) {
      moefuse::MoeWeights w = mt::weights_of(router.g(), gate_up, down);
      if (r) {
        w.gate_up_lora = {a_up.g(), b_up.g(), 2.f};
        w.down_lora = {a_dn.g(), b_dn.g(), 2.f};
      }
      Dev out(Tensor(d, {T, H})), logits(Tensor(d, {T, E})), gx(Tensor(d, {T, H})), gr(Tensor(d, {E, H})),
          ga(Tensor(d, {E, rr, H})), gb(Tensor(d, {E, 2 * I, rr})), gad(Tensor(d, {E, rr, I})),
          gbd(Tensor(d, {E, H, rr}));
      for (const Dev* o : {&out, &logits, &gx, &gr, &ga, &gb, &gad, &gbd}) o->poison();
      Dev saved(mt::scratch(moefuse::moe_saved_bytes(cfg, T, d)));
      Dev fws(mt::scratch(moefuse::moe_forward_workspace_bytes(cfg, x.g(), w)));
      moefuse::moe_forward(cfg, x.g(), w, out.view(), logits.view(), saved.view(), fws.view());
      moefuse::MoeGrads g = mt::grads_of(gx.view(), gr.view(), TensorView{}, TensorView{});
      if (r) {
        g.gate_up_lora = {ga.view(), gb.view()};
        g.down_lora = {gad.view(), gbd.view()};
      }
      Dev bws(mt::scratch(moefuse::moe_backward_workspace_bytes(cfg, x.g(), w, g)));
      moefuse::moe_backward(cfg, x.g(), w, logits.view(), saved.view(), gout.g(), TensorView{}, g, bws.view());
      EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      std::vector<Vec> res = {out.values(), logits.values(), gx.values(), gr.values()};
      if (r)
        for (const Dev* o : {&ga, &gb, &gad, &gbd}) res.push_back(o->values());
      return res;
    };
    const auto want = step(dense[0].view(), dense[1].view()), got = step(packed[0].view(), packed[1].view());
    for (std::size_t i = 0; i < want.size(); ++i) EXPECT_EQ(got[i], want[i]) << "output " << i;
  }
}

TEST(CudaNf4, BlockMatchesDequantizedWeights) {
  REQUIRE_GPU();
  // Partial runs of 64 (200, 72), idle experts (12 experts, 5 tokens), f16, and sizes only the dequantizing path takes.
  const moefuse::MoeConfig odd{200, 72, 12, 2, true}, small{50, 13, 3, 3, true};
  expect_nf4_block_matches(odd, 5, DType::bf16);
  expect_nf4_block_matches(odd, 37, DType::f16);
  expect_nf4_block_matches(small, 7, DType::bf16);
}

TEST(CudaNf4, Qwen30BBlockMatchesDequantizedWeights) {
  REQUIRE_GPU();
  expect_nf4_block_matches(kQwen30B, 256, DType::bf16);
}

}  // namespace
