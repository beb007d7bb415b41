"""MoeBlock: a drop-in for the Transformers v5 Qwen3-MoE sparse block, fused (C++) or reference (plain torch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._ops import MoefuseError, run_moe_block
from .convert import StackedLora
from .nf4 import Nf4Weight, packed

MODES = ("fused", "reference")
TARGETS = ("gate_up", "down")  # the expert projections an adapter can go on
_ADAPTERS = tuple(f"{t}_lora_{p}" for t in TARGETS for p in "ab")


def _projection(x, weight, a, b, scale):
    """x . weight^T, plus scale * (x . a^T) . b^T with a stacked adapter's a [r, in] and b [out, r] of one expert."""
    y = F.linear(x, weight)
    return y if a is None else y + scale * F.linear(F.linear(x, a), b)


def reference_moe(x, router_weight, gate_up, down, top_k: int, renormalize: bool, gate_up_a=None, gate_up_b=None,
                  gate_up_scale: float = 1.0, down_a=None, down_b=None, down_scale: float = 1.0):  # fmt: skip
    """The Qwen3-MoE sparse block in plain torch, expert by expert; exact in the inputs' dtype (float64 works).

    Router as in Transformers: softmax in (at least) float32, top-k, renormalise, weights cast to the logits' dtype.
    Optional stacked LoRA on gate_up (a [E, r, H], b [E, 2I, r]) and down (a [E, r, I], b [E, H, r]), as the fused
    op takes them. Returns (out [T, H], router_logits [T, E])."""
    for name, a, b in (("gate_up", gate_up_a, gate_up_b), ("down", down_a, down_b)):
        if (a is None) != (b is None):
            raise MoefuseError(f"moefuse: {name}'s adapter needs both a and b, got only {'b' if a is None else 'a'}")
    logits = F.linear(x, router_weight)
    probs = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights.to(logits.dtype)
    out = torch.zeros_like(x)
    pick = lambda t, e: None if t is None else t[e]  # noqa: E731
    for e in range(gate_up.shape[0]):
        token, slot = torch.where(ids == e)
        h = _projection(x[token], gate_up[e], pick(gate_up_a, e), pick(gate_up_b, e), gate_up_scale)
        gate, up = h.chunk(2, dim=-1)
        y = _projection(F.silu(gate) * up, down[e], pick(down_a, e), pick(down_b, e), down_scale)
        out = out.index_add(0, token, (y * weights[token, slot, None]).to(out.dtype))
    return out, logits


class MoeBlock(nn.Module):
    """router + experts of one Qwen3-MoE layer. forward(hidden_states [B, S, H] or [T, H]) -> (hidden_states,
    router_logits [T, E]).

    mode="fused" runs the C++ block (moefuse::moe_block), mode="reference" the plain torch one. add_lora() puts
    stacked LoRA adapters on the expert projections, which both modes apply."""

    def __init__(self, router_weight: nn.Parameter, gate_up: nn.Parameter, down: nn.Parameter, top_k: int,
                 renormalize: bool = True, mode: str = "fused"):  # fmt: skip
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"moefuse.MoeBlock: mode must be one of {MODES}, got {mode!r}")
        self.router_weight, self.gate_up_proj, self.down_proj = router_weight, gate_up, down
        self.top_k, self.renormalize, self.mode = int(top_k), bool(renormalize), mode
        for name in _ADAPTERS:
            self.register_parameter(name, None)
        self.lora_scale = 1.0

    @classmethod
    def from_hf(cls, block: nn.Module, mode: str = "fused") -> "MoeBlock":
        """Wraps a transformers Qwen3MoeSparseMoeBlock, sharing its parameters (no copy)."""
        gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
        if "base_layer" in getattr(experts, "_modules", {}):  # PEFT's wrapper (target_parameters)
            raise MoefuseError(
                "moefuse.MoeBlock.from_hf: the block's experts carry PEFT LoRA (target_parameters), which MoeBlock "
                "does not read. Run the PEFT model through moefuse.use_moefuse_lora, or give the block adapters of "
                "its own: MoeBlock.add_lora, with values from moefuse.convert.stacked_from_param_wrapper"
            )
        if gate is None or experts is None or not hasattr(experts, "gate_up_proj"):
            raise MoefuseError(
                f"moefuse.MoeBlock.from_hf: expected a Qwen3-MoE sparse block with .gate and .experts.gate_up_proj, "
                f"got {type(block).__name__}"
            )
        from .hf import check_layout

        check_layout(experts)
        return cls(gate.weight, experts.gate_up_proj, experts.down_proj, gate.top_k, gate.norm_topk_prob, mode)

    def add_lora(self, rank: int, alpha: float | None = None, targets: tuple[str, ...] = TARGETS) -> "MoeBlock":
        """Stacked LoRA on the expert projections in `targets`: parameters <target>_lora_a [E, rank, in] and
        <target>_lora_b [E, out, rank] in the weights' dtype and device, delta W[e] = alpha / rank * b[e] . a[e]
        (alpha defaults to rank). Initialised as PEFT initialises LoRA (a uniform in +-1/sqrt(in), b zero), so the
        block's output does not change; both expert weights are frozen (requires_grad False), as LoRA trains only
        the adapters. Returns the block. `lora_adapters()` gives them to the converters (moefuse.convert)."""
        bad = [t for t in targets if t not in TARGETS]
        if rank < 1 or bad or not targets:
            raise ValueError(f"moefuse.MoeBlock.add_lora: rank must be >= 1 and targets a non-empty subset of "
                             f"{TARGETS}, got rank={rank}, targets={tuple(targets)}")  # fmt: skip
        if self.lora_adapters():
            raise ValueError("moefuse.MoeBlock.add_lora: the block already has adapters")
        self.lora_scale = (rank if alpha is None else alpha) / rank
        for target in targets:
            weight = self.gate_up_proj if target == "gate_up" else self.down_proj
            experts, out, n_in = weight.shape
            a = torch.empty(experts, rank, n_in, dtype=weight.dtype, device=weight.device).uniform_(-1, 1) / n_in**0.5
            setattr(self, f"{target}_lora_a", nn.Parameter(a))
            b = torch.zeros(experts, out, rank, dtype=weight.dtype, device=weight.device)
            setattr(self, f"{target}_lora_b", nn.Parameter(b))
        self.gate_up_proj.requires_grad_(False)
        self.down_proj.requires_grad_(False)
        return self

    def lora_adapters(self) -> dict[str, StackedLora]:
        """The block's adapters by target ("gate_up", "down"), sharing its parameters; empty without any.
        moefuse.convert.stacked_lora_to_per_expert(**block.lora_adapters()) exports them per expert."""
        return {t: StackedLora(getattr(self, f"{t}_lora_a"), getattr(self, f"{t}_lora_b")) for t in TARGETS
                if getattr(self, f"{t}_lora_a") is not None}  # fmt: skip

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        s, gate_up, down = self.lora_scale, self.gate_up_proj, self.down_proj
        if self.mode == "reference":  # 4-bit weights dequantized once, not per expert
            gate_up, down = (w.dequantize() if isinstance(w, Nf4Weight) else w for w in (gate_up, down))
        else:
            gate_up, down = packed(gate_up, x.shape[-1]), packed(down, gate_up.shape[-2] // 2)
        args = (x, self.router_weight, gate_up, down, self.top_k, self.renormalize, self.gate_up_lora_a,
                self.gate_up_lora_b, s, self.down_lora_a, self.down_lora_b, s)  # fmt: skip
        if self.mode == "reference":
            out, logits = reference_moe(*args)
        else:
            out, logits, _ = run_moe_block(*args)
        return out.view(hidden_states.shape), logits

    def extra_repr(self) -> str:
        e, two_i, h = self.gate_up_proj.shape
        lora = {t: l.a.shape[1] for t, l in self.lora_adapters().items()}
        rank = f", lora_rank={lora}, lora_scale={self.lora_scale}" if lora else ""
        return f"hidden={h}, intermediate={two_i // 2}, experts={e}, top_k={self.top_k}, mode={self.mode}{rank}"
