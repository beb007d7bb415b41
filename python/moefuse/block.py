"""MoeBlock: a drop-in for the Transformers v5 Qwen3-MoE sparse block, fused (C++) or reference (plain torch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._ops import MoefuseError, run_moe_block

MODES = ("fused", "reference")


def reference_moe(x, router_weight, gate_up, down, top_k: int, renormalize: bool):
    """The Qwen3-MoE sparse block in plain torch, expert by expert; exact in the inputs' dtype (float64 works).

    Router as in Transformers: softmax in (at least) float32, top-k, renormalise, weights cast to the logits' dtype.
    Returns (out [T, H], router_logits [T, E])."""
    logits = F.linear(x, router_weight)
    probs = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights.to(logits.dtype)
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        token, slot = torch.where(ids == e)
        gate, up = F.linear(x[token], gate_up[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[e]) * weights[token, slot, None]
        out = out.index_add(0, token, y.to(out.dtype))
    return out, logits


class MoeBlock(nn.Module):
    """router + experts of one Qwen3-MoE layer. forward(hidden_states [B, S, H] or [T, H]) -> (hidden_states,
    router_logits [T, E]).

    mode="fused" runs the C++ block (moefuse::moe_block), mode="reference" the plain torch one."""

    def __init__(self, router_weight: nn.Parameter, gate_up: nn.Parameter, down: nn.Parameter, top_k: int,
                 renormalize: bool = True, mode: str = "fused"):  # fmt: skip
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"moefuse.MoeBlock: mode must be one of {MODES}, got {mode!r}")
        self.router_weight, self.gate_up_proj, self.down_proj = router_weight, gate_up, down
        self.top_k, self.renormalize, self.mode = int(top_k), bool(renormalize), mode

    @classmethod
    def from_hf(cls, block: nn.Module, mode: str = "fused") -> "MoeBlock":
        """Wraps a transformers Qwen3MoeSparseMoeBlock, sharing its parameters (no copy)."""
        gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
        if gate is None or experts is None or not hasattr(experts, "gate_up_proj"):
            raise MoefuseError(
                f"moefuse.MoeBlock.from_hf: expected a Qwen3-MoE sparse block with .gate and .experts.gate_up_proj, "
                f"got {type(block).__name__}"
            )
        from .hf import check_layout

        check_layout(experts)
        return cls(gate.weight, experts.gate_up_proj, experts.down_proj, gate.top_k, gate.norm_topk_prob, mode)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        args = (x, self.router_weight, self.gate_up_proj, self.down_proj, self.top_k, self.renormalize)
        if self.mode == "reference":
            out, logits = reference_moe(*args)
        else:
            out, logits, _ = run_moe_block(*args)
        return out.view(hidden_states.shape), logits

    def extra_repr(self) -> str:
        e, two_i, h = self.gate_up_proj.shape
        return f"hidden={h}, intermediate={two_i // 2}, experts={e}, top_k={self.top_k}, mode={self.mode}"
