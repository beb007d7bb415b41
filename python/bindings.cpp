// nanobind module moefuse._C: the C++ API, one function per op, tensors in through DLPack (no torch C++ ABI).
// Python owns every buffer; this file only converts arguments. An op sizes its own workspace and asks Python for it
// through `alloc`, so that its arguments cross DLPack once per call (each crossing costs microseconds of host time).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "moefuse/moefuse.h"

namespace nb = nanobind;
using namespace nb::literals;
using moefuse::TensorView;

namespace {

using Array = nb::ndarray<>;
using OptArray = std::optional<Array>;
// A stacked LoRA adapter crosses as (a, b, scale, u, staged_b); a or b left None is reported by the op. u and
// staged_b, optional, are byte offsets in the experts or block op's saved state, which keeps them from forward to
// backward: of the adapter's rows [T*k, r] and of b [E, out, r] as the op stages it. Offsets rather than tensors:
// views made in Python cost the host a torch op each.
using OptOffset = std::optional<std::int64_t>;
using OptLora = std::optional<std::tuple<OptArray, OptArray, float, OptOffset, OptOffset>>;

moefuse::DType to_dtype(nb::dlpack::dtype t, const char* name) {
  using Code = nb::dlpack::dtype_code;
  const auto code = static_cast<Code>(t.code);
  if (t.lanes == 1) {
    if (code == Code::Float && t.bits == 32) return moefuse::DType::f32;
    if (code == Code::Float && t.bits == 16) return moefuse::DType::f16;
    if (code == Code::Bfloat && t.bits == 16) return moefuse::DType::bf16;
    if (code == Code::Int && t.bits == 32) return moefuse::DType::i32;
    if (code == Code::UInt && t.bits == 8) return moefuse::DType::u8;
  }
  throw moefuse::Error(std::string("moefuse: ") + name + " has an unsupported dtype (code " +
                       std::to_string(t.code) + ", " + std::to_string(t.bits) +
                       " bits); expected float32, bfloat16, float16, int32 or uint8");
}

TensorView to_view(const Array& a, const char* name) {
  TensorView v;
  if (a.ndim() > static_cast<size_t>(moefuse::kMaxDims))
    throw moefuse::Error(std::string("moefuse: ") + name + " has " + std::to_string(a.ndim()) +
                         " dimensions; at most 4 are supported");
  v.dtype = to_dtype(a.dtype(), name);
  if (a.device_type() == nb::device::cpu::value)
    v.device = moefuse::Device::cpu();
  else if (a.device_type() == nb::device::cuda::value)
    v.device = moefuse::Device::cuda(a.device_id());
  else
    throw moefuse::Error(std::string("moefuse: ") + name + " is on an unsupported device (DLPack type " +
                         std::to_string(a.device_type()) + "); expected cpu or cuda");
  v.data = a.data();
  v.ndim = static_cast<int>(a.ndim());
  std::int64_t contiguous = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.shape[d] = static_cast<std::int64_t>(a.shape(d));
    v.stride[d] = a.stride_ptr() ? a.stride(d) : contiguous;  // DLPack allows null strides = row-major
    contiguous *= v.shape[d];
  }
  return v;
}

TensorView to_view(const OptArray& a, const char* name) { return a ? to_view(*a, name) : TensorView{}; }

// The contiguous piece of `saved` at byte `offset` (undefined without one), of `shape` in `dtype`.
TensorView saved_piece(const TensorView& saved, const OptOffset& offset, moefuse::DType dtype,
                       std::initializer_list<std::int64_t> shape, const char* name) {
  if (!offset) return {};
  if (!saved.defined()) throw moefuse::Error(std::string("moefuse: ") + name + " must be None for this op");
  std::size_t nbytes = moefuse::dtype_size(dtype);
  for (const std::int64_t d : shape) nbytes *= static_cast<std::size_t>(d);
  if (*offset < 0 || *offset % 16 != 0 || static_cast<std::size_t>(*offset) + nbytes > saved.nbytes())
    throw moefuse::Error(std::string("moefuse: ") + name + " at byte " + std::to_string(*offset) + " does not fit " +
                         "16-byte aligned in the saved state of " + std::to_string(saved.nbytes()) + " bytes");
  return moefuse::view(static_cast<std::byte*>(saved.data) + *offset, dtype, saved.device, shape);
}

// An adapter; u and staged_b as pieces of the op's saved state (rows: T*k; dtype: the weights').
moefuse::Lora to_lora(const OptLora& l, const TensorView& saved = {}, std::int64_t rows = 0,
                      moefuse::DType dtype = moefuse::DType::f32) {
  if (!l) return {};
  moefuse::Lora r{to_view(std::get<0>(*l), "lora.a"), to_view(std::get<1>(*l), "lora.b"), std::get<2>(*l)};
  const TensorView &a = r.a, &b = r.b;
  r.u = saved_piece(saved, std::get<3>(*l), dtype, {rows, a.shape[1]}, "lora.u");
  r.staged_b = saved_piece(saved, std::get<4>(*l), dtype, {b.shape[0], b.shape[1], b.shape[2]}, "lora.staged_b");
  return r;
}

void* to_stream(std::uintptr_t stream) { return reinterpret_cast<void*>(stream); }

// Binds an op of two tensors and a stream, its arguments named as in the C++ API (and so in its errors).
void def_two(nb::module_& m, const char* name, void (*op)(TensorView, TensorView, void*), const char* a,
             const char* b) {
  m.def(
      name,
      [op, a, b](const Array& x, const Array& y, std::uintptr_t stream) {
        op(to_view(x, a), to_view(y, b), to_stream(stream));
      },
      nb::arg(a), nb::arg(b), "stream"_a = 0, nb::call_guard<nb::gil_scoped_release>());
}

// An op's workspace: alloc(nbytes) -> a u8 tensor from Python, not called for 0 bytes; the array keeps it alive for
// the call.
struct Scratch {
  OptArray array;
  TensorView view;
};

Scratch scratch(const nb::callable& alloc, std::size_t nbytes) {
  Scratch s;
  if (nbytes) {
    s.array = nb::cast<Array>(alloc(nbytes));
    s.view = to_view(*s.array, "workspace");
  }
  return s;
}

// A plan crosses as (tokens, top_k, experts, counts, offsets, sorted_pairs, pair_positions, invalid); the arrays
// are kept alive here for the duration of the call.
struct PlanArg {
  Array arrays[5];
  moefuse::Plan plan;
};

PlanArg to_plan(const nb::tuple& t) {
  if (t.size() != 8)
    throw moefuse::Error("moefuse: a plan is (tokens, top_k, experts, counts, offsets, sorted_pairs, "
                         "pair_positions, invalid)");
  PlanArg p;
  p.plan.tokens = nb::cast<std::int64_t>(t[0]);
  p.plan.top_k = nb::cast<int>(t[1]);
  p.plan.experts = nb::cast<int>(t[2]);
  static const char* names[5] = {"plan.counts", "plan.offsets", "plan.sorted_pairs", "plan.pair_positions",
                                 "plan.invalid"};
  TensorView* views[5] = {&p.plan.counts, &p.plan.offsets, &p.plan.sorted_pairs, &p.plan.pair_positions,
                          &p.plan.invalid};
  for (int i = 0; i < 5; ++i) {
    p.arrays[i] = nb::cast<Array>(t[3 + i]);
    *views[i] = to_view(p.arrays[i], names[i]);
  }
  return p;
}

moefuse::MoeGrads to_grads(const OptArray& x, const OptArray& router, const OptArray& gate_up, const OptArray& down,
                           const OptArray& gate_up_a, const OptArray& gate_up_b, const OptArray& down_a,
                           const OptArray& down_b) {
  return {to_view(x, "grads.x"),
          to_view(router, "grads.router"),
          to_view(gate_up, "grads.gate_up"),
          to_view(down, "grads.down"),
          {to_view(gate_up_a, "grads.gate_up_lora.a"), to_view(gate_up_b, "grads.gate_up_lora.b")},
          {to_view(down_a, "grads.down_lora.a"), to_view(down_b, "grads.down_lora.b")}};
}

// The weights (no router for the experts ops) with their optional adapters, whose u and staged_b are pieces of
// `saved` in x's dtype (rows: the token-expert pairs).
moefuse::MoeWeights to_weights(const OptArray& router, const Array& gate_up, const Array& down,
                               const OptLora& gate_up_lora, const OptLora& down_lora, const TensorView& saved,
                               std::int64_t rows, moefuse::DType dtype) {
  moefuse::MoeWeights w{to_view(router, "router weight"), to_view(gate_up, "gate_up"), to_view(down, "down")};
  w.gate_up_lora = to_lora(gate_up_lora, saved, rows, dtype);
  w.down_lora = to_lora(down_lora, saved, rows, dtype);
  return w;
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "moefuse C++ ops (see include/moefuse/ops.h and block.h for their meaning)";
  nb::exception<moefuse::Error>(m, "MoefuseError", PyExc_ValueError);

  nb::enum_<moefuse::DType>(m, "DType")
      .value("f32", moefuse::DType::f32)
      .value("f16", moefuse::DType::f16)
      .value("bf16", moefuse::DType::bf16)
      .value("i32", moefuse::DType::i32)
      .value("u8", moefuse::DType::u8);

  nb::class_<moefuse::MoeConfig>(m, "MoeConfig")
      .def(
          "__init__",
          [](moefuse::MoeConfig* c, std::int64_t hidden, std::int64_t intermediate, int experts, int top_k,
             bool renormalize) { new (c) moefuse::MoeConfig{hidden, intermediate, experts, top_k, renormalize}; },
          "hidden"_a, "intermediate"_a, "experts"_a, "top_k"_a, "renormalize"_a)
      .def_rw("hidden", &moefuse::MoeConfig::hidden)
      .def_rw("intermediate", &moefuse::MoeConfig::intermediate)
      .def_rw("experts", &moefuse::MoeConfig::experts)
      .def_rw("top_k", &moefuse::MoeConfig::top_k)
      .def_rw("renormalize", &moefuse::MoeConfig::renormalize);

  m.def("has_cuda", &moefuse::has_cuda);

  const auto release = nb::call_guard<nb::gil_scoped_release>();

  // 4-bit weights.
  m.def("nf4_row_bytes", &moefuse::nf4_row_bytes, "in"_a);
  def_two(m, "nf4_quantize", &moefuse::nf4_quantize, "weight", "packed");
  def_two(m, "nf4_dequantize", &moefuse::nf4_dequantize, "packed", "weight");

  // Router.
  m.def(
      "router_forward",
      [](const Array& logits, int top_k, bool renormalize, const Array& ids, const Array& weights,
         std::uintptr_t stream) {
        moefuse::router_forward(to_view(logits, "logits"), top_k, renormalize, to_view(ids, "topk_ids"),
                                to_view(weights, "topk_weights"), to_stream(stream));
      },
      "logits"_a, "top_k"_a, "renormalize"_a, "topk_ids"_a, "topk_weights"_a, "stream"_a = 0, release);
  m.def(
      "router_backward",
      [](const Array& logits, const Array& ids, bool renormalize, const Array& grad_weights, const Array& grad_logits,
         std::uintptr_t stream) {
        moefuse::router_backward(to_view(logits, "logits"), to_view(ids, "topk_ids"), renormalize,
                                 to_view(grad_weights, "grad_topk_weights"), to_view(grad_logits, "grad_logits"),
                                 to_stream(stream));
      },
      "logits"_a, "topk_ids"_a, "renormalize"_a, "grad_topk_weights"_a, "grad_logits"_a, "stream"_a = 0, release);

  // Routing plan.
  m.def(
      "routing_plan",
      [](const Array& ids, const nb::tuple& plan, const nb::callable& alloc, std::uintptr_t stream) {
        PlanArg p = to_plan(plan);
        const TensorView iv = to_view(ids, "topk_ids");
        const Scratch ws = scratch(alloc, moefuse::routing_plan_workspace_bytes(p.plan, iv));
        nb::gil_scoped_release nogil;
        moefuse::routing_plan(iv, p.plan, ws.view, to_stream(stream));
      },
      "topk_ids"_a, "plan"_a, "alloc"_a, "stream"_a = 0);
  m.def(
      "check_plan",
      [](const nb::tuple& plan, std::uintptr_t stream) {
        PlanArg p = to_plan(plan);
        nb::gil_scoped_release nogil;
        moefuse::check_plan(p.plan, to_stream(stream));
      },
      "plan"_a, "stream"_a = 0);

  // Grouped expert linear; lora = (a, b, scale, u) selects the LoRA overloads (None: no adapter).
  m.def(
      "moe_linear_forward",
      [](const nb::tuple& plan, const Array& x, const Array& weight, bool gather, const OptArray& combine,
         const Array& out, const nb::callable& alloc, std::uintptr_t stream, const OptLora& lora) {
        PlanArg p = to_plan(plan);
        const TensorView xv = to_view(x, "x"), wv = to_view(weight, "weight"), cv = to_view(combine, "combine_weights");
        const moefuse::Lora lv = to_lora(lora);
        const Scratch ws = scratch(alloc, moefuse::moe_linear_workspace_bytes(p.plan, xv, wv, lv, gather, cv));
        nb::gil_scoped_release nogil;
        moefuse::moe_linear_forward(p.plan, xv, wv, lv, gather, cv, to_view(out, "out"), ws.view, to_stream(stream));
      },
      "plan"_a, "x"_a, "weight"_a, "gather"_a, "combine_weights"_a.none(), "out"_a, "alloc"_a, "stream"_a = 0,
      "lora"_a.none() = nb::none());
  m.def(
      "moe_linear_backward",
      [](const nb::tuple& plan, const Array& x, const Array& weight, bool gather, const OptArray& combine,
         const Array& grad_out, const OptArray& grad_x, const OptArray& grad_weight, const OptArray& grad_combine,
         const nb::callable& alloc, std::uintptr_t stream, const OptLora& lora, const OptArray& grad_lora_a,
         const OptArray& grad_lora_b) {
        PlanArg p = to_plan(plan);
        const TensorView xv = to_view(x, "x"), wv = to_view(weight, "weight"), cv = to_view(combine, "combine_weights");
        const TensorView gov = to_view(grad_out, "grad_out"), gxv = to_view(grad_x, "grad_x");
        const TensorView gcv = to_view(grad_combine, "grad_combine_weights");
        const moefuse::Lora lv = to_lora(lora);
        const Scratch ws = scratch(alloc, moefuse::moe_linear_backward_workspace_bytes(p.plan, xv, wv, lv, gather, cv));
        if (!lora && !grad_lora_a && !grad_lora_b) {
          nb::gil_scoped_release nogil;
          moefuse::moe_linear_backward(p.plan, xv, wv, gather, cv, gov, gxv, to_view(grad_weight, "grad_weight"), gcv,
                                       ws.view, to_stream(stream));
          return;
        }
        if (grad_weight)
          throw moefuse::Error("moefuse: moe_linear_backward: grad_weight given with a lora; LoRA freezes the base "
                               "weight");
        const moefuse::LoraGrads grad_lora{to_view(grad_lora_a, "grad_lora_a"), to_view(grad_lora_b, "grad_lora_b")};
        nb::gil_scoped_release nogil;
        moefuse::moe_linear_backward(p.plan, xv, wv, lv, gather, cv, gov, gxv, grad_lora, gcv, ws.view,
                                     to_stream(stream));
      },
      "plan"_a, "x"_a, "weight"_a, "gather"_a, "combine_weights"_a.none(), "grad_out"_a, "grad_x"_a.none(),
      "grad_weight"_a.none(), "grad_combine_weights"_a.none(), "alloc"_a, "stream"_a = 0,
      "lora"_a.none() = nb::none(), "grad_lora_a"_a.none() = nb::none(), "grad_lora_b"_a.none() = nb::none());

  // SwiGLU.
  def_two(m, "swiglu_forward", &moefuse::swiglu_forward, "h", "a");
  m.def(
      "swiglu_backward",
      [](const Array& h, const Array& grad_a, const Array& grad_h, std::uintptr_t stream) {
        moefuse::swiglu_backward(to_view(h, "h"), to_view(grad_a, "grad_a"), to_view(grad_h, "grad_h"),
                                 to_stream(stream));
      },
      "h"_a, "grad_a"_a, "grad_h"_a, "stream"_a = 0, release);

  // The experts alone (routing given from outside), each projection with an optional stacked LoRA (to_lora).
  m.def("moe_experts_saved_bytes", &moefuse::moe_experts_saved_bytes, "cfg"_a, "tokens"_a, "dtype"_a);
  m.def(
      "moe_experts_forward",
      [](const moefuse::MoeConfig& cfg, const Array& x, const Array& topk_ids, const Array& topk_weights,
         const Array& gate_up, const Array& down, const Array& out, const Array& saved, const nb::callable& alloc,
         std::uintptr_t stream, const OptLora& gate_up_lora, const OptLora& down_lora) {
        const TensorView xv = to_view(x, "x"), ids = to_view(topk_ids, "topk_ids"), sv = to_view(saved, "saved");
        const moefuse::MoeWeights w =
            to_weights(std::nullopt, gate_up, down, gate_up_lora, down_lora, sv, ids.numel(), xv.dtype);
        const Scratch ws = scratch(alloc, moefuse::moe_experts_forward_workspace_bytes(cfg, xv, w));
        nb::gil_scoped_release nogil;
        moefuse::moe_experts_forward(cfg, xv, ids, to_view(topk_weights, "topk_weights"), w, to_view(out, "out"), sv,
                                     ws.view, to_stream(stream));
      },
      "cfg"_a, "x"_a, "topk_ids"_a, "topk_weights"_a, "gate_up"_a, "down"_a, "out"_a, "saved"_a, "alloc"_a,
      "stream"_a = 0, "gate_up_lora"_a.none() = nb::none(), "down_lora"_a.none() = nb::none());
  m.def(
      "moe_experts_backward",
      [](const moefuse::MoeConfig& cfg, const Array& x, const Array& topk_weights, const Array& gate_up,
         const Array& down, const Array& saved, const Array& grad_out, const OptArray& grad_x,
         const OptArray& grad_gate_up, const OptArray& grad_down, const OptArray& grad_topk_weights,
         const nb::callable& alloc, std::uintptr_t stream, const OptLora& gate_up_lora, const OptLora& down_lora,
         const OptArray& grad_gate_up_a, const OptArray& grad_gate_up_b, const OptArray& grad_down_a,
         const OptArray& grad_down_b) {
        const moefuse::MoeGrads grads = to_grads(grad_x, std::nullopt, grad_gate_up, grad_down, grad_gate_up_a,
                                                 grad_gate_up_b, grad_down_a, grad_down_b);
        const TensorView xv = to_view(x, "x"), wv = to_view(topk_weights, "topk_weights"), sv = to_view(saved, "saved");
        const moefuse::MoeWeights w =
            to_weights(std::nullopt, gate_up, down, gate_up_lora, down_lora, sv, wv.numel(), xv.dtype);
        const Scratch ws = scratch(alloc, moefuse::moe_experts_backward_workspace_bytes(cfg, xv, w));
        nb::gil_scoped_release nogil;
        moefuse::moe_experts_backward(cfg, xv, wv, w, sv, to_view(grad_out, "grad_out"), grads,
                                      to_view(grad_topk_weights, "grad_topk_weights"), ws.view, to_stream(stream));
      },
      "cfg"_a, "x"_a, "topk_weights"_a, "gate_up"_a, "down"_a, "saved"_a, "grad_out"_a, "grad_x"_a.none(),
      "grad_gate_up"_a.none(), "grad_down"_a.none(), "grad_topk_weights"_a.none(), "alloc"_a, "stream"_a = 0,
      "gate_up_lora"_a.none() = nb::none(), "down_lora"_a.none() = nb::none(), "grad_gate_up_a"_a.none() = nb::none(),
      "grad_gate_up_b"_a.none() = nb::none(), "grad_down_a"_a.none() = nb::none(),
      "grad_down_b"_a.none() = nb::none());

  // The whole block, each projection with an optional stacked LoRA (to_lora) as for the experts.
  m.def("moe_saved_bytes", &moefuse::moe_saved_bytes, "cfg"_a, "tokens"_a, "dtype"_a);
  m.def(
      "moe_forward",
      [](const moefuse::MoeConfig& cfg, const Array& x, const Array& router, const Array& gate_up, const Array& down,
         const Array& out, const Array& router_logits, const Array& saved, const nb::callable& alloc,
         std::uintptr_t stream, const OptLora& gate_up_lora, const OptLora& down_lora) {
        const TensorView xv = to_view(x, "x"), sv = to_view(saved, "saved");
        const moefuse::MoeWeights w =
            to_weights(router, gate_up, down, gate_up_lora, down_lora, sv, xv.shape[0] * cfg.top_k, xv.dtype);
        const Scratch ws = scratch(alloc, moefuse::moe_forward_workspace_bytes(cfg, xv, w));
        nb::gil_scoped_release nogil;
        moefuse::moe_forward(cfg, xv, w, to_view(out, "out"), to_view(router_logits, "router_logits"), sv, ws.view,
                             to_stream(stream));
      },
      "cfg"_a, "x"_a, "router"_a, "gate_up"_a, "down"_a, "out"_a, "router_logits"_a, "saved"_a, "alloc"_a,
      "stream"_a = 0, "gate_up_lora"_a.none() = nb::none(), "down_lora"_a.none() = nb::none());
  m.def(
      "moe_backward",
      [](const moefuse::MoeConfig& cfg, const Array& x, const Array& router, const Array& gate_up, const Array& down,
         const Array& router_logits, const Array& saved, const Array& grad_out, const OptArray& grad_router_logits,
         const OptArray& grad_x, const OptArray& grad_router, const OptArray& grad_gate_up, const OptArray& grad_down,
         const nb::callable& alloc, std::uintptr_t stream, const OptLora& gate_up_lora, const OptLora& down_lora,
         const OptArray& grad_gate_up_a, const OptArray& grad_gate_up_b, const OptArray& grad_down_a,
         const OptArray& grad_down_b) {
        const TensorView xv = to_view(x, "x"), sv = to_view(saved, "saved");
        const moefuse::MoeWeights w =
            to_weights(router, gate_up, down, gate_up_lora, down_lora, sv, xv.shape[0] * cfg.top_k, xv.dtype);
        const moefuse::MoeGrads grads = to_grads(grad_x, grad_router, grad_gate_up, grad_down, grad_gate_up_a,
                                                 grad_gate_up_b, grad_down_a, grad_down_b);
        const Scratch ws = scratch(alloc, moefuse::moe_backward_workspace_bytes(cfg, xv, w, grads));
        nb::gil_scoped_release nogil;
        moefuse::moe_backward(cfg, xv, w, to_view(router_logits, "router_logits"), sv, to_view(grad_out, "grad_out"),
                              to_view(grad_router_logits, "grad_router_logits"), grads, ws.view, to_stream(stream));
      },
      "cfg"_a, "x"_a, "router"_a, "gate_up"_a, "down"_a, "router_logits"_a, "saved"_a, "grad_out"_a,
      "grad_router_logits"_a.none(), "grad_x"_a.none(), "grad_router"_a.none(), "grad_gate_up"_a.none(),
      "grad_down"_a.none(), "alloc"_a, "stream"_a = 0, "gate_up_lora"_a.none() = nb::none(),
      "down_lora"_a.none() = nb::none(), "grad_gate_up_a"_a.none() = nb::none(), "grad_gate_up_b"_a.none() = nb::none(),
      "grad_down_a"_a.none() = nb::none(), "grad_down_b"_a.none() = nb::none());
}
