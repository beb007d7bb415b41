"""Expert LoRA from PEFT through moefuse's stacked path.

PEFT adapts the fused expert weights of a Transformers v5 MoE with ``LoraConfig(target_parameters=
["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])``: one ``ParamWrapper`` per parameter (nested when both are
targeted) that, every forward, parametrises the parameter as W + scale * B.A, a full-size copy of the expert stack.
``use_moefuse_lora(model)`` makes those wrappers hand their adapter to the "moefuse" experts function instead, as the
stacked (A [E, r, in], B [E, out, r], scale) that rides along the grouped GEMM, so W + B.A is never formed.

The adapters stay PEFT's own parameters: the stacked tensors are views of lora_A.weight / lora_B.weight
(moefuse.convert.peft_stacked_views; the op stages them into the weights' dtype and layout, and writes their
gradients back through the views), so optimizers, save_pretrained, PeftModel.from_pretrained and merge_and_unload
work as before. The wrappers stay ParamWrappers (a subclass that only replaces how the adapter is
applied); after PeftModel.from_pretrained, call use_moefuse_lora again.

Under Transformers' expert parallelism (DistributedConfig(enable_expert_parallel=True)) each rank runs only its own
experts: it gets those experts' rows of the adapter, and the adapter's gradient is summed over the ranks, so every
rank ends with the whole gradient (PEFT's own path cannot run there: its W + B.A has every expert).
"""

from __future__ import annotations

import weakref

import torch
from peft.tuners.lora import layer as peft_layer

from ._ops import _PLAIN_TENSORS, MoefuseError
from .convert import StackedLora, param_wrapper_layout, peft_stacked_views
from .hf import LORA_ATTR, NAME, check_layout

_PARAMS = ("gate_up_proj", "down_proj")
# wrapper -> (lora_A.weight, lora_B.weight, key, views) of its last forward (ParamWrapper._stacked). Beside the
# modules, not in them: a copy.deepcopy or pickle of the model must not meet the views, which are not leaves.
_KEPT_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _implementation(experts: torch.nn.Module):
    return getattr(getattr(experts, "config", None), "_experts_implementation", None)


def _adapter(wrapper: peft_layer.ParamWrapper, active_adapters) -> str | None:
    """The one active adapter of `wrapper` (None when none is), or MoefuseError for what moefuse cannot run."""
    mods = wrapper._modules  # its submodules without Module.__getattr__: this runs in every forward
    adapters = [a for a in active_adapters if a in mods["lora_A"]]
    where = f"LoRA on experts.{wrapper.parameter_name}"
    if len(adapters) > 1:
        raise MoefuseError(f"moefuse: {where}: {len(adapters)} active adapters {adapters}; moefuse runs one at a time "
                           "(set_adapter to one, or merge the others)")  # fmt: skip
    if not adapters:
        return None
    name = adapters[0]
    if wrapper.use_dora.get(name, False):
        raise MoefuseError(f"moefuse: {where}: DoRA (use_dora=True) is not supported")
    if not isinstance(mods["lora_dropout"][name], torch.nn.Identity):
        raise MoefuseError(f"moefuse: {where}: lora_dropout must be 0 (PEFT cannot apply it to parameters either)")
    if mods["lora_B"][name].bias is not None:
        raise MoefuseError(f"moefuse: {where}: lora_bias=True is not supported")
    return name


def _base_of(wrapper: torch.nn.Module) -> torch.nn.Module:
    """The module under a stack of PEFT wrappers, as get_base_layer() finds it but without a hasattr (and so a
    Module.__getattr__ and, at the bottom, a raised AttributeError) per level."""
    while (inner := wrapper._modules.get("base_layer")) is not None:
        wrapper = inner
    return wrapper


class _SumGradOver(torch.autograd.Function):
    """Identity forward; backward sums the gradient over a process group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def _expert_parallel_rows(param: torch.Tensor, lora: StackedLora) -> StackedLora:
    """The adapter rows of the experts this rank runs: all of them, unless `param` is sharded over its experts on a
    1-D device mesh (Transformers' expert parallelism hands each rank its contiguous share as local tensors)."""
    mesh, placements = getattr(param, "device_mesh", None), getattr(param, "placements", ())
    if mesh is None or not any(getattr(p, "dim", None) == 0 for p in placements):
        return lora
    if mesh.ndim != 1:
        raise MoefuseError(f"moefuse: LoRA on experts sharded over a {mesh.ndim}-D device mesh is not supported; "
                           "expert parallelism on a 1-D mesh is")  # fmt: skip
    n = param.to_local().shape[0]
    lo, group = mesh.get_local_rank() * n, mesh.get_group()
    return StackedLora(*(_SumGradOver.apply(t, group)[lo : lo + n] for t in lora))


# Named like PEFT's: PEFT tells nested wrappers apart by class name (e.g. when add_adapter wraps again).
class ParamWrapper(peft_layer.ParamWrapper):
    """A PEFT ParamWrapper on a fused expert parameter whose adapter the "moefuse" experts function applies."""

    def forward(self, x, *args, **kwargs):
        experts = _base_of(self)
        if _implementation(experts) != NAME or "adapter_names" in kwargs or not self._plain():
            return super().forward(x, *args, **kwargs)  # PEFT's own path (merged, disabled, another implementation)
        # This wrapper and the plain moefuse wrappers nested in it hand their adapters over, then the experts module
        # runs once: PEFT's per-wrapper calls cost host time that a layer step waits for.
        handed = getattr(experts, LORA_ATTR)  # made by use_moefuse_lora: compile traces item writes, not setdefault
        layer, names = self, []
        try:
            while isinstance(layer, ParamWrapper) and layer._plain():
                if layer._hand(experts, handed):
                    names.append(layer.parameter_name)
                layer = layer._modules["base_layer"]
            return layer(x, *args, **kwargs)
        finally:
            for name in names:
                del handed[name]

    def _plain(self) -> bool:
        return not (self.disable_adapters or self.merged)

    def _hand(self, experts: torch.nn.Module, handed: dict) -> bool:
        """Puts this wrapper's active adapter into `handed`, as views of PEFT's tensors; False when none is active."""
        name = _adapter(self, self.active_adapters)
        if name is None:
            return False
        if self.parameter_name in handed:
            raise MoefuseError(f"moefuse: two PEFT wrappers adapt experts.{self.parameter_name} at once; moefuse runs "
                               "one adapter per parameter (merge or disable the other)")  # fmt: skip
        param = getattr(experts, self.parameter_name)  # get_param(), without walking the wrappers again
        handed[self.parameter_name] = (*_expert_parallel_rows(param, self._stacked(name, param)), self.scaling[name])
        return True

    def _stacked(self, name: str, param: torch.Tensor) -> StackedLora:
        """Adapter `name` as views of PEFT's weights, no copies (peft_stacked_views): the op stages PEFT's strided (and
        often f32) adapters into the weights' dtype itself, and writes their gradients back into PEFT's layout.
        The views of one forward serve the next while the weights are the same tensors over the same storage and
        autograd records them alike: making them cost an HF block's LoRA forward 13 µs of host time on this project's
        2-core machine (bench/RESULTS.md), time that a single layer step's GPU waits for."""
        mods = self._modules  # as in _adapter
        a, b = mods["lora_A"][name].weight, mods["lora_B"][name].weight
        if torch.compiler.is_compiling() or type(a) not in _PLAIN_TENSORS or type(b) not in _PLAIN_TENSORS:
            return peft_stacked_views(a, b, tuple(param.shape), param_wrapper_layout(self))  # traced, fake, DTensor
        key = (a.data_ptr(), b.data_ptr(), a.requires_grad, b.requires_grad, torch.is_grad_enabled(), param.shape)
        kept = _KEPT_VIEWS.get(self)
        if kept is not None and kept[0] is a and kept[1] is b and kept[2] == key:
            return kept[3]
        views = peft_stacked_views(a, b, tuple(param.shape), param_wrapper_layout(self))
        _KEPT_VIEWS[self] = (a, b, key, views)
        return views


def use_moefuse_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Runs the expert LoRA of a PEFT model through moefuse's stacked path (see the module docstring); returns
    `model`, changed in place.

    The model's experts must use experts_implementation="moefuse", and its adapters on mlp.experts.gate_up_proj /
    down_proj (either or both) must be plain LoRA (no DoRA, no dropout, no bias; rsLoRA is fine) with at most one
    active adapter. Other LoRA modules (attention, ...) are left to PEFT. Raises MoefuseError otherwise.
    Without it, PEFT's own path still gives the same result with moefuse experts, but forms W + B.A every forward
    (the experts backend warns once when it sees that).
    """
    wrappers = [m for m in model.modules() if isinstance(m, peft_layer.ParamWrapper) and m.parameter_name in _PARAMS
                and all(hasattr(m.get_base_layer(), p) for p in _PARAMS)]  # fmt: skip
    if not wrappers:
        raise MoefuseError("moefuse.use_moefuse_lora: the model has no PEFT LoRA on expert parameters; create it "
                           "with LoraConfig(target_parameters=[\"mlp.experts.gate_up_proj\", "
                           "\"mlp.experts.down_proj\"])")  # fmt: skip
    for w in wrappers:
        experts = w.get_base_layer()
        impl = _implementation(experts)
        if impl != NAME:
            raise MoefuseError(f"moefuse.use_moefuse_lora: the experts use experts_implementation={impl!r}; load the "
                               f'model with experts_implementation="{NAME}" (or call '
                               f'model.set_experts_implementation("{NAME}")) first')  # fmt: skip
        check_layout(experts)
        _adapter(w, w.active_adapters)
    for w in wrappers:
        w.__class__ = ParamWrapper
        setattr(w.get_base_layer(), LORA_ATTR, {})
    return model
