"""The "moefuse" Transformers experts backend against "eager" on a tiny random Qwen3-MoE (f32)."""

import copy

import pytest
import torch

import moefuse
from conftest import CUDA, E, K, batch, tiny_model

TOL = dict(rtol=1e-4, atol=1e-5)


def forward_backward(model, **kw):
    model.zero_grad(set_to_none=True)
    out = model(**batch(), output_router_logits=True, **kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def ops_run(model):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, torch.no_grad():
        model(**batch())
    return {e.key for e in prof.key_averages()}


def test_set_experts_implementation_selects_moefuse():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert ALL_EXPERTS_FUNCTIONS["moefuse"] is moefuse.hf.moefuse_experts_forward
    model = tiny_model("moefuse")
    assert model.config._experts_implementation == "moefuse"
    assert "moefuse::experts" in ops_run(model)
    model.set_experts_implementation("eager")
    assert "moefuse::experts" not in ops_run(model)


def test_logits_loss_aux_loss_and_every_gradient_match_eager():
    eager = tiny_model("eager")
    fused = copy.deepcopy(eager)
    fused.set_experts_implementation("moefuse")
    out_e, grads_e = forward_backward(eager)
    out_f, grads_f = forward_backward(fused)
    torch.testing.assert_close(out_f.logits, out_e.logits, **TOL)
    torch.testing.assert_close(out_f.loss, out_e.loss, **TOL)
    assert out_e.aux_loss is not None and out_e.aux_loss > 0
    torch.testing.assert_close(out_f.aux_loss, out_e.aux_loss, **TOL)
    for a, b in zip(out_f.router_logits, out_e.router_logits):
        torch.testing.assert_close(a, b, **TOL)
    assert grads_f.keys() == grads_e.keys() and len(grads_e) == len(list(eager.parameters()))
    for name in grads_e:
        torch.testing.assert_close(grads_f[name], grads_e[name], rtol=1e-3, atol=1e-5, msg=name)


def test_adamw_steps_track_eager():
    losses = {}
    for impl in ("eager", "moefuse"):
        model = tiny_model(impl)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[impl] = []
        for step in range(20):
            out = model(**batch(), output_router_logits=True)  # one batch: the loss must fall
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[impl].append(out.loss.item())
    torch.testing.assert_close(torch.tensor(losses["moefuse"]), torch.tensor(losses["eager"]), rtol=1e-4, atol=1e-5)
    assert losses["eager"][-1] < losses["eager"][0]


def test_gradient_checkpointing_recomputes_correctly():
    plain = tiny_model("moefuse")
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable()
    plain.train(), ckpt.train()
    out_p, grads_p = forward_backward(plain)
    out_c, grads_c = forward_backward(ckpt)
    torch.testing.assert_close(out_c.loss, out_p.loss)
    assert grads_c.keys() == grads_p.keys()
    for name in grads_p:
        torch.testing.assert_close(grads_c[name], grads_p[name], rtol=1e-5, atol=1e-6, msg=name)


def test_from_pretrained_with_moefuse(tmp_path):
    from transformers import Qwen3MoeForCausalLM

    eager = tiny_model("eager")
    eager.save_pretrained(tmp_path)
    loaded = Qwen3MoeForCausalLM.from_pretrained(tmp_path, experts_implementation="moefuse")
    assert loaded.config._experts_implementation == "moefuse"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch()).logits, eager(**batch()).logits, **TOL)


def test_releases_that_accept_only_built_in_names_take_moefuse(monkeypatch):
    """Early Transformers v5 releases checked experts_implementation against a fixed list; importing moefuse then lets
    "moefuse" through that check (and nothing else)."""
    from transformers import PreTrainedModel

    def fixed_list(self, requested_experts):  # such a release's check
        name = "grouped_mm" if requested_experts is None else requested_experts
        if name not in ("eager", "grouped_mm", "batched_mm"):
            raise ValueError(f'Specified `experts_implementation="{name}"` is not supported.')
        return name

    monkeypatch.setattr(PreTrainedModel, "get_correct_experts_implementation", fixed_list)
    with pytest.raises(ValueError, match="moefuse"):
        tiny_model("moefuse")
    moefuse.hf._accept_name()
    model = tiny_model("eager")
    model.set_experts_implementation("moefuse")
    assert "moefuse::experts" in ops_run(model)
    assert tiny_model("moefuse").config._experts_implementation == "moefuse"
    with pytest.raises(ValueError, match="nonesuch"):
        model.set_experts_implementation("nonesuch")


def test_placeholder_expert_ids_contribute_nothing():
    experts = tiny_model("moefuse").model.layers[0].mlp.experts
    x = torch.randn(5, 64)
    ids = torch.tensor([[0, 1, 2]] * 5)
    w = torch.rand(5, K)
    with torch.no_grad():
        full = experts(x, ids, w)
        ids_ph = ids.clone()
        ids_ph[:, 2] = E  # expert-parallel sentinel
        partial = experts(x, ids_ph, w)
        w_two = w.clone()
        w_two[:, 2] = 0
        expect = experts(x, ids, w_two)
    torch.testing.assert_close(partial, expect)
    assert not torch.allclose(full, partial)


@pytest.mark.parametrize("flag,value", [("is_transposed", True), ("has_bias", True), ("is_concatenated", False),
                                        ("has_gate", False)])  # fmt: skip
def test_unsupported_layout_flags_raise(flag, value):
    model = tiny_model("moefuse")
    setattr(model.model.layers[1].mlp.experts, flag, value)
    with pytest.raises(moefuse.MoefuseError, match=flag):
        model(**batch())


def test_unsupported_activation_raises():
    model = tiny_model("moefuse")
    model.model.layers[0].mlp.experts.act_fn = torch.nn.GELU()
    with pytest.raises(ValueError, match="act_fn"):
        model(**batch())


def test_negative_ids_raise():
    experts = tiny_model("moefuse").model.layers[0].mlp.experts
    with pytest.raises(ValueError, match="negative"):
        experts(torch.randn(2, 64), torch.tensor([[0, -1, 2], [1, 2, 3]]), torch.rand(2, K))


# Other Transformers v5 MoE families whose experts have Qwen3-MoE's layout, with what their configs need beyond the
# shared tiny sizes. Their routers, shared experts and attention stay Transformers' own; only the experts change.
FAMILIES = {
    "deepseek_v3": dict(qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, kv_lora_rank=16, q_lora_rank=None,
                        n_group=1, topk_group=1, first_k_dense_replace=0, head_dim=8),
    "ernie4_5_moe": {}, "flex_olmo": {}, "glm4_moe": {}, "granitemoe": {}, "hunyuan_v1_moe": {}, "jamba": {},
    "minimax": {}, "mixtral": {}, "olmoe": {}, "phimoe": {}, "qwen2_moe": dict(shared_expert_intermediate_size=32),
    "qwen3_next": {},
}  # fmt: skip


def family_model(model_type, device):
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, head_dim=16, num_local_experts=E, num_experts=E,
                 n_routed_experts=E, num_experts_per_tok=K, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                 bos_token_id=2)  # fmt: skip
    cfg = AutoConfig.for_model(model_type, **{**sizes, **FAMILIES[model_type]})
    return AutoModelForCausalLM.from_config(cfg).to(device)


def family_step(model, impl):
    """Logits and every parameter gradient of one training step with experts_implementation=impl (f32)."""
    device = next(model.parameters()).device
    model.set_experts_implementation(impl)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # PhiMoE's router samples while training
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = model(**{k: v.to(device) for k, v in batch().items()}, use_cache=False)
        out.loss.backward()
    assert ("moefuse::experts" in {e.key for e in prof.key_averages()}) == (impl == "moefuse")
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_steps_match(got, want):
    cuda = got[0].is_cuda  # the CUDA backend's f32 GEMMs sum in another order
    torch.testing.assert_close(got[0], want[0], **(dict(rtol=1e-3, atol=1e-4) if cuda else TOL))
    assert got[1].keys() == want[1].keys() and got[1]
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=2e-3 if cuda else 1e-3, atol=1e-5, msg=name)


DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_other_moe_families_match_eager(model_type, device):
    model = family_model(model_type, device)
    want = family_step(model, "eager")
    assert_steps_match(family_step(model, "moefuse"), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_other_moe_families_run_peft_expert_lora_as_peft_does(model_type, device):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                      init_lora_weights=False)  # B nonzero, so the adapters change the outputs
    model = get_peft_model(family_model(model_type, device), lora)
    want = family_step(model, "eager")  # PEFT's own path: W + B.A formed on every forward
    model.set_experts_implementation("moefuse")
    moefuse.use_moefuse_lora(model)
    assert_steps_match(family_step(model, "moefuse"), want)


def test_a_family_with_another_layout_is_refused_by_flag():
    """gpt-oss keeps its experts transposed and with biases: the backend names the flag instead of running."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt_oss", vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=E,
                               num_experts_per_tok=K, pad_token_id=0, eos_token_id=1)  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg)
    model.set_experts_implementation("moefuse")
    with pytest.raises(moefuse.MoefuseError, match="is_transposed=True"):
        model(**batch(), use_cache=False)
