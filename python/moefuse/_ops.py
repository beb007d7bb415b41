"""torch.library custom ops over the C++ ops (moefuse._C).

Every op allocates its outputs and workspaces with torch (so the caching allocator owns device memory), has a fake
(meta) kernel with symbolic shapes (token counts never recompile: plan buffers are sized from T*k and E, never from
routed counts), and an autograd formula whose backward is itself a custom op (so torch.compile can trace it). Eager
calls of the linear, experts and block ops go through run_moe_fused_linear, run_experts and run_moe_block, which run
the same code without torch.library's per-call layers: the Transformers backend and MoeBlock use them, and the package
exports them as moefuse.moe_fused_linear, moefuse.experts and moefuse.moe_block.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import threading

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from . import _C

MoefuseError = _C.MoefuseError

_DTYPES = {torch.float32: _C.DType.f32, torch.bfloat16: _C.DType.bf16, torch.float16: _C.DType.f16}
_ALIGN = 256  # moefuse requires workspaces and the saved block state at 256-byte aligned addresses
# CUDA cannot raise on negative expert ids without a host sync; MOEFUSE_DEBUG=1 checks every plan (syncs).
_DEBUG = os.environ.get("MOEFUSE_DEBUG", "") == "1"


# ---------------------------------------------------------------------------------------------------------------------
# Buffers, streams


_to_dlpack = torch.utils.dlpack.to_dlpack


def _capsule(a):
    """A tensor as a DLPack capsule, and so each tensor of a tuple; anything else as it is. nanobind takes a capsule
    as it is, where a tensor costs a call of Tensor.__dlpack__, and one that requires grad two refused exports before
    nanobind falls back to to_dlpack (about 45 µs of host time per LoRA layer step on this project's CPU)."""
    if isinstance(a, torch.Tensor):
        return _to_dlpack(a)
    if isinstance(a, tuple):
        return tuple(map(_capsule, a))
    return a


def _call(binding, *args):
    """A binding of moefuse._C with its tensors passed as DLPack capsules (_capsule)."""
    return binding(*map(_capsule, args))


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _on(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _aligned_empty(nbytes: int, device: torch.device) -> torch.Tensor:
    """A u8 tensor of `nbytes` at a 256-byte aligned address, with storage offset 0 (fakes expect offset 0)."""
    buf = torch.empty(nbytes + _ALIGN, dtype=torch.uint8, device=device)
    off = -buf.data_ptr() % _ALIGN
    if off == 0:
        return buf[:nbytes]
    # A DLPack round trip gives a tensor whose storage starts at the aligned address; it keeps `buf` alive.
    return torch.from_dlpack(buf[off : off + nbytes])


def _realigned(t: torch.Tensor) -> torch.Tensor:
    """`t` itself, or an aligned copy when a copy elsewhere (e.g. by a compiler) left it unaligned."""
    return t if t.data_ptr() % _ALIGN == 0 else _aligned_empty(t.numel(), t.device).copy_(t)


_cpu_scratch = threading.local()


def _cpu_workspace(nbytes: int) -> torch.Tensor:
    """On the CPU torch does not recycle memory, and fresh pages cost about 15% of a block's forward, so each thread
    keeps one grow-only buffer (CPU ops run synchronously, and every op uses its workspace only inside one call)."""
    buf = getattr(_cpu_scratch, "buf", None)
    if buf is None or buf.numel() < nbytes:
        buf = _cpu_scratch.buf = _aligned_empty(nbytes, torch.device("cpu"))
    return buf[:nbytes]


@functools.lru_cache
def _workspace(device: torch.device):
    """The `alloc(nbytes)` a C++ call takes (one per device): it sizes its own scratch and asks for it, getting a
    DLPack capsule (_capsule). On CUDA the caching allocator recycles the memory."""
    alloc = _cpu_workspace if device.type == "cpu" else functools.partial(_aligned_empty, device=device)
    return lambda nbytes: _to_dlpack(alloc(nbytes))


def _dtype(t: torch.Tensor, name: str):
    try:
        return _DTYPES[t.dtype]
    except KeyError:
        raise MoefuseError(f"moefuse: {name} must be float32, bfloat16 or float16, got {t.dtype}") from None


# ---------------------------------------------------------------------------------------------------------------------
# The routing plan lives in one flat i32 tensor: [sorted_pairs | pair_positions | offsets | counts | invalid | tail],
# each segment starting on a 256-byte boundary. Its size depends on T*k and E only. The tail, (T*k) % 64 + E % 64
# unused entries, makes that size differ whenever T*k or E alone does, so that a plan used with another top_k or
# expert count than it was made for fails the size check instead of routing rows wrongly.


def _pad(n):
    return (n + 63) // 64 * 64


def plan_numel(pairs, experts: int):
    return 2 * _pad(pairs) + _pad(experts + 1) + _pad(experts) + 1 + pairs % 64 + experts % 64


def _plan_arg(plan: torch.Tensor, tokens: int, top_k: int, experts: int) -> tuple:
    """The plan as the binding takes it: (tokens, top_k, experts, counts, offsets, sorted_pairs, pair_positions,
    invalid)."""
    m = tokens * top_k
    pos = _pad(m)
    off = 2 * pos
    cnt = off + _pad(experts + 1)
    inv = cnt + _pad(experts)
    numel = plan_numel(m, experts)
    if plan.dtype != torch.int32 or plan.dim() != 1 or plan.numel() != numel:
        raise MoefuseError(
            f"moefuse: plan must be int32[{numel}] for {tokens} tokens, top_k {top_k} and {experts} experts (as "
            f"routing_plan makes it for them), got {plan.dtype}{list(plan.shape)}"
        )
    return (tokens, top_k, experts, plan[cnt : cnt + experts], plan[off : off + experts + 1], plan[:m],
            plan[pos : pos + m], plan[inv : inv + 1])  # fmt: skip


def _make_plan(topk_ids: torch.Tensor, experts: int) -> tuple[torch.Tensor, tuple]:
    tokens, top_k = topk_ids.shape
    plan = torch.zeros(plan_numel(tokens * top_k, experts), dtype=torch.int32, device=topk_ids.device)
    arg = _plan_arg(plan, tokens, top_k, experts)
    _call(_C.routing_plan, topk_ids, arg, _workspace(topk_ids.device), _stream(topk_ids.device))
    if _DEBUG and topk_ids.is_cuda:
        _call(_C.check_plan, arg, _stream(topk_ids.device))
    return plan, arg


def _check_rows(**tensors) -> None:
    """MoefuseError naming the first of `tensors` (None skipped) that is not 2-D: the ops read their row counts here,
    before the core checks every size and dtype."""
    for name, t in tensors.items():
        if t is not None and t.dim() != 2:
            raise MoefuseError(f"moefuse: {name} must be 2-D, got {t.dtype}{list(t.shape)}")


def _check_ids(topk_ids: torch.Tensor) -> None:
    if topk_ids.dtype != torch.int32 or topk_ids.dim() != 2:
        raise MoefuseError(f"moefuse: topk_ids must be int32[T, k], got {topk_ids.dtype}{list(topk_ids.shape)}")
    if topk_ids.numel() > 2**31 - 1:  # said before any buffer is sized from it, not by the core after
        raise MoefuseError(f"moefuse: topk_ids {list(topk_ids.shape)} holds more routed pairs than the i32 indices of "
                           "a plan reach (2**31 - 1)")  # fmt: skip


def _needs(ctx, *idx):
    n = ctx.needs_input_grad  # shorter when trailing defaults were left out of the call
    return [i < len(n) and n[i] for i in idx]


def _profiled(name, fn, *args):
    """fn(*args), under the op's name in a running profiler (an eager call has no dispatcher entry to show)."""
    if not torch.autograd.profiler._is_profiler_enabled:
        return fn(*args)
    with torch.profiler.record_function(name):
        return fn(*args)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
# The Python types each annotation of an op's body admits (the annotations are strings: `from __future__`).
_KINDS = {"torch.Tensor": torch.Tensor, "torch.Tensor | None": (torch.Tensor, type(None)), "float": (float, int),
          "int": int, "bool": bool, "list[bool]": list}  # fmt: skip


def _with_autograd(op_def, impl, setup_context, grads, backward_impl):
    """Registers the autograd of the custom op `op_def` (Python body `impl`): `setup_context`, and `grads(ctx,
    backward, *output grads)` -> input grads, `backward` being the op's backward op (moefuse::<name>_backward).
    Returns a caller of the op (arguments as the op takes them, by position or name) that, where nothing traces the call
    (torch.compile, make_fx / export, fake tensors) and every tensor is a plain one (not a DTensor or other subclass),
    runs `impl` through a plain autograd.Function with the same setup_context and grads, `backward` being then that
    op's Python body `backward_impl`. torch.library's per-call layers (argument defaults, redispatch, its autograd
    wrapper) took 72 of the experts op's 230 µs of host time per forward+backward, 124 of 532 with adapters
    (bench/RESULTS.md, host time per call)."""
    name = op_def._name  # "experts" for moefuse::experts
    op, backward_op = getattr(torch.ops.moefuse, name), getattr(torch.ops.moefuse, f"{name}_backward")
    op_def.register_autograd(lambda ctx, *g: grads(ctx, backward_op, *g), setup_context=setup_context)
    signature = inspect.signature(impl)
    params = signature.parameters.values()
    # Trailing arguments left out take the body's defaults here, as the op's dispatcher fills them in for setup_context.
    defaults = tuple(p.default for p in params)
    # What each argument may be; anything else goes to the op, whose schema check names the argument.
    kinds = tuple(_KINDS[p.annotation] for p in params)

    def forward(ctx, *args):
        out = _profiled(f"moefuse::{name}", impl, *args)
        setup_context(ctx, args, out)
        return out

    def backward(ctx, *grad_outputs):
        return _profiled(f"moefuse::{name}_backward", grads, ctx, backward_impl, *grad_outputs)

    # Named so that autograd graphs show it: moefuse_<name>Backward.
    Eager = type(f"moefuse_{name}", (torch.autograd.Function,),
                 {"forward": staticmethod(forward), "backward": staticmethod(backward)})  # fmt: skip

    def call(*args, **kwargs):
        if kwargs:  # by name: to positions (a name the op does not take raises TypeError here)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            args = bound.args
        traced = torch.compiler.is_compiling() or is_in_torch_dispatch_mode()
        if traced or len(args) > len(defaults) or inspect.Parameter.empty in defaults[len(args) :] or not all(
            map(isinstance, args, kinds)
        ) or any(isinstance(a, torch.Tensor) and type(a) not in _PLAIN_TENSORS for a in args):
            return op(*args)  # traced, bad arguments (the op reports them) or a tensor subclass
        args += defaults[len(args) :]
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return Eager.apply(*args)
        return _profiled(f"moefuse::{name}", impl, *args)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = impl.__doc__
    return call


# ---------------------------------------------------------------------------------------------------------------------
# routing_plan


@torch.library.custom_op("moefuse::routing_plan", mutates_args=())
def routing_plan(topk_ids: torch.Tensor, experts: int) -> torch.Tensor:
    """The routing plan of int32 `topk_ids [T, k]` over `experts` experts, as one flat int32 tensor."""
    _check_ids(topk_ids)
    with _on(topk_ids.device):
        return _make_plan(topk_ids.contiguous(), experts)[0]


@routing_plan.register_fake
def _(topk_ids, experts):
    return topk_ids.new_empty(plan_numel(topk_ids.shape[0] * topk_ids.shape[1], experts))


# ---------------------------------------------------------------------------------------------------------------------
# moe_fused_linear: out[s] = weight[e(s)] . x[src(s)] per sorted row s, optionally gathered from token order and/or
# combined back into token order (see include/moefuse/ops.h).


def _linear_tokens(x, top_k, gather, combine_weights):
    _check_rows(x=x, combine_weights=combine_weights)
    if combine_weights is not None:
        return combine_weights.shape[0]
    return x.shape[0] if gather else x.shape[0] // top_k


def _moe_fused_linear_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    plan: torch.Tensor,
    top_k: int,
    gather: bool,
    combine_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[s] = weight[e(s)] . x[src(s)] for every row s of `plan` (routing_plan) in expert-sorted order: x in token
    order [T, in] when `gather`, else already sorted [T*k, in]; weight [E, out, in], or 4-bit (u8 [E, out, row
    bytes]: an Nf4Weight's packed bytes; moefuse.moe_fused_linear takes the Nf4Weight itself). With `combine_weights`
    [T, k] (f32) the rows are summed back into token order, each times its routing weight: out [T, out]; else
    [T*k, out]. out has x's dtype."""
    x, weight = x.contiguous(), weight.contiguous()
    cw = None if combine_weights is None else combine_weights.contiguous()
    tokens = _linear_tokens(x, top_k, gather, cw)
    arg = _plan_arg(plan, tokens, top_k, weight.shape[0])
    out = x.new_empty(tokens if cw is not None else tokens * top_k, weight.shape[1])
    with _on(x.device):
        _call(_C.moe_linear_forward, arg, x, weight, gather, cw, out, _workspace(x.device), _stream(x.device))
    return out


moe_fused_linear = torch.library.custom_op("moefuse::moe_fused_linear", mutates_args=())(_moe_fused_linear_impl)


@moe_fused_linear.register_fake
def _(x, weight, plan, top_k, gather, combine_weights=None):
    tokens = _linear_tokens(x, top_k, gather, combine_weights)
    rows = tokens if combine_weights is not None else tokens * top_k
    return x.new_empty(rows, weight.shape[1])


def _moe_fused_linear_backward_impl(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    plan: torch.Tensor,
    top_k: int,
    gather: bool,
    combine_weights: torch.Tensor | None,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_combine_weights); each one not in `needs` comes back empty."""
    grad_out, x, weight = grad_out.contiguous(), x.contiguous(), weight.contiguous()
    cw = None if combine_weights is None else combine_weights.contiguous()
    tokens = _linear_tokens(x, top_k, gather, cw)
    arg = _plan_arg(plan, tokens, top_k, weight.shape[0])
    gx, gw, gc = _linear_grads_like(x, weight, cw, needs)
    with _on(x.device):
        _call(_C.moe_linear_backward, arg, x, weight, gather, cw, grad_out, *(g if n else None for g, n in
              zip((gx, gw, gc), needs)), _workspace(x.device), _stream(x.device))  # fmt: skip
    return gx, gw, gc


moe_fused_linear_backward = torch.library.custom_op("moefuse::moe_fused_linear_backward", mutates_args=())(
    _moe_fused_linear_backward_impl
)


def _grads_like(like, needs, empty):
    """Room for the gradient of each tensor of `like` that `needs` flags (one flag each), `empty(t)` for the rest."""
    if len(needs) != len(like):
        raise MoefuseError(f"moefuse: needs must hold {len(like)} flags, one per input, got {len(needs)}")
    return tuple(torch.empty_like(t) if n else empty(t) for t, n in zip(like, needs))


def _linear_grads_like(x, weight, combine_weights, needs):
    like = (x, weight, combine_weights if combine_weights is not None else x.new_empty(0, dtype=torch.float32))
    return _grads_like(like, needs, lambda t: t.new_empty(0))


@moe_fused_linear_backward.register_fake
def _(grad_out, x, weight, plan, top_k, gather, combine_weights, needs):
    return _linear_grads_like(x, weight, combine_weights, needs)


def _linear_setup(ctx, inputs, output):
    x, weight, plan, top_k, gather, combine_weights = inputs
    ctx.save_for_backward(x, weight, plan, combine_weights)
    ctx.top_k, ctx.gather = top_k, gather


def _linear_grads(ctx, backward, grad_out):
    """The linear op's input gradients, `backward` being the moe_fused_linear_backward op or its Python body."""
    x, weight, plan, combine_weights = ctx.saved_tensors
    needs = _needs(ctx, 0, 1, 5)
    needs[2] = needs[2] and combine_weights is not None
    grads = backward(grad_out, x, weight, plan, ctx.top_k, ctx.gather, combine_weights, needs)
    gx, gw, gc = (g if n else None for g, n in zip(grads, needs))
    return gx, gw, None, None, None, gc


_run_moe_fused_linear = _with_autograd(moe_fused_linear, _moe_fused_linear_impl, _linear_setup, _linear_grads,
                                       _moe_fused_linear_backward_impl)  # fmt: skip


@functools.wraps(_run_moe_fused_linear)
def run_moe_fused_linear(x, weight, plan, top_k, gather, combine_weights=None):
    # A 4-bit weight (moefuse.Nf4Weight) goes in as its packed bytes, which the op dequantizes in its own workspace
    # (experts without rows skipped) rather than as a torch copy of all of them.
    from .nf4 import packed  # nf4 builds on this module

    return _run_moe_fused_linear(x, packed(weight, x.shape[-1]), plan, top_k, gather, combine_weights)


# ---------------------------------------------------------------------------------------------------------------------
# experts: the expert half of the block with routing given (the Transformers experts backend), see
# moe_experts_forward in include/moefuse/block.h. Returns the output and the opaque state backward needs (u8).
# Optional stacked LoRA adapters (a [E, r, in], b [E, out, r], scale) on gate_up and/or down freeze that base weight:
# the adapter rides along the grouped GEMM (W + b.a is never formed), and backward gives grads for x, the routing
# weights and a, b. The saved state is the core's, then each adapter's rows u = scale * x . a[e]^T [T*k, r] (lora.u
# in ops.h), which the forward writes and the backward reads instead of recomputing them.


def _lora_arg(a, b, scale, u=None, staged_b=None):
    """The binding's (a, b, scale, u, staged_b), or None for no adapter (a or b alone is reported by the op). a and
    b go as they are: the op stages strided or other-dtype adapters (PEFT's) itself. u and staged_b are byte offsets
    of the experts op's pieces in its saved state (_piece_offsets)."""
    if a is None and b is None:
        return None
    return (a, b, scale, u, staged_b)


def _lora_pieces(rows, dtype, gate_up_a, gate_up_b, down_a, down_b):
    """Shapes of the experts op's saved state past the core, in order (None for an absent piece): each adapter's u
    [rows, r], then each b that the op stages (strided, as PEFT's are, or in another dtype than the compute dtype)
    as the kernels read it [E, out, r], kept so that the backward does not stage it again."""
    u = [None if a is None else (rows, a.shape[1]) for a in (gate_up_a, down_a)]
    b = [None if t is None or (t.is_contiguous() and t.dtype == dtype) else tuple(t.shape)
         for t in (gate_up_b, down_b)]  # fmt: skip
    return u + b


def _pieces_bytes(pieces, itemsize):
    """Their bytes, each 256-byte aligned (a bound that is linear in rows, as the fake needs); 0 without any."""
    sizes = [math.prod(p) * itemsize + _ALIGN for p in pieces if p is not None]
    return sum(sizes) + _ALIGN if sizes else 0


def _piece_offsets(at, pieces, itemsize):
    """Each piece's byte offset in the saved state, from byte `at` on, 256-byte aligned (None for an absent one). The
    binding makes the views (to_lora in bindings.cpp): a view made here costs a torch op, 4 µs of the H200 host's
    time in a LoRA forward that the GPU waits for (bench/RESULTS.md, 2026-11-29 fourth)."""
    offsets = []
    for p in pieces:
        if p is None:
            offsets.append(None)
            continue
        at = (at + _ALIGN - 1) // _ALIGN * _ALIGN
        offsets.append(at)
        at += math.prod(p) * itemsize
    return offsets


def _adapter_args(core, pieces, itemsize, gate_up_a, gate_up_b, gate_up_scale, down_a, down_b, down_scale):
    """The binding's two adapters (_lora_arg), their pieces at their offsets past the saved state's `core` bytes."""
    gu_u, dn_u, gu_b, dn_b = _piece_offsets(core, pieces, itemsize)
    return (_lora_arg(gate_up_a, gate_up_b, gate_up_scale, gu_u, gu_b),
            _lora_arg(down_a, down_b, down_scale, dn_u, dn_b))  # fmt: skip


def _saved_layout(query, x, gate_up, top_k, renormalize, lora):
    """(the saved state's bytes, the binding's two adapters) of an experts or block op, `query` sizing the core's part
    (moe_experts_saved_bytes or moe_saved_bytes) and lora being the op's six adapter arguments (gate_up_a, gate_up_b,
    gate_up_scale, down_a, down_b, down_scale): the adapters' pieces (_lora_pieces) follow the core."""
    gate_up_a, gate_up_b, _, down_a, down_b, _ = lora
    pieces = _lora_pieces(x.shape[0] * top_k, x.dtype, gate_up_a, gate_up_b, down_a, down_b)
    core = _saved_bytes(query, x.shape[0], x, gate_up, top_k, renormalize)
    total = core + _pieces_bytes(pieces, x.element_size())
    return total, _adapter_args(core, pieces, x.element_size(), *lora)


def _grads_with_adapters(x, other, gate_up, down, gate_up_a, gate_up_b, down_a, down_b, needs):
    """_grads_like for the experts and block ops' eight differentiable inputs (`other`: the routing or router
    weights)."""
    like = (x, other, gate_up, down, gate_up_a, gate_up_b, down_a, down_b)
    return _grads_like(like, needs, lambda t: x.new_empty(0))


def _experts_impl(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_a: torch.Tensor | None = None,
    gate_up_b: torch.Tensor | None = None,
    gate_up_scale: float = 1.0,
    down_a: torch.Tensor | None = None,
    down_b: torch.Tensor | None = None,
    down_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, saved): out[t] = sum_j topk_weights[t, j] * down[e] . swiglu(gate_up[e] . x[t]) with e = topk_ids[t, j],
    each weight W plus scale * b[e] . a[e] where its adapter is given."""
    _check_ids(topk_ids)
    _check_rows(x=x, topk_weights=topk_weights)
    x, ids, w = x.contiguous(), topk_ids.contiguous(), topk_weights.contiguous()
    gate_up, down = gate_up.contiguous(), down.contiguous()
    if _DEBUG and ids.is_cuda and bool((ids < 0).any()):  # CUDA cannot raise on them without this sync
        raise MoefuseError("moefuse: topk_ids has negative expert ids")
    cfg = _config(x, gate_up, ids.shape[1], False)  # the core checks topk_weights against the ids' k
    # k is fixed per model: specialising on it costs no recompiles (the token count stays symbolic).
    k = int(w.shape[1])
    out = torch.empty_like(x)
    lora = (gate_up_a, gate_up_b, gate_up_scale, down_a, down_b, down_scale)
    total, (gu_lora, dn_lora) = _saved_layout(_C.moe_experts_saved_bytes, x, gate_up, k, False, lora)
    saved = _saved_empty(_C.moe_experts_saved_bytes, cfg, x, gate_up, k, total)
    with _on(x.device):
        _call(_C.moe_experts_forward, cfg, x, ids, w, gate_up, down, out, saved, _workspace(x.device),
              _stream(x.device), gu_lora, dn_lora)  # fmt: skip
    return out, saved


experts = torch.library.custom_op("moefuse::experts", mutates_args=())(_experts_impl)


@experts.register_fake
def _(x, topk_ids, topk_weights, gate_up, down, gate_up_a=None, gate_up_b=None, gate_up_scale=1.0, down_a=None,
      down_b=None, down_scale=1.0):  # fmt: skip
    _check_rows(x=x, topk_weights=topk_weights)
    lora = (gate_up_a, gate_up_b, gate_up_scale, down_a, down_b, down_scale)
    total = _saved_layout(_C.moe_experts_saved_bytes, x, gate_up, int(topk_weights.shape[1]), False, lora)[0]
    return torch.empty_like(x), x.new_empty(total, dtype=torch.uint8)


def _experts_backward_impl(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    saved: torch.Tensor,
    needs: list[bool],
    gate_up_a: torch.Tensor | None = None,
    gate_up_b: torch.Tensor | None = None,
    gate_up_scale: float = 1.0,
    down_a: torch.Tensor | None = None,
    down_b: torch.Tensor | None = None,
    down_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:  # fmt: skip
    """(grad_x, grad_topk_weights, grad_gate_up, grad_down, grad_gate_up_a, grad_gate_up_b, grad_down_a,
    grad_down_b); each one not in `needs` comes back empty. A weight with an adapter is frozen (no gradient)."""
    grad_out, x, w = grad_out.contiguous(), x.contiguous(), topk_weights.contiguous()
    gate_up, down, saved = gate_up.contiguous(), down.contiguous(), _realigned(saved)
    lora = (gate_up_a, gate_up_b, gate_up_scale, down_a, down_b, down_scale)
    gu_lora, dn_lora = _saved_layout(_C.moe_experts_saved_bytes, x, gate_up, int(w.shape[1]), False, lora)[1]
    grads = _grads_with_adapters(x, w, gate_up, down, gate_up_a, gate_up_b, down_a, down_b, needs)
    gx, gw, ggu, gdown, ggu_a, ggu_b, gdn_a, gdn_b = (g if n else None for g, n in zip(grads, needs))
    cfg = _config(x, gate_up, w.shape[1], False)
    with _on(x.device):
        _call(_C.moe_experts_backward, cfg, x, w, gate_up, down, saved, grad_out, gx, ggu, gdown, gw,
              _workspace(x.device), _stream(x.device), gu_lora, dn_lora, ggu_a, ggu_b, gdn_a, gdn_b)  # fmt: skip
    return grads


experts_backward = torch.library.custom_op("moefuse::experts_backward", mutates_args=())(_experts_backward_impl)


@experts_backward.register_fake
def _(grad_out, x, topk_weights, gate_up, down, saved, needs, gate_up_a=None, gate_up_b=None, gate_up_scale=1.0,
      down_a=None, down_b=None, down_scale=1.0):  # fmt: skip
    return _grads_with_adapters(x, topk_weights, gate_up, down, gate_up_a, gate_up_b, down_a, down_b, needs)


def _experts_setup(ctx, inputs, output):
    x, _, topk_weights, gate_up, down, gate_up_a, gate_up_b, gate_up_scale, down_a, down_b, down_scale = inputs
    _, saved = output
    ctx.save_for_backward(x, topk_weights, gate_up, down, saved, gate_up_a, gate_up_b, down_a, down_b)
    ctx.scales = gate_up_scale, down_scale
    ctx.mark_non_differentiable(saved)  # internal state for backward, not a result
    ctx.set_materialize_grads(False)


def _experts_grads(ctx, backward, grad_out, _grad_saved):
    """The experts op's input gradients, `backward` being the experts_backward op or its Python body."""
    x, topk_weights, gate_up, down, saved, gate_up_a, gate_up_b, down_a, down_b = ctx.saved_tensors
    needs = _needs(ctx, 0, 2, 3, 4, 5, 6, 8, 9)
    if grad_out is None or not any(needs):
        return (None,) * 11
    gu_scale, dn_scale = ctx.scales
    grads = backward(grad_out, x, topk_weights, gate_up, down, saved, needs, gate_up_a, gate_up_b, gu_scale, down_a,
                     down_b, dn_scale)  # fmt: skip
    gx, gw, ggu, gdown, ggu_a, ggu_b, gdn_a, gdn_b = (g if n else None for g, n in zip(grads, needs))
    return gx, None, gw, ggu, gdown, ggu_a, ggu_b, None, gdn_a, gdn_b, None


run_experts = _with_autograd(experts, _experts_impl, _experts_setup, _experts_grads, _experts_backward_impl)


# ---------------------------------------------------------------------------------------------------------------------
# moe_block: the whole Qwen3-MoE sparse block (router + experts), see include/moefuse/block.h. The third output is the
# opaque state moe_backward needs (u8).


def _expert_dims(x: torch.Tensor, gate_up: torch.Tensor):
    """(experts, 2 * intermediate, hidden) of gate_up; hidden from x where gate_up is 4-bit (uint8, moefuse.nf4)."""
    if gate_up.dim() != 3:
        raise MoefuseError(f"moefuse: gate_up must be [experts, 2 * intermediate, hidden], got {list(gate_up.shape)}")
    return (*gate_up.shape[:2], x.shape[-1]) if gate_up.dtype == torch.uint8 else gate_up.shape


def _config(x: torch.Tensor, gate_up: torch.Tensor, top_k: int, renormalize: bool):
    experts, two_i, hidden = _expert_dims(x, gate_up)
    return _C.MoeConfig(hidden, two_i // 2, experts, top_k, renormalize)


@functools.lru_cache(maxsize=None)
def _saved_affine(query, hidden: int, intermediate: int, experts: int, top_k: int, renormalize: bool, dtype) -> tuple:
    """(per_token, fixed) with query(cfg, T, dtype) <= per_token * T + fixed for every T; `query` is
    moe_saved_bytes or moe_experts_saved_bytes.

    The saved state is a handful of 256-byte aligned pieces, each per-token-linear or constant in size, so two
    queries give the slope exactly (T = 256 makes every linear piece a multiple of 256) and 16 * 256 bytes cover the
    rounding of up to 16 pieces. A bound linear in T keeps the fake's size symbolic (no recompiles per T)."""
    cfg = _C.MoeConfig(hidden, intermediate, experts, top_k, renormalize)
    q0, q256 = query(cfg, 0, dtype), query(cfg, 256, dtype)
    return (q256 - q0) // 256, q0 + 16 * _ALIGN


def _saved_bytes(query, tokens, x, gate_up, top_k, renormalize):
    e, two_i, hidden = _expert_dims(x, gate_up)
    per_token, fixed = _saved_affine(query, int(hidden), int(two_i) // 2, int(e), top_k, renormalize,
                                     _dtype(x, "x"))  # fmt: skip
    return per_token * tokens + fixed


def _saved_empty(query, cfg, x, gate_up, top_k, nbytes) -> torch.Tensor:
    """The saved state's buffer of `nbytes`, zeroed where the op leaves it unwritten, so that its bytes are
    deterministic (opcheck compares outputs bit for bit). h [T*k, 2I], by far its largest piece, is written whole and
    is the core layout's last piece (block.cpp; `query` sizes that layout), so only the pieces before it and
    everything after it (the adapters' small u rows included) are zeroed: zeroing all of it cost 0.12 ms of a 3 ms
    forward (30B layer, T = 16384, H100)."""
    tokens = x.shape[0]
    saved = _aligned_empty(nbytes, x.device)
    h_bytes = tokens * top_k * gate_up.shape[1] * x.element_size()
    h_at = query(cfg, tokens, _dtype(x, "x")) - (h_bytes + _ALIGN - 1) // _ALIGN * _ALIGN
    saved[:h_at].zero_()
    saved[h_at + h_bytes :].zero_()
    return saved


def _moe_block_impl(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    renormalize: bool,
    gate_up_a: torch.Tensor | None = None,
    gate_up_b: torch.Tensor | None = None,
    gate_up_scale: float = 1.0,
    down_a: torch.Tensor | None = None,
    down_b: torch.Tensor | None = None,
    down_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [T, H], router_logits [T, E], saved u8) for x [T, H]; each expert weight W plus scale * b[e] . a[e] where
    its stacked adapter is given, as in the experts op."""
    _check_rows(x=x)
    x, router_weight, gate_up, down = (t.contiguous() for t in (x, router_weight, gate_up, down))
    cfg = _config(x, gate_up, top_k, renormalize)
    out = torch.empty_like(x)
    logits = x.new_empty(x.shape[0], router_weight.shape[0])
    lora = (gate_up_a, gate_up_b, gate_up_scale, down_a, down_b, down_scale)
    total, (gu_lora, dn_lora) = _saved_layout(_C.moe_saved_bytes, x, gate_up, top_k, renormalize, lora)
    saved = _saved_empty(_C.moe_saved_bytes, cfg, x, gate_up, top_k, total)
    with _on(x.device):
        _call(_C.moe_forward, cfg, x, router_weight, gate_up, down, out, logits, saved, _workspace(x.device),
              _stream(x.device), gu_lora, dn_lora)  # fmt: skip
    return out, logits, saved


moe_block = torch.library.custom_op("moefuse::moe_block", mutates_args=())(_moe_block_impl)


@moe_block.register_fake
def _(x, router_weight, gate_up, down, top_k, renormalize, gate_up_a=None, gate_up_b=None, gate_up_scale=1.0,
      down_a=None, down_b=None, down_scale=1.0):  # fmt: skip
    _check_rows(x=x)
    lora = (gate_up_a, gate_up_b, gate_up_scale, down_a, down_b, down_scale)
    total = _saved_layout(_C.moe_saved_bytes, x, gate_up, top_k, renormalize, lora)[0]
    return torch.empty_like(x), x.new_empty(x.shape[0], router_weight.shape[0]), x.new_empty(total, dtype=torch.uint8)


def _moe_block_backward_impl(
    grad_out: torch.Tensor,
    grad_router_logits: torch.Tensor | None,
    x: torch.Tensor,
    router_weight: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    router_logits: torch.Tensor,
    saved: torch.Tensor,
    top_k: int,
    renormalize: bool,
    needs: list[bool],
    gate_up_a: torch.Tensor | None = None,
    gate_up_b: torch.Tensor | None = None,
    gate_up_scale: float = 1.0,
    down_a: torch.Tensor | None = None,
    down_b: torch.Tensor | None = None,
    down_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:  # fmt: skip
    """(grad_x, grad_router_weight, grad_gate_up, grad_down, grad_gate_up_a, grad_gate_up_b, grad_down_a,
    grad_down_b); each one not in `needs` comes back empty (frozen experts: no expert weight gradient is formed at
    all). A weight with an adapter is frozen."""
    x, router_weight, gate_up, down = (t.contiguous() for t in (x, router_weight, gate_up, down))
    grad_out, router_logits = grad_out.contiguous(), router_logits.contiguous()
    grl = None if grad_router_logits is None else grad_router_logits.contiguous()
    lora = (gate_up_a, gate_up_b, gate_up_scale, down_a, down_b, down_scale)
    gu_lora, dn_lora = _saved_layout(_C.moe_saved_bytes, x, gate_up, top_k, renormalize, lora)[1]
    cfg = _config(x, gate_up, top_k, renormalize)
    grads = _grads_with_adapters(x, router_weight, gate_up, down, gate_up_a, gate_up_b, down_a, down_b, needs)
    wanted = [g if n else None for g, n in zip(grads, needs)]
    with _on(x.device):
        _call(_C.moe_backward, cfg, x, router_weight, gate_up, down, router_logits, _realigned(saved), grad_out,
              grl, *wanted[:4], _workspace(x.device), _stream(x.device), gu_lora, dn_lora, *wanted[4:])  # fmt: skip
    return grads


moe_block_backward = torch.library.custom_op("moefuse::moe_block_backward", mutates_args=())(_moe_block_backward_impl)


@moe_block_backward.register_fake
def _(grad_out, grad_router_logits, x, router_weight, gate_up, down, router_logits, saved, top_k, renormalize, needs,
      gate_up_a=None, gate_up_b=None, gate_up_scale=1.0, down_a=None, down_b=None, down_scale=1.0):  # fmt: skip
    return _grads_with_adapters(x, router_weight, gate_up, down, gate_up_a, gate_up_b, down_a, down_b, needs)


def _block_setup(ctx, inputs, output):
    (x, router_weight, gate_up, down, top_k, renormalize, gate_up_a, gate_up_b, gate_up_scale, down_a, down_b,
     down_scale) = inputs
    _, logits, saved = output
    ctx.save_for_backward(x, router_weight, gate_up, down, logits, saved, gate_up_a, gate_up_b, down_a, down_b)
    ctx.top_k, ctx.renormalize, ctx.scales = top_k, renormalize, (gate_up_scale, down_scale)
    ctx.mark_non_differentiable(saved)  # internal state for backward, not a result
    ctx.set_materialize_grads(False)  # an unused router_logits (no aux loss) passes no gradient


def _block_grads(ctx, backward, grad_out, grad_logits, _grad_saved):
    """The block op's input gradients, `backward` being the moe_block_backward op or its Python body."""
    x, router_weight, gate_up, down, logits, saved, gate_up_a, gate_up_b, down_a, down_b = ctx.saved_tensors
    needs = _needs(ctx, 0, 1, 2, 3, 6, 7, 9, 10)
    if (grad_out is None and grad_logits is None) or not any(needs):
        return (None,) * 12
    if grad_out is None:
        grad_out = torch.zeros_like(x)
    gu_scale, dn_scale = ctx.scales
    grads = backward(grad_out, grad_logits, x, router_weight, gate_up, down, logits, saved, ctx.top_k, ctx.renormalize,
                     needs, gate_up_a, gate_up_b, gu_scale, down_a, down_b, dn_scale)  # fmt: skip
    gx, grouter, ggu, gdown, ggu_a, ggu_b, gdn_a, gdn_b = (g if n else None for g, n in zip(grads, needs))
    return gx, grouter, ggu, gdown, None, None, ggu_a, ggu_b, None, gdn_a, gdn_b, None


run_moe_block = _with_autograd(moe_block, _moe_block_impl, _block_setup, _block_grads, _moe_block_backward_impl)
