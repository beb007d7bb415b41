"""moefuse: fused Mixture-of-Experts layers for fine-tuning Qwen3-MoE with Transformers v5 and PEFT.

Importing it registers the torch ops (torch.ops.moefuse.*) and the Transformers experts backend "moefuse";
use_moefuse_lora(peft_model) runs PEFT's LoRA on the experts (target_parameters) through it as well, and
quantize_experts(model) keeps the expert weights in 4 bits (QLoRA).
"""

from . import _C
from ._ops import MoefuseError, routing_plan
# The ops' eager callers: torch.ops.moefuse.* without torch.library's per-call host time (the ops when traced).
from ._ops import run_experts as experts, run_moe_block as moe_block, run_moe_fused_linear as moe_fused_linear
from .block import MoeBlock, reference_moe
from . import hf  # registers experts_implementation="moefuse"
from .hf import compile_decoder_layers
from .lora import use_moefuse_lora
from .nf4 import Nf4Weight, dequantize_experts, quantize_experts

__version__ = "0.1.0"
has_cuda = _C.has_cuda

__all__ = ["MoeBlock", "MoefuseError", "Nf4Weight", "compile_decoder_layers", "dequantize_experts", "experts",
           "has_cuda", "moe_block", "moe_fused_linear", "quantize_experts", "reference_moe", "routing_plan",
           "use_moefuse_lora"]
