"""4-bit expert weights (NF4, the format of QLoRA; include/moefuse/ops.h, nf4_quantize).

``quantize_experts(model)`` packs the expert weights of every Transformers experts module and moefuse.MoeBlock in
`model` into 4 bits (4.5 bits a weight with the per-64 maxima), frozen. The experts and block ops take the packed
bytes as they are and dequantize each weight into their workspace just before its projection runs, forward and
backward, so the model holds the experts in about 28 % of their bf16 bytes; LoRA on them (moefuse's own or PEFT's
through use_moefuse_lora) is QLoRA.

A packed weight stays a parameter of its logical shape and dtype (Nf4Weight), so what reads .shape, .dtype or
.device of it (PEFT's target_parameters, Transformers) sees the weight it expects. Any other torch op on it runs on
its dequantized copy (PEFT's own merged-weight path, for instance: correct, and as slow as that path is); in-place
ops are refused, and .to() moves the bytes or changes the dtype it dequantizes to. PEFT saves a QLoRA adapter as
usual; what needs the weights themselves (merge_and_unload, saving the whole model) comes after
``dequantize_experts(model)``.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map
from tqdm import tqdm

from . import _C
from ._ops import MoefuseError, _call, _on, _stream

_aten = torch.ops.aten
_VIEWS = (_aten.detach.default, _aten.alias.default)


class Nf4Weight(torch.Tensor):
    """An expert weight [E, out, in] held as NF4 bytes `packed` [E, out, nf4_row_bytes(in)] (uint8); it reads as a
    tensor of `dtype`, the dtype it dequantizes to (the model's compute dtype)."""

    packed: torch.Tensor

    @staticmethod
    def __new__(cls, packed: torch.Tensor, shape, dtype: torch.dtype):
        return torch.Tensor._make_wrapper_subclass(cls, tuple(shape), dtype=dtype, device=packed.device,
                                                   requires_grad=False)  # fmt: skip

    def __init__(self, packed: torch.Tensor, shape, dtype: torch.dtype):
        self.packed = packed

    def __repr__(self):
        return f"Nf4Weight(shape={list(self.shape)}, dtype={self.dtype}, device={self.device})"

    def __tensor_flatten__(self):
        return ["packed"], (tuple(self.shape), self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return Nf4Weight(inner["packed"], *meta)

    def storage(self):
        # The wrapper has no storage. Savers find that out through the legacy storage() (safetensors, after
        # untyped_storage().data_ptr() failed; torch itself, torch.compile included, uses untyped_storage): say what
        # to do instead.
        raise MoefuseError("moefuse: a 4-bit expert weight has no storage of its logical shape to save; save the "
                           "adapter (PEFT's save_pretrained saves only it), or moefuse.dequantize_experts(model) "
                           "first to save the whole model")  # fmt: skip

    def dequantize(self) -> torch.Tensor:
        """The weight as a plain tensor of its dtype: level * maximum of each element's run, rounded once."""
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        with _on(out.device):
            _call(_C.nf4_dequantize, self.packed, out, _stream(out.device))
        return out

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _VIEWS:
            w = args[0]
            return Nf4Weight(w.packed, w.shape, w.dtype)
        if func is _aten._to_copy.default:
            w = args[0]
            device = kwargs.get("device") or w.device
            return Nf4Weight(w.packed.to(device), w.shape, kwargs.get("dtype") or w.dtype)
        if func is _aten.clone.default:
            w = args[0]
            return Nf4Weight(w.packed.clone(), w.shape, w.dtype)
        if func._schema.is_mutable and any(isinstance(a, Nf4Weight) for a in args):
            raise MoefuseError(f"moefuse: {func} would write a 4-bit expert weight, which is frozen (train LoRA on "
                               "it, or dequantize() it first)")  # fmt: skip
        plain = lambda t: t.dequantize() if isinstance(t, Nf4Weight) else t  # noqa: E731
        return func(*tree_map(plain, args), **tree_map(plain, kwargs))


def quantize(weight: torch.Tensor, device: torch.device | str | None = None) -> Nf4Weight:
    """weight [E, out, in] (f32, bf16 or f16) as an Nf4Weight of its dtype, packed on `device` (default: the
    weight's own)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or not weight.dtype.is_floating_point:
        raise MoefuseError(f"moefuse.nf4.quantize: expects a floating-point [experts, out, in] weight, got "
                           f"{type(weight).__name__} {list(getattr(weight, 'shape', []))}")  # fmt: skip
    if isinstance(weight, Nf4Weight):
        return weight
    w = weight.detach().to(device or weight.device).contiguous()
    e, out, n_in = w.shape
    packed = torch.empty(e, out, _C.nf4_row_bytes(n_in), dtype=torch.uint8, device=w.device)
    with _on(w.device):
        _call(_C.nf4_quantize, w, packed, _stream(w.device))
    return Nf4Weight(packed, w.shape, w.dtype)


def packed(weight: torch.Tensor, in_features: int) -> torch.Tensor:
    """What the ops take for an expert weight whose inputs are `in_features` wide: the bytes of an Nf4Weight, any
    other tensor as it is. The bytes do not record the width (every width from 65 to 96 packs a row into 64 bytes),
    so it is checked here against the Nf4Weight's shape; the ops check a float weight's themselves."""
    if not isinstance(weight, Nf4Weight):
        return weight
    if weight.shape[-1] != in_features:
        raise MoefuseError(f"moefuse: the 4-bit expert weight {list(weight.shape)} takes inputs {weight.shape[-1]} "
                           f"wide, got {in_features}")  # fmt: skip
    return weight.packed


_NAMES = ("gate_up_proj", "down_proj")


def _bar(items: list, desc: str, progress: bool):
    """`items` with a progress bar on a terminal when `progress` (a 235B model has 94 expert layers)."""
    return tqdm(items, desc=desc, unit="layer", disable=None if progress else True)


def quantize_experts(model: torch.nn.Module, device: torch.device | str | None = None,
                     progress: bool = True) -> torch.nn.Module:  # fmt: skip
    """Packs the expert weights (gate_up_proj, down_proj) of every Transformers experts module and MoeBlock in
    `model` into 4 bits, frozen, in place; returns `model`. `device` (default: each weight's own) is where the
    packed bytes go: a model loaded on the CPU can be quantized onto the GPU weight by weight, so its bf16 experts
    never need to fit there (model.to(device) then moves the rest). Quantize before adding adapters (QLoRA's
    order): PEFT's wrappers read the weights' shapes, which stay the same. `progress`: a bar over the layers when
    stderr is a terminal."""
    if any(type(m).__name__ == "ParamWrapper" for m in model.modules()):  # PEFT's target_parameters wrapper
        raise MoefuseError("moefuse.quantize_experts: the experts already carry PEFT adapters; quantize the model "
                           "first, then add LoRA (QLoRA's order)")  # fmt: skip
    found = [m for m in model.modules() if all(getattr(m._parameters.get(n), "ndim", 0) == 3 for n in _NAMES)]
    if not found:
        raise MoefuseError(f"moefuse.quantize_experts: {type(model).__name__} has no experts module with 3-D "
                           "gate_up_proj and down_proj parameters")  # fmt: skip
    for module in found:
        if hasattr(module, "is_transposed"):  # a Transformers experts module: only the layout moefuse runs
            from .hf import check_layout

            check_layout(module)
    done: dict[int, torch.nn.Parameter] = {}  # a MoeBlock from_hf shares its parameters with the HF block
    for module in _bar(found, "moefuse: quantizing experts", progress):
        for name in _NAMES:
            p = module._parameters[name]
            if id(p) not in done:
                done[id(p)] = torch.nn.Parameter(quantize(p, device), requires_grad=False)
            setattr(module, name, done[id(p)])
    return model


def dequantize_experts(model: torch.nn.Module, progress: bool = True) -> torch.nn.Module:
    """Turns every 4-bit expert weight in `model` back into a plain frozen parameter of its dtype, in place, wherever
    it sits (PEFT's wrappers included); returns `model`. For what needs the weights themselves: PEFT's
    merge_and_unload after QLoRA, or saving the whole model. `progress` as in quantize_experts."""
    found = [m for m in model.modules() if any(isinstance(p, Nf4Weight) for p in m._parameters.values())]
    done: dict[int, torch.nn.Parameter] = {}
    for module in _bar(found, "moefuse: dequantizing experts", progress):
        for name, p in list(module._parameters.items()):
            if isinstance(p, Nf4Weight):
                if id(p) not in done:
                    done[id(p)] = torch.nn.Parameter(p.dequantize(), requires_grad=False)
                module._parameters[name] = done[id(p)]
    if not done:
        raise MoefuseError(f"moefuse.dequantize_experts: {type(model).__name__} has no 4-bit expert weights")
    return model
