"""Lossless converters between moefuse's stacked expert layouts and the layouts checkpoints and PEFT use.

Pure torch: nothing here needs the C++ extension. Every conversion only reshapes, permutes, splits, concatenates
or copies values, so converted tensors hold exactly the values they came from (same dtype, bitwise).

moefuse's stacked LoRA on an expert weight W [E, out, in] (Transformers v5 stores gate_up_proj [E, 2I, H] with gate
rows then up rows, and down_proj [E, H, I]) is

    A [E, r, in],  B [E, out, r],  delta W[e] = scale * B[e] @ A[e]      (scale = lora_alpha / r, or / sqrt(r))

Three other layouts convert to and from it:

* Per-expert modules, as in older Qwen3-MoE checkpoints and per-expert PEFT adapters:
  ``experts.{i}.gate_proj / up_proj / down_proj`` with ``lora_A.weight [r, in]`` and ``lora_B.weight [out, r]``
  (and base weights ``experts.{i}.gate_proj.weight [I, H]`` etc.). gate_proj and up_proj read the same input, so the
  stacked gate_up adapter splits into a gate half and an up half of B's rows that share A. Going back, if an
  expert's gate and up adapters have different A, the two are stacked along the rank: A = [A_gate; A_up] (rank 2r)
  and B = [[B_gate, 0], [0, B_up]], which is still exactly the same delta. The scale does not change with that
  rank: keep the adapters' scale, do not recompute lora_alpha / rank.

* PEFT ``target_parameters`` (``ParamWrapper`` on ``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``), for a
  parameter stored [E, d1, d2] (read as [E, out, in]; that is Transformers' non-transposed layout):

  - ``"swapped"`` (PEFT >= 0.19; ``ParamWrapper._did_swap_in_out_features`` is True): lora_A.weight [E*r, d2]
    is A [E, r, in] expert-major; lora_B.weight [d1, r*E] is [out, r, E], expert-minor; delta W[e] =
    scale * B[:, :, e] @ A[e].
  - ``"positional"`` (PEFT <= 0.18, no swap): the parameter was read as [E, in=d1, out=d2]: lora_A.weight [E*r, d1]
    is [E, r, d1], lora_B.weight [d2, r*E] is [d2, r, E], and delta W[e] = scale * (B[:, :, e] @ A[e])^T. So
    A_ours[e] = B_old[:, :, e]^T and B_ours[e] = A_old[e]^T.

  A live ParamWrapper says which one it is; from a state dict the shapes say it unless d1 == d2, where ``layout``
  must be given (it is never guessed).

* Base weights: fused gate_up_proj [E, 2I, H] / down_proj [E, H, I] <-> per-expert ``gate_proj.weight [I, H]``,
  ``up_proj.weight [I, H]``, ``down_proj.weight [H, I]``.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Optional

import torch

SWAPPED = "swapped"  # PEFT >= 0.19
POSITIONAL = "positional"  # PEFT <= 0.18
LAYOUTS = (SWAPPED, POSITIONAL)


class StackedLora(NamedTuple):
    """moefuse's stacked adapter on a weight [E, out, in]: a [E, r, in], b [E, out, r]."""

    a: torch.Tensor
    b: torch.Tensor


def _check_stacked(lora: StackedLora, what: str) -> tuple[int, int, int, int]:
    """Returns (E, r, out, in) of a stacked adapter, or raises ValueError naming `what`."""
    a, b = lora
    if a.dim() != 3 or b.dim() != 3:
        raise ValueError(f"{what}: a must be [E, r, in] and b [E, out, r], got a {tuple(a.shape)} and b "
                         f"{tuple(b.shape)}")  # fmt: skip
    e, r, n_in = a.shape
    if b.shape[0] != e:
        raise ValueError(f"{what}: a has {e} experts but b has {b.shape[0]} (a {tuple(a.shape)}, b {tuple(b.shape)})")
    if b.shape[2] != r:
        raise ValueError(f"{what}: rank mismatch, a has rank {r} but b has rank {b.shape[2]} "
                         f"(a {tuple(a.shape)}, b {tuple(b.shape)})")  # fmt: skip
    return e, r, b.shape[1], n_in


def _expert_key(prefix: str, i: int, proj: str, leaf: str) -> str:
    return f"{prefix}{i}.{proj}.{leaf}"


def _take(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"missing key {key!r} in the per-expert state dict")
    return state[key]


# ---------------------------------------------------------------------------------------------------------------------
# Stacked LoRA <-> per-expert LoRA modules


def stacked_lora_to_per_expert(gate_up: Optional[StackedLora] = None, down: Optional[StackedLora] = None,
                               prefix: str = "experts.") -> dict[str, torch.Tensor]:  # fmt: skip
    """Per-expert LoRA weights ``{prefix}{i}.{gate_proj,up_proj,down_proj}.lora_{A,B}.weight``.

    gate_up: stacked adapter on gate_up_proj (a [E, r, H], b [E, 2I, r]); down: on down_proj (a [E, r, I],
    b [E, H, r]). gate_proj and up_proj get the gate and up halves of b's rows and the same a (copies).
    """
    out: dict[str, torch.Tensor] = {}
    if gate_up is not None:
        e, _, rows, _ = _check_stacked(gate_up, "gate_up")
        if rows % 2:
            raise ValueError(f"gate_up: b must have 2*I rows (gate then up), got an odd count: "
                             f"{tuple(gate_up.b.shape)}")  # fmt: skip
        gate_b, up_b = gate_up.b.split(rows // 2, dim=1)
        for i in range(e):
            for proj, b in (("gate_proj", gate_b), ("up_proj", up_b)):
                out[_expert_key(prefix, i, proj, "lora_A.weight")] = gate_up.a[i].clone()
                out[_expert_key(prefix, i, proj, "lora_B.weight")] = b[i].clone()
    if down is not None:
        e, _, _, _ = _check_stacked(down, "down")
        for i in range(e):
            out[_expert_key(prefix, i, "down_proj", "lora_A.weight")] = down.a[i].clone()
            out[_expert_key(prefix, i, "down_proj", "lora_B.weight")] = down.b[i].clone()
    return out


def _stack_experts(state: Mapping[str, torch.Tensor], num_experts: int, prefix: str, proj: str) -> StackedLora:
    a = [_take(state, _expert_key(prefix, i, proj, "lora_A.weight")) for i in range(num_experts)]
    b = [_take(state, _expert_key(prefix, i, proj, "lora_B.weight")) for i in range(num_experts)]
    for i in range(num_experts):
        if a[i].dim() != 2 or b[i].dim() != 2 or a[i].shape[0] != b[i].shape[1]:
            raise ValueError(f"{proj} of expert {i}: lora_A.weight must be [r, in] and lora_B.weight [out, r] with one "
                             f"r, got {tuple(a[i].shape)} and {tuple(b[i].shape)}")  # fmt: skip
        if a[i].shape != a[0].shape or b[i].shape != b[0].shape:
            raise ValueError(f"{proj}: expert {i} has lora_A {tuple(a[i].shape)} / lora_B {tuple(b[i].shape)} but "
                             f"expert 0 has {tuple(a[0].shape)} / {tuple(b[0].shape)}; stacking needs one rank and "
                             "shape for every expert")  # fmt: skip
    return StackedLora(torch.stack(a), torch.stack(b))


def per_expert_lora_to_stacked(
    state: Mapping[str, torch.Tensor], num_experts: int, prefix: str = "experts."
) -> tuple[Optional[StackedLora], Optional[StackedLora]]:
    """(gate_up, down) stacked adapters from per-expert LoRA weights; either is None when its keys are absent.

    gate_up has the rank of gate_proj's adapter when every expert's gate_proj and up_proj adapters share lora_A
    (as stacked_lora_to_per_expert writes them); otherwise A = [A_gate; A_up] and B = [[B_gate, 0], [0, B_up]] with
    twice the rank, which gives exactly the same delta. Keep the adapters' scale either way.
    """
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")

    def present(proj: str) -> bool:
        return any(k.startswith(f"{prefix}{i}.{proj}.") for k in state for i in range(num_experts))

    gate_up = None
    if present("gate_proj") or present("up_proj"):
        gate, up = (_stack_experts(state, num_experts, prefix, proj) for proj in ("gate_proj", "up_proj"))
        if gate.a.shape[2] != up.a.shape[2]:
            raise ValueError(f"gate_proj and up_proj adapters must read the same input width, got lora_A "
                             f"{tuple(gate.a.shape[1:])} and {tuple(up.a.shape[1:])}")  # fmt: skip
        if gate.b.shape[1] != up.b.shape[1]:
            raise ValueError(f"gate_proj and up_proj must have the same output width I, got lora_B "
                             f"{tuple(gate.b.shape[1:])} and {tuple(up.b.shape[1:])}")  # fmt: skip
        if gate.a.shape == up.a.shape and torch.equal(gate.a, up.a):
            gate_up = StackedLora(gate.a, torch.cat([gate.b, up.b], dim=1))
        else:  # rank 2r, block-diagonal B
            e, r_g, r_u, i = num_experts, gate.a.shape[1], up.a.shape[1], gate.b.shape[1]
            b = gate.b.new_zeros(e, 2 * i, r_g + r_u)
            b[:, :i, :r_g] = gate.b
            b[:, i:, r_g:] = up.b
            gate_up = StackedLora(torch.cat([gate.a, up.a], dim=1), b)
    down = _stack_experts(state, num_experts, prefix, "down_proj") if present("down_proj") else None
    return gate_up, down


# ---------------------------------------------------------------------------------------------------------------------
# Stacked LoRA <-> PEFT target_parameters (ParamWrapper)


def detect_peft_layout(lora_a: torch.Tensor, lora_b: torch.Tensor, param_shape: tuple[int, int, int]) -> str:
    """SWAPPED or POSITIONAL from the shapes of a ParamWrapper's lora_A.weight / lora_B.weight and of the
    parameter [E, d1, d2] it adapts. Raises ValueError when the shapes fit neither, or both (d1 == d2)."""
    e, d1, d2 = param_shape
    _check_peft_shapes(lora_a, lora_b, e)
    fits = [name for name, (n_in, n_out) in ((SWAPPED, (d2, d1)), (POSITIONAL, (d1, d2)))
            if lora_a.shape[1] == n_in and lora_b.shape[0] == n_out]  # fmt: skip
    if not fits:
        raise ValueError(f"PEFT lora_A.weight {tuple(lora_a.shape)} / lora_B.weight {tuple(lora_b.shape)} fit neither "
                         f"layout of a parameter {tuple(param_shape)}")  # fmt: skip
    if len(fits) == 2:
        raise ValueError(f"ambiguous PEFT layout: the parameter {tuple(param_shape)} has d1 == d2, so the shapes "
                         f"cannot tell PEFT >= 0.19 ('{SWAPPED}') from <= 0.18 ('{POSITIONAL}'); pass layout= "
                         "explicitly, or convert from the live ParamWrapper (stacked_from_param_wrapper)")  # fmt: skip
    return fits[0]


def _check_peft_shapes(lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int) -> int:
    """Returns r, or raises ValueError."""
    if lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError(f"PEFT lora_A.weight and lora_B.weight must be 2-D, got {tuple(lora_a.shape)} and "
                         f"{tuple(lora_b.shape)}")  # fmt: skip
    if num_experts < 1 or lora_a.shape[0] % num_experts:
        raise ValueError(f"wrong expert count: lora_A.weight has {lora_a.shape[0]} rows, not a multiple of "
                         f"num_experts={num_experts}")  # fmt: skip
    if lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(f"rank mismatch: lora_A.weight {tuple(lora_a.shape)} has {lora_a.shape[0]} = E*r rows but "
                         f"lora_B.weight {tuple(lora_b.shape)} has {lora_b.shape[1]} columns")  # fmt: skip
    return lora_a.shape[0] // num_experts


def peft_stacked_views(lora_a: torch.Tensor, lora_b: torch.Tensor, param_shape: tuple[int, int, int],
                       layout: Optional[str] = None) -> StackedLora:  # fmt: skip
    """Stacked adapter (a [E, r, d2], b [E, d1, r]) on a parameter [E, d1, d2] as views of a ParamWrapper's
    lora_A.weight and lora_B.weight: no copy, so b (and in the positional layout a too) is strided, and gradients
    flow back through the views. moefuse's ops take such views as they are. layout: SWAPPED or POSITIONAL; None
    detects it from the shapes."""
    e, d1, d2 = param_shape
    if layout is None:
        layout = detect_peft_layout(lora_a, lora_b, param_shape)
    elif layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    r = _check_peft_shapes(lora_a, lora_b, e)
    n_in, n_out = (d2, d1) if layout == SWAPPED else (d1, d2)
    if lora_a.shape[1] != n_in or lora_b.shape[0] != n_out:
        raise ValueError(f"PEFT lora_A.weight {tuple(lora_a.shape)} / lora_B.weight {tuple(lora_b.shape)} do not fit "
                         f"the '{layout}' layout of a parameter {tuple(param_shape)}: expected [E*r, {n_in}] and "
                         f"[{n_out}, r*E]")  # fmt: skip
    a = lora_a.reshape(e, r, n_in)  # expert-major (views of contiguous weights)
    b = lora_b.reshape(n_out, r, e).permute(2, 0, 1)  # expert-minor -> [E, n_out, r]
    if layout == POSITIONAL:  # delta[e] = (b[e] @ a[e])^T = a[e]^T @ b[e]^T
        a, b = b.transpose(1, 2), a.transpose(1, 2)
    return StackedLora(a, b)


def peft_to_stacked(lora_a: torch.Tensor, lora_b: torch.Tensor, param_shape: tuple[int, int, int],
                    layout: Optional[str] = None) -> StackedLora:  # fmt: skip
    """peft_stacked_views as contiguous tensors, for checkpoints and other tools."""
    return StackedLora(*(t.contiguous() for t in peft_stacked_views(lora_a, lora_b, param_shape, layout)))


def stacked_to_peft(lora: StackedLora, layout: str = SWAPPED) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A.weight, lora_B.weight) of a ParamWrapper in `layout` for a stacked adapter (a [E, r, in],
    b [E, out, r]) on a parameter [E, out, in]."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    e, r, _, _ = _check_stacked(lora, "lora")
    a, b = lora if layout == SWAPPED else (lora.b.transpose(1, 2), lora.a.transpose(1, 2))
    # a: [E, r, n_in] -> [E*r, n_in]; b: [E, n_out, r] -> [n_out, r, E] -> [n_out, r*E]
    return a.reshape(e * r, -1).contiguous(), b.permute(1, 2, 0).reshape(b.shape[1], r * e).contiguous()


def param_wrapper_layout(module: torch.nn.Module) -> str:
    """The layout of a live PEFT ParamWrapper: read from `_did_swap_in_out_features` (PEFT >= 0.19); a wrapper
    without that attribute comes from a PEFT that never swapped."""
    return SWAPPED if getattr(module, "_did_swap_in_out_features", False) else POSITIONAL


def stacked_from_param_wrapper(module: torch.nn.Module, adapter_name: str = "default") -> tuple[StackedLora, float]:
    """(stacked adapter, scale) of one adapter of a live 3-D PEFT ParamWrapper, as contiguous tensors that keep
    autograd to lora_A.weight / lora_B.weight; detach them for a plain conversion."""
    if not callable(getattr(module, "get_param", None)) or adapter_name not in getattr(module, "lora_A", {}):
        raise ValueError(f"expected a PEFT ParamWrapper holding adapter {adapter_name!r}, got "
                         f"{type(module).__name__}")  # fmt: skip
    param = module.get_param()
    if param.dim() != 3:
        raise ValueError(f"expected a ParamWrapper on a 3-D expert parameter, got {tuple(param.shape)}")
    lora = peft_to_stacked(module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight,
                           tuple(param.shape), param_wrapper_layout(module))  # fmt: skip
    return lora, float(module.scaling[adapter_name])


# ---------------------------------------------------------------------------------------------------------------------
# Base expert weights: fused <-> per-expert


def fused_to_per_expert(gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                        prefix: str = "experts.") -> dict[str, torch.Tensor]:  # fmt: skip
    """``{prefix}{i}.gate_proj.weight [I, H]``, ``up_proj.weight [I, H]``, ``down_proj.weight [H, I]`` from
    gate_up_proj [E, 2I, H] (gate rows then up rows) and down_proj [E, H, I]."""
    e, i2, h = _check_fused(gate_up_proj, down_proj)
    out: dict[str, torch.Tensor] = {}
    for i in range(e):
        out[_expert_key(prefix, i, "gate_proj", "weight")] = gate_up_proj[i, : i2 // 2].clone()
        out[_expert_key(prefix, i, "up_proj", "weight")] = gate_up_proj[i, i2 // 2 :].clone()
        out[_expert_key(prefix, i, "down_proj", "weight")] = down_proj[i].clone()
    return out


def per_expert_to_fused(state: Mapping[str, torch.Tensor], num_experts: int,
                        prefix: str = "experts.") -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(gate_up_proj [E, 2I, H], down_proj [E, H, I]) from per-expert gate/up/down weights."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")

    def stack(proj: str) -> torch.Tensor:
        ws = [_take(state, _expert_key(prefix, i, proj, "weight")) for i in range(num_experts)]
        for i, w in enumerate(ws):
            if w.shape != ws[0].shape:
                raise ValueError(f"{proj}.weight of expert {i} is {tuple(w.shape)} but expert 0's is "
                                 f"{tuple(ws[0].shape)}")  # fmt: skip
        return torch.stack(ws)

    gate_up, down = torch.cat([stack("gate_proj"), stack("up_proj")], dim=1), stack("down_proj")
    _check_fused(gate_up, down)
    return gate_up, down


def _check_fused(gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> tuple[int, int, int]:
    if gate_up_proj.dim() != 3 or down_proj.dim() != 3 or gate_up_proj.shape[1] % 2:
        raise ValueError(f"gate_up_proj must be [E, 2I, H] and down_proj [E, H, I], got {tuple(gate_up_proj.shape)} "
                         f"and {tuple(down_proj.shape)}")  # fmt: skip
    e, i2, h = gate_up_proj.shape
    if tuple(down_proj.shape) != (e, h, i2 // 2):
        raise ValueError(f"down_proj must be [E, H, I] = {(e, h, i2 // 2)} for gate_up_proj "
                         f"{tuple(gate_up_proj.shape)}, got {tuple(down_proj.shape)}")  # fmt: skip
    return e, i2, h
