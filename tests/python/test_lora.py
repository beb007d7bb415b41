"""Expert LoRA from PEFT (target_parameters) through moefuse's stacked path (use_moefuse_lora), against PEFT's own
merged-weight path with the "eager" experts, on a tiny random Qwen3-MoE (f32)."""

import contextlib
import copy
import warnings

import pytest
import torch
from torch.library import opcheck

import moefuse
from conftest import E, H, I, K, batch, block_tensors, eager_and_op_steps, routing, tiny_model
from moefuse.convert import (POSITIONAL, SWAPPED, StackedLora, param_wrapper_layout, stacked_from_param_wrapper,
                             stacked_to_peft)  # fmt: skip

R = 3
BOTH = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
TOL = dict(rtol=1e-4, atol=1e-5)
ops = torch.ops.moefuse


def peft_model(targets=BOTH, impl="moefuse", **kw):
    """Tiny Qwen3-MoE with LoRA on attention and on the expert parameters `targets`, every lora_B non-zero."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=R, lora_alpha=5, target_modules=["q_proj", "v_proj", "o_proj"], target_parameters=targets,
                        **kw)  # fmt: skip
    model = get_peft_model(tiny_model(impl), config)
    with torch.no_grad():  # PEFT zero-initialises lora_B
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


def expert_wrappers(model):
    from peft.tuners.lora.layer import ParamWrapper

    return [m for m in model.modules() if isinstance(m, ParamWrapper)]


def to_positional(model):
    """Simulates PEFT <= 0.18, which read a parameter [E, d1, d2] as [E, in=d1, out=d2] (no swap): the same deltas in
    that layout. PEFT 0.21 still computes such wrappers (get_delta_factors without the swap)."""
    for w in expert_wrappers(model):
        lora, _ = stacked_from_param_wrapper(w)
        for module, value in zip((w.lora_A, w.lora_B), stacked_to_peft(StackedLora(*(t.detach() for t in lora)),
                                                                       POSITIONAL)):  # fmt: skip
            module["default"] = torch.nn.Linear(value.shape[1], value.shape[0], bias=False)
            module["default"].weight.data.copy_(value)
        w.in_features, w.out_features = w.out_features, w.in_features
        w._did_swap_in_out_features = False
        assert param_wrapper_layout(w) == POSITIONAL


def moefuse_and_peft(targets=BOTH, layout=SWAPPED, **kw):
    """(model through use_moefuse_lora, the same model through PEFT's own path with eager experts)."""
    ref = peft_model(targets, "eager", **kw)
    if layout == POSITIONAL:
        to_positional(ref)
    fused = copy.deepcopy(ref)
    fused.base_model.model.set_experts_implementation("moefuse")
    return moefuse.use_moefuse_lora(fused), ref


def forward_backward(model):
    model.zero_grad(set_to_none=True)
    out = model(**batch(), output_router_logits=True)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def merged_weights_forbidden():
    """Fails if PEFT forms W + B.A (its parametrisation gets it from these two)."""
    from peft.tuners.lora.layer import ParamWrapper

    def formed(*args, **kwargs):
        raise AssertionError("PEFT formed W + B.A")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(ParamWrapper, "get_delta_weight", formed)
        m.setattr(ParamWrapper, "get_delta_factors", formed)
        yield


@pytest.mark.parametrize("targets,layout,kw", [(BOTH, SWAPPED, {}), (BOTH, POSITIONAL, {}),
                                               (BOTH[:1], SWAPPED, {"use_rslora": True}),
                                               (BOTH[1:], POSITIONAL, {})])  # fmt: skip
def test_logits_loss_and_every_lora_gradient_match_peft(targets, layout, kw):
    fused, ref = moefuse_and_peft(targets, layout, **kw)
    out_r, grads_r = forward_backward(ref)
    with merged_weights_forbidden():
        out_f, grads_f = forward_backward(fused)
    torch.testing.assert_close(out_f.logits, out_r.logits, **TOL)
    torch.testing.assert_close(out_f.loss, out_r.loss, **TOL)
    lora = [n for n in grads_r if "lora_" in n]
    assert len(lora) == len(grads_r) == 2 * 3 * (3 + len(targets))  # A and B; 3 layers; q, v, o + experts
    assert any("experts" in n for n in lora) and any("q_proj" in n for n in lora)
    for name in grads_r:
        assert grads_f[name] is not None and grads_r[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_f[name], grads_r[name], rtol=1e-3, atol=1e-5, msg=name)


def test_bf16_model_with_f32_adapters_matches_peft():
    """PEFT keeps adapters in f32 over a bf16 model; both paths cast them to bf16 for the product, and the adapters'
    gradients come back in f32. PEFT rounds W + B.A to bf16, moefuse never forms it: a few % apart after 3 layers."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=R, lora_alpha=5, target_parameters=BOTH)
    ref = get_peft_model(tiny_model("eager").to(torch.bfloat16), config)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    fused = copy.deepcopy(ref)
    fused.base_model.model.set_experts_implementation("moefuse")
    moefuse.use_moefuse_lora(fused)
    (out_r, grads_r), (out_f, grads_f) = forward_backward(ref), forward_backward(fused)
    torch.testing.assert_close(out_f.logits, out_r.logits, rtol=2e-2, atol=2e-2)
    assert len(grads_r) == 2 * 3 * 2
    for name, grad in grads_r.items():
        assert grad.dtype == grads_f[name].dtype == torch.float32, name
        assert (grads_f[name] - grad).norm() <= 5e-2 * grad.norm(), name


def test_adamw_steps_track_peft():
    losses = {}
    for name, model in zip(("moefuse", "peft"), moefuse_and_peft()):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[name] = []
        for _ in range(5):
            out = model(**batch())
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name].append(out.loss.item())
    torch.testing.assert_close(torch.tensor(losses["moefuse"]), torch.tensor(losses["peft"]), rtol=1e-4, atol=1e-5)
    assert losses["peft"][-1] < losses["peft"][0]


def test_views_kept_between_forwards_follow_the_adapters():
    """The wrappers keep their adapter views from one forward to the next (ParamWrapper._stacked): a forward without
    grad, new storage, a new weight, another active adapter or a copy of the model must not meet stale views."""
    from peft import LoraConfig

    fused, ref = moefuse_and_peft()

    def agree():
        out_r, grads_r = forward_backward(ref)
        out_f, grads_f = forward_backward(fused)
        torch.testing.assert_close(out_f.logits, out_r.logits, **TOL)
        assert grads_f.keys() == grads_r.keys()
        for name in grads_r:
            torch.testing.assert_close(grads_f[name], grads_r[name], rtol=1e-3, atol=1e-5, msg=name)

    with torch.no_grad():  # views made without autograd, then a training step
        fused(**batch())
    agree()
    for model in (fused, ref):
        w = expert_wrappers(model)[0]
        w.lora_B["default"].weight.data = w.lora_B["default"].weight.data * 2  # new storage
        w = expert_wrappers(model)[-1]
        w.lora_A["default"].weight = torch.nn.Parameter(w.lora_A["default"].weight.detach() - 0.1)  # a new weight
    agree()
    for model in (fused, ref):
        model.add_adapter("other", LoraConfig(r=2, lora_alpha=3, target_parameters=BOTH))
        model.set_adapter("other")
        with torch.no_grad():  # the same values in both models (PEFT initialises A at random, B to zero)
            for name, p in model.named_parameters():
                if ".other." in name:
                    p.copy_(torch.linspace(-0.3, 0.3, p.numel()).reshape(p.shape))
    moefuse.use_moefuse_lora(fused)
    agree()
    fused, ref = copy.deepcopy(fused), copy.deepcopy(ref)
    agree()


def test_fake_adapters_are_not_kept():
    """Fake (or other subclass) adapter weights get fresh views and no data pointer is read from them."""
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode

    fused, _ = moefuse_and_peft()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    params = {n: mode.from_tensor(p) for n, p in fused.named_parameters()}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*data pointer of FakeTensor")
        with mode:
            out = torch.func.functional_call(fused, params, kwargs=batch())
    assert out.logits.shape[-1] == fused.config.vocab_size


@torch.no_grad()
def test_save_reload_and_merge_and_unload(tmp_path):
    from peft import PeftModel

    fused, _ = moefuse_and_peft()
    want = fused(**batch()).logits
    fused.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_model("moefuse"), tmp_path)
    with pytest.warns(UserWarning, match="use_moefuse_lora"):  # PEFT's own path, until use_moefuse_lora again
        torch.testing.assert_close(reloaded(**batch()).logits, want, **TOL)
    torch.testing.assert_close(moefuse.use_moefuse_lora(reloaded)(**batch()).logits, want, **TOL)
    merged = copy.deepcopy(fused).merge_and_unload()
    assert not expert_wrappers(merged)
    torch.testing.assert_close(merged(**batch()).logits, want, **TOL)


@torch.no_grad()
def test_peft_own_path_through_moefuse_experts_warns_it_forms_the_weights():
    for targets, where in ((BOTH, "experts.gate_up_proj, experts.down_proj"), (BOTH[1:], "experts.down_proj ")):
        with pytest.warns(UserWarning, match=f"W \\+ B.A .* on {where}.*use_moefuse_lora"):
            peft_model(targets)(**batch())
    fused, _ = moefuse_and_peft()
    with warnings.catch_warnings():  # only moefuse's own warning: other libraries' may come and go with versions
        warnings.filterwarnings("error", message="moefuse: PEFT forms")
        fused(**batch())
        with fused.disable_adapter():
            fused(**batch())


def test_gradient_checkpointing_recomputes_with_the_adapters():
    fused, _ = moefuse_and_peft()
    ckpt = copy.deepcopy(fused)
    ckpt.gradient_checkpointing_enable()
    fused.train(), ckpt.train()
    out_f, grads_f = forward_backward(fused)
    out_c, grads_c = forward_backward(ckpt)
    torch.testing.assert_close(out_c.loss, out_f.loss)
    for name in grads_f:
        torch.testing.assert_close(grads_c[name], grads_f[name], rtol=1e-5, atol=1e-6, msg=name)


def test_compiles_fullgraph_with_the_adapters():
    fused, _ = moefuse_and_peft()
    compiled = copy.deepcopy(fused)
    compiled.forward = torch.compile(compiled.forward, fullgraph=True)  # a graph break would raise
    outs, grads = [], []
    for model in (fused, compiled):  # no output_router_logits: Transformers' capture hooks take a lock dynamo refuses
        model.zero_grad(set_to_none=True)
        outs.append(model(**batch()))
        outs[-1].loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    (out_f, out_c), (grads_f, grads_c) = outs, grads
    torch.testing.assert_close(out_c.logits, out_f.logits, **TOL)
    for name in grads_f:
        torch.testing.assert_close(grads_c[name], grads_f[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compile_decoder_layers_compiles_each_layer_through_peft():
    fused, _ = moefuse_and_peft()
    layers = fused.base_model.model.model.layers
    assert moefuse.compile_decoder_layers(fused) is fused
    assert all(layer._compiled_call_impl is not None for layer in layers)
    with pytest.raises(moefuse.MoefuseError, match="DecoderLayer"):
        moefuse.compile_decoder_layers(torch.nn.Linear(2, 2))


@torch.no_grad()
def test_disabled_and_merged_adapters_run_as_peft_runs_them():
    fused, ref = moefuse_and_peft()
    with fused.disable_adapter(), ref.disable_adapter():
        torch.testing.assert_close(fused(**batch()).logits, ref(**batch()).logits, **TOL)
    want = ref(**batch()).logits
    fused.merge_adapter()  # the wrappers stay, merged: they must not add their adapter a second time
    torch.testing.assert_close(fused(**batch()).logits, want, **TOL)
    fused.unmerge_adapter()
    torch.testing.assert_close(fused(**batch()).logits, want, **TOL)


@torch.no_grad()
def test_switching_the_implementation_back_falls_back_to_peft():
    fused, ref = moefuse_and_peft()
    fused.base_model.model.set_experts_implementation("eager")
    torch.testing.assert_close(fused(**batch()).logits, ref(**batch()).logits, **TOL)


# ---- the op ----------------------------------------------------------------------------------------------------------


def lora_args(requires_grad=False):
    """gate_up and down adapters: (a, b, scale) each."""
    ts = (torch.randn(E, R, H), torch.randn(E, 2 * I, R) * 0.3, torch.randn(E, R, I), torch.randn(E, H, R) * 0.3)
    gu_a, gu_b, dn_a, dn_b = (t.requires_grad_(requires_grad) for t in ts)
    return gu_a, gu_b, 0.7, dn_a, dn_b, 1.3


def test_experts_with_lora_opcheck():
    x, _, gate_up, down = block_tensors()
    ids, w = routing()
    ids[1, 2] = E  # placeholder: contributes nothing
    x.requires_grad_(), w.requires_grad_()
    lora = lora_args(requires_grad=True)
    opcheck(ops.experts, (x, ids, w, gate_up, down, *lora))
    opcheck(ops.experts, (x, ids, w, gate_up, down, *lora[:3]))  # gate_up only
    det = [t.detach() if isinstance(t, torch.Tensor) else t for t in lora]
    out, saved = ops.experts(x.detach(), ids, w.detach(), gate_up, down, *det)
    args = (torch.randn_like(out), x.detach(), w.detach(), gate_up, down, saved)
    opcheck(ops.experts_backward, (*args, [True, True, False, False] + [True] * 4, *det))
    opcheck(ops.experts_backward, (*args, [False] * 5 + [True] + [False] * 2, *det))


def test_block_with_lora_opcheck():
    x, rw, gate_up, down = block_tensors()
    x.requires_grad_(), rw.requires_grad_()
    lora = lora_args(requires_grad=True)
    opcheck(ops.moe_block, (x, rw, gate_up, down, K, True, *lora))
    opcheck(ops.moe_block, (x, rw, gate_up, down, K, False, None, None, 1.0, *lora[3:]))  # down only
    det = [t.detach() if isinstance(t, torch.Tensor) else t for t in lora]
    out, logits, saved = ops.moe_block(x.detach(), rw.detach(), gate_up, down, K, True, *det)
    args = (torch.randn_like(out), torch.randn_like(logits), x.detach(), rw.detach(), gate_up, down, logits, saved,
            K, True)  # fmt: skip
    opcheck(ops.moe_block_backward, (*args, [True, True, False, False] + [True] * 4, *det))
    opcheck(ops.moe_block_backward, (*args, [False] * 5 + [True] + [False] * 2, *det))


def test_run_moe_block_with_lora_without_torch_library_layers_matches_the_op():
    from moefuse._ops import run_moe_block

    x, rw, gate_up, down = block_tensors()
    lora = lora_args(requires_grad=True)
    leaves = [t for t in (x, rw, *lora) if isinstance(t, torch.Tensor)]
    results = eager_and_op_steps(run_moe_block, ops.moe_block, (x, rw, gate_up, down, K, True, *lora), leaves)
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_run_experts_without_torch_library_layers_matches_the_op():
    """run_experts' eager path (the op's Python bodies under a plain autograd.Function) gives the op's outputs and
    gradients to the bit, with and without adapters; traced or without gradients it runs the op or the body."""
    from moefuse._ops import run_experts

    x, _, gate_up, down = block_tensors()
    ids, w = routing()
    ids[1, 2] = E  # placeholder: contributes nothing
    for lora in ((), lora_args(requires_grad=True)):  # no adapters: the defaults left out, as callers may
        leaves = [t for t in (x, w, *lora) if isinstance(t, torch.Tensor)]
        results = eager_and_op_steps(run_experts, ops.experts, (x, ids, w, gate_up, down, *lora), leaves)
        for got, want in zip(*results):
            assert torch.equal(got, want)
        with torch.no_grad():
            assert torch.equal(run_experts(x, ids, w, gate_up, down, *lora)[0], results[1][0])


def test_experts_take_strided_adapters_of_another_dtype():
    """Adapters as PEFT's weights hold them (b expert-minor, a strided view), here bf16 over f32 weights: the op
    stages them itself, gives what the same values contiguous in f32 give, and writes the gradients back through the
    views, cast."""
    x, _, gate_up, down = block_tensors()
    ids, w = routing()
    gu_a, gu_b, s1, dn_a, dn_b, s2 = lora_args()
    expert_minor = lambda t: t.to(torch.bfloat16).permute(1, 2, 0).contiguous().permute(2, 0, 1).requires_grad_()
    strided = [expert_minor(t) for t in (gu_a, gu_b, dn_a, dn_b)]
    assert not any(t.is_contiguous() for t in strided)
    dense = [t.detach().float().requires_grad_() for t in strided]
    outs = []
    for gu_a, gu_b, dn_a, dn_b in (strided, dense):
        out = ops.experts(x, ids, w, gate_up, down, gu_a, gu_b, s1, dn_a, dn_b, s2)[0]
        out.backward(torch.ones_like(out))
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    for got, want in zip(strided, dense):
        assert got.grad.dtype == torch.bfloat16 and torch.equal(got.grad, want.grad.to(torch.bfloat16))
    opcheck(ops.experts, (x, ids, w, gate_up, down, strided[0], strided[1], s1, strided[2], strided[3], s2))


def test_backward_reads_the_forwards_low_rank_rows():
    """The forward leaves u = scale * x . A[e]^T in its saved state and the backward takes it from there: with those
    rows zeroed, grad B (= g^T . w * u) comes out zero while grad A (which does not read u) does not change."""
    from moefuse import _C, _ops

    x, _, gate_up, down = block_tensors()
    ids, w = routing()
    lora = lora_args()
    out, saved = ops.experts(x, ids, w, gate_up, down, *lora)
    args = (torch.randn_like(out), x, w, gate_up, down)
    needs = [False] * 4 + [True] * 4
    ref = ops.experts_backward(*args, saved, needs, *lora)
    tampered = saved.clone()
    tampered[_ops._saved_bytes(_C.moe_experts_saved_bytes, x.shape[0], x, gate_up, K, False) :] = 0
    got = ops.experts_backward(*args, tampered, needs, *lora)
    for i in (4, 6):  # grad_gate_up_a, grad_down_a
        assert torch.equal(got[i], ref[i])
    for i in (5, 7):  # grad_gate_up_b, grad_down_b
        assert ref[i].abs().sum() > 0 and got[i].abs().sum() == 0


def test_backward_reads_the_b_its_forward_staged():
    """A b the op stages (strided, as PEFT's lora_B views are) is kept in the saved state: with the original
    overwritten between forward and backward, the backward gives what it gives untouched."""
    x, _, gate_up, down = block_tensors()
    ids, w = routing()
    gu_a, gu_b, s1, dn_a, dn_b, s2 = lora_args()
    expert_minor = lambda t: t.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    gu_b, dn_b = expert_minor(gu_b), expert_minor(dn_b)
    lora = (gu_a, gu_b, s1, dn_a, dn_b, s2)
    out, saved = ops.experts(x, ids, w, gate_up, down, *lora)
    args = (torch.randn_like(out), x, w, gate_up, down, saved, [True] + [False] * 3 + [True] * 4)
    want = ops.experts_backward(*args, *lora)
    with torch.no_grad():
        for b in (gu_b, dn_b):
            b.fill_(float("nan"))
    got = ops.experts_backward(*args, *lora)
    for g, r in zip(got, want):
        assert torch.equal(g, r)


def test_experts_with_lora_match_merged_weights():
    """The adapters give what W + scale * b.a would, and their gradients are those through the merged weights."""
    x, _, gate_up, down = block_tensors(requires_grad=True)
    ids, w = routing()
    ids[0, 1] = E + 2  # placeholder
    w.requires_grad_()
    gu_a, gu_b, gu_s, dn_a, dn_b, dn_s = lora = lora_args(requires_grad=True)
    gate_up.requires_grad_(False), down.requires_grad_(False)
    out = ops.experts(x, ids, w, gate_up, down, *lora)[0]
    grad = torch.randn_like(out)
    leaves = (x, w, gu_a, gu_b, dn_a, dn_b)
    got = torch.autograd.grad(out, leaves, grad)
    merged = ops.experts(x, ids, w, gate_up + gu_s * gu_b @ gu_a, down + dn_s * dn_b @ dn_a)[0]
    want = torch.autograd.grad(merged, leaves, grad)
    torch.testing.assert_close(out, merged, **TOL)
    for name, g, e in zip(("x", "w", "gu_a", "gu_b", "dn_a", "dn_b"), got, want):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4, msg=name)


# ---- bad inputs: clear errors ----------------------------------------------------------------------------------------


def test_use_moefuse_lora_errors():
    with pytest.raises(moefuse.MoefuseError, match='experts_implementation="moefuse"'):
        moefuse.use_moefuse_lora(peft_model(impl="eager"))
    with pytest.raises(moefuse.MoefuseError, match="no PEFT LoRA on expert parameters"):
        moefuse.use_moefuse_lora(peft_model(targets=[]))
    for attr, value, match in (("use_dora", True, "DoRA"), ("lora_dropout", torch.nn.Dropout(0.1), "lora_dropout")):
        model = peft_model()
        getattr(expert_wrappers(model)[0], attr)["default"] = value
        with pytest.raises(moefuse.MoefuseError, match=match):
            moefuse.use_moefuse_lora(model)


def test_multiple_active_adapters_raise():
    from peft import LoraConfig

    model = moefuse.use_moefuse_lora(peft_model())
    model.add_adapter("other", LoraConfig(r=2, target_modules=[], target_parameters=BOTH))
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(moefuse.MoefuseError, match="2 active adapters"):
        model(**batch())


def test_base_weight_with_an_adapter_is_frozen():
    x, _, gate_up, down = block_tensors()
    ids, w = routing()
    gate_up.requires_grad_()
    out = ops.experts(x, ids, w, gate_up, down, *lora_args(requires_grad=True))[0]
    with pytest.raises(ValueError, match="gate_up has a LoRA adapter, which freezes it"):
        out.sum().backward()


def test_bad_adapters_raise():
    x, _, gate_up, down = block_tensors()
    ids, w = routing()
    gu_a, gu_b, s, dn_a, dn_b, _ = lora_args()
    with pytest.raises(ValueError, match="lora needs both a and b"):
        ops.experts(x, ids, w, gate_up, down, gu_a)
    with pytest.raises(ValueError, match="lora.b"):
        ops.experts(x, ids, w, gate_up, down, gu_a, gu_b[:, :, :-1].contiguous(), s)
    with pytest.raises(ValueError, match="lora.a"):
        ops.experts(x, ids, w, gate_up, down, None, None, 1.0, dn_a.double(), dn_b.double())


def test_binding_refuses_a_base_weight_gradient_with_an_adapter():
    from moefuse import _C, _ops

    x, _, gate_up, _ = block_tensors()
    ids, _ = routing()
    plan, arg = _ops._make_plan(ids, E)  # plan owns the views in arg
    gu_a, gu_b, scale, *_ = lora_args()
    grad_h = torch.randn(ids.numel(), 2 * I)
    with pytest.raises(ValueError, match="LoRA freezes the base weight"):
        _C.moe_linear_backward(arg, x, gate_up, True, None, grad_h, None, torch.empty_like(gate_up), None,
                               _ops._workspace(x.device), lora=(gu_a, gu_b, scale, None, None))  # fmt: skip


def test_binding_refuses_saved_pieces_that_do_not_fit():
    """u and staged_b cross the binding as byte offsets into the experts op's saved state: one that is negative,
    misaligned or past the state's end is an error, and the linear op, which has no saved state, takes none."""
    from moefuse import _C, _ops

    x, _, gate_up, down = block_tensors()
    ids, w = routing()
    gu_a, gu_b, scale, *_ = lora_args()
    out, saved = ops.experts(x, ids, w, gate_up, down, gu_a, gu_b, scale)
    core = _ops._saved_bytes(_C.moe_experts_saved_bytes, x.shape[0], x, gate_up, K, False)
    for offset in (-256, core + 4, saved.numel()):
        with pytest.raises(ValueError, match="lora.u"):
            _C.moe_experts_forward(_ops._config(x, gate_up, K, False), x, ids, w, gate_up, down, torch.empty_like(out),
                                   saved, _ops._workspace(x.device), 0, (gu_a, gu_b, scale, offset, None), None)
    plan, arg = _ops._make_plan(ids, E)  # plan owns the views in arg
    with pytest.raises(ValueError, match="lora.u must be None"):
        _C.moe_linear_forward(arg, x, gate_up, True, None, torch.empty(ids.numel(), 2 * I), _ops._workspace(x.device),
                              lora=(gu_a, gu_b, scale, 0, None))  # fmt: skip
