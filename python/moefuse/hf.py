"""Transformers v5 experts backend "moefuse".

Importing moefuse registers it in transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS, so that
`from_pretrained(..., experts_implementation="moefuse")` and `model.set_experts_implementation("moefuse")` select it.
The router stays Transformers' own (router logits and the auxiliary loss are untouched); only the experts run here.
Transformers 5.17 validates names against the registered keys, so registration is all it takes. Earlier v5 releases
checked them against a fixed list of built-in names; there, importing moefuse also lets that check pass "moefuse"
(_accept_name).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.activations import SiLUActivation
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from ._ops import MoefuseError, run_experts
from .nf4 import packed

NAME = "moefuse"
# experts-module attribute: {"gate_up_proj" | "down_proj": (a, b, scale)}, the stacked adapters of this forward
LORA_ATTR = "_moefuse_lora"

# flag -> value moefuse supports (the Transformers v5 default layout of Qwen3-MoE experts)
_LAYOUT = {"is_transposed": False, "has_bias": False, "is_concatenated": True, "has_gate": True}


def check_layout(experts: torch.nn.Module) -> None:
    """Raises MoefuseError naming the first layout flag or activation moefuse cannot run."""
    for flag, supported in _LAYOUT.items():
        value = getattr(experts, flag, supported)
        if value != supported:
            raise MoefuseError(
                f"moefuse experts backend: {type(experts).__name__}.{flag}={value} is not supported (needs "
                f"{flag}={supported}: gate_up_proj [E, 2I, H] as [gate | up], down_proj [E, H, I], no bias)"
            )
    act = getattr(experts, "act_fn", None)
    if not (isinstance(act, (SiLUActivation, torch.nn.SiLU)) or act is F.silu):
        raise MoefuseError(
            f"moefuse experts backend: {type(experts).__name__}.act_fn={act!r} is not supported (only SiLU: SwiGLU)"
        )


def _peft_parametrised(experts: torch.nn.Module) -> list[str]:
    """The expert weights that PEFT's own LoRA path parametrises for this call (its ParamWrapper forms W + B.A)."""
    params = experts._modules.get("parametrizations")  # no Module.__getattr__: this runs in every forward
    if params is None:
        return []
    return [name for name in ("gate_up_proj", "down_proj")
            if name in params and any(type(p).__name__.startswith("_Lora") for p in params[name])]  # fmt: skip


def moefuse_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """ALL_EXPERTS_FUNCTIONS entry: out[t] = sum_j w[t, j] * expert_{idx[t, j]}(x[t]); ids >= num_experts add
    nothing."""
    check_layout(self)
    if formed := _peft_parametrised(self):  # Python shows it once per process (its default warning filter)
        where = ", ".join(f"experts.{name}" for name in formed)
        warnings.warn(
            f"moefuse: PEFT forms W + B.A of the whole expert stack for its LoRA on {where} in every forward; "
            "moefuse.use_moefuse_lora(model) applies the adapters inside moefuse's grouped GEMMs instead (call it "
            "again after PeftModel.from_pretrained)"
        )
    w = self.gate_up_proj
    # Like grouped_mm: compute in the weights' dtype (autocast may hand f32 activations to bf16 experts).
    x = hidden_states.to(w.dtype)
    # Stacked PEFT adapters, handed over for this forward by moefuse.lora (use_moefuse_lora).
    adapters = getattr(self, LORA_ATTR, {})
    lora = [t for name in ("gate_up_proj", "down_proj") for t in adapters.get(name, (None, None, 1.0))]
    out, _ = run_experts(x, top_k_index.to(torch.int32), top_k_weights.to(torch.float32), packed(w, x.shape[-1]),
                         packed(self.down_proj, w.shape[-2] // 2), *lora)  # fmt: skip
    return out.to(hidden_states.dtype)


def compile_decoder_layers(model: torch.nn.Module, **compile_kwargs) -> torch.nn.Module:
    """torch.compile each decoder layer of a Transformers model in place (regional compilation), the way to compile
    training with moefuse: the causal mask stays in eager code, where Transformers sees a batch without padding and
    lets SDPA run causal with no mask, which it cannot see under tracing. Works through PEFT wrappers. Returns the
    model."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise MoefuseError(f"compile_decoder_layers: {type(model).__name__} has no module named *DecoderLayer")
    for layer in layers:
        layer.compile(**compile_kwargs)
    return model


def _accept_name() -> None:
    """Where Transformers' check of experts_implementation refuses "moefuse" (early v5 releases compared the name with
    a fixed list, "eager", "grouped_mm" and "batched_mm", while their experts dispatch already read the registered
    functions), wraps that check so that it returns "moefuse" for "moefuse" and is unchanged for every other name.
    Releases that accept registered names are left as they are."""
    check = PreTrainedModel.get_correct_experts_implementation
    try:
        check(None, NAME)  # the model is read only for "grouped_mm"
        return
    except ValueError:
        pass

    @functools.wraps(check)
    def get_correct_experts_implementation(self, requested_experts):
        return NAME if requested_experts == NAME else check(self, requested_experts)

    PreTrainedModel.get_correct_experts_implementation = get_correct_experts_implementation


ALL_EXPERTS_FUNCTIONS.register(NAME, moefuse_experts_forward)
_accept_name()
