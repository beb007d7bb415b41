"""moefuse.convert: lossless layout converters (pure torch), checked against a real PEFT model where PEFT is involved."""

import copy

import pytest
import torch

from moefuse.convert import (POSITIONAL, SWAPPED, StackedLora, detect_peft_layout, fused_to_per_expert,
                             param_wrapper_layout, peft_to_stacked, per_expert_lora_to_stacked, per_expert_to_fused,
                             stacked_from_param_wrapper, stacked_lora_to_per_expert, stacked_to_peft)  # fmt: skip

E, H, I, R = 5, 12, 7, 3


def rand_stacked(e, r, n_out, n_in, dtype=torch.float32):
    return StackedLora(torch.randn(e, r, n_in).to(dtype), torch.randn(e, n_out, r).to(dtype))


def delta(lora, scale=1.0):
    """scale * B[e] @ A[e] in float64: [E, out, in]."""
    return scale * torch.bmm(lora.b.double(), lora.a.double())


def assert_bitwise(x, y):
    assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


# ---- stacked LoRA <-> per-expert modules ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_expert_lora_round_trip_is_bitwise(dtype):
    gate_up, down = rand_stacked(E, R, 2 * I, H, dtype), rand_stacked(E, R, H, I, dtype)
    state = stacked_lora_to_per_expert(gate_up, down, prefix="model.layers.0.mlp.experts.")
    assert len(state) == 6 * E
    k = "model.layers.0.mlp.experts.3."
    assert state[k + "gate_proj.lora_A.weight"].shape == (R, H)
    assert state[k + "gate_proj.lora_B.weight"].shape == (I, R)
    assert state[k + "down_proj.lora_A.weight"].shape == (R, I)
    assert state[k + "down_proj.lora_B.weight"].shape == (H, R)
    # gate_proj / up_proj deltas are the gate / up rows of the stacked delta
    full = delta(gate_up)[3]
    gate = state[k + "gate_proj.lora_B.weight"].double() @ state[k + "gate_proj.lora_A.weight"].double()
    up = state[k + "up_proj.lora_B.weight"].double() @ state[k + "up_proj.lora_A.weight"].double()
    torch.testing.assert_close(torch.cat([gate, up]), full, rtol=0, atol=0)

    gu2, d2 = per_expert_lora_to_stacked(state, E, prefix="model.layers.0.mlp.experts.")
    for x, y in zip(gu2 + d2, gate_up + down):
        assert_bitwise(x, y)


def test_per_expert_lora_with_different_gate_and_up_inputs_doubles_the_rank():
    gate, up = rand_stacked(E, R, I, H), rand_stacked(E, R + 1, I, H)
    state = {}
    for i in range(E):
        for proj, lora in (("gate_proj", gate), ("up_proj", up)):
            state[f"experts.{i}.{proj}.lora_A.weight"] = lora.a[i]
            state[f"experts.{i}.{proj}.lora_B.weight"] = lora.b[i]
    gate_up, down = per_expert_lora_to_stacked(state, E)
    assert down is None
    assert gate_up.a.shape == (E, 2 * R + 1, H) and gate_up.b.shape == (E, 2 * I, 2 * R + 1)
    torch.testing.assert_close(delta(gate_up), torch.cat([delta(gate), delta(up)], dim=1), rtol=1e-12, atol=1e-12)
    # and back: per-expert adapters of rank 2r+1 with the same deltas
    back = stacked_lora_to_per_expert(gate_up)
    for i in range(E):
        for proj, lora in (("gate_proj", gate), ("up_proj", up)):
            d = back[f"experts.{i}.{proj}.lora_B.weight"].double() @ back[f"experts.{i}.{proj}.lora_A.weight"].double()
            torch.testing.assert_close(d, delta(lora)[i], rtol=1e-12, atol=1e-12)


def test_per_expert_lora_errors():
    gate_up = rand_stacked(E, R, 2 * I, H)
    state = stacked_lora_to_per_expert(gate_up)
    with pytest.raises(ValueError, match="missing key 'experts.5.gate_proj"):
        per_expert_lora_to_stacked(state, E + 1)
    bad = dict(state)
    bad["experts.2.up_proj.lora_A.weight"] = torch.randn(R + 1, H)
    bad["experts.2.up_proj.lora_B.weight"] = torch.randn(I, R + 1)
    with pytest.raises(ValueError, match="expert 2 has lora_A"):
        per_expert_lora_to_stacked(bad, E)
    bad["experts.2.up_proj.lora_B.weight"] = torch.randn(I, R)
    with pytest.raises(ValueError, match="one r"):
        per_expert_lora_to_stacked(bad, E)
    with pytest.raises(ValueError, match="rank mismatch"):
        stacked_lora_to_per_expert(StackedLora(gate_up.a, gate_up.b[..., :-1]))
    with pytest.raises(ValueError, match="experts"):
        stacked_lora_to_per_expert(down=StackedLora(torch.randn(E, R, I), torch.randn(E - 1, H, R)))


# ---- base weights --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_base_weights_round_trip_is_bitwise(dtype):
    gate_up, down = torch.randn(E, 2 * I, H).to(dtype), torch.randn(E, H, I).to(dtype)
    state = fused_to_per_expert(gate_up, down)
    assert_bitwise(state["experts.1.gate_proj.weight"], gate_up[1, :I])
    assert_bitwise(state["experts.1.up_proj.weight"], gate_up[1, I:])
    assert_bitwise(state["experts.4.down_proj.weight"], down[4])
    gu2, d2 = per_expert_to_fused(state, E)
    assert_bitwise(gu2, gate_up)
    assert_bitwise(d2, down)


def test_base_weights_errors():
    with pytest.raises(ValueError, match="down_proj must be"):
        fused_to_per_expert(torch.randn(E, 2 * I, H), torch.randn(E, H, I + 1))
    state = fused_to_per_expert(torch.randn(E, 2 * I, H), torch.randn(E, H, I))
    with pytest.raises(ValueError, match="missing key"):
        per_expert_to_fused(state, E + 1)


# ---- PEFT target_parameters ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [SWAPPED, POSITIONAL])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peft_round_trip_is_bitwise(layout, dtype):
    lora = rand_stacked(E, R, 2 * I, H, dtype)
    a, b = stacked_to_peft(lora, layout)
    # parameter [E, d1, d2] = [E, 2I, H]: lora_A reads d2 when swapped, d1 when positional
    assert a.shape == (E * R, H if layout == SWAPPED else 2 * I) and b.shape[1] == R * E
    assert detect_peft_layout(a, b, (E, 2 * I, H)) == layout
    for x, y in zip(peft_to_stacked(a, b, (E, 2 * I, H)), lora):
        assert_bitwise(x, y)


def test_positional_layout_matches_its_delta_definition():
    """PEFT <= 0.18 read a parameter [E, d1, d2] as [E, in=d1, out=d2]: lora_A [E*r, d1], lora_B [d2, r*E] and
    delta W = scale * einsum('o r e, e r i -> e i o', B, A); our a, b must give the same delta as scale * b @ a."""
    d1, d2, scale = 2 * I, H, 1.5  # gate_up_proj [E, 2I, H]
    lora_a, lora_b = torch.randn(E * R, d1), torch.randn(d2, R * E)
    expected = scale * torch.einsum("o r e, e r i -> e i o", lora_b.reshape(d2, R, E).double(),
                                    lora_a.reshape(E, R, d1).double())  # fmt: skip
    ours = peft_to_stacked(lora_a, lora_b, (E, d1, d2))  # detected from the shapes
    assert ours.a.shape == (E, R, d2) and ours.b.shape == (E, d1, R)
    torch.testing.assert_close(delta(ours, scale), expected, rtol=1e-12, atol=1e-12)
    a2, b2 = stacked_to_peft(ours, POSITIONAL)
    assert_bitwise(a2, lora_a)
    assert_bitwise(b2, lora_b)


def test_peft_errors():
    lora = rand_stacked(E, R, 2 * I, H)
    a, b = stacked_to_peft(lora)
    with pytest.raises(ValueError, match="rank mismatch"):
        peft_to_stacked(a, b[:, :-1], (E, 2 * I, H))
    with pytest.raises(ValueError, match="wrong expert count"):
        peft_to_stacked(a, b, (E + 1, 2 * I, H))
    with pytest.raises(ValueError, match="fit neither"):
        peft_to_stacked(a, b, (E, 2 * I + 1, H))
    with pytest.raises(ValueError, match="do not fit"):
        peft_to_stacked(a, b, (E, 2 * I, H), layout=POSITIONAL)
    with pytest.raises(ValueError, match="layout must be"):
        peft_to_stacked(a, b, (E, 2 * I, H), layout="new")
    with pytest.raises(ValueError, match="rank mismatch"):
        stacked_to_peft(StackedLora(lora.a, lora.b[..., :-1]))
    square = rand_stacked(E, R, H, H)
    sa, sb = stacked_to_peft(square)
    with pytest.raises(ValueError, match="ambiguous PEFT layout"):
        peft_to_stacked(sa, sb, (E, H, H))
    for x, y in zip(peft_to_stacked(sa, sb, (E, H, H), layout=SWAPPED), square):
        assert_bitwise(x, y)


@pytest.fixture(scope="module")
def peft_model():
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=24, intermediate_size=32, moe_intermediate_size=8,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=12, num_experts=4,
                         num_experts_per_tok=2)  # fmt: skip
    base = Qwen3MoeForCausalLM(cfg).eval()
    for layer in base.model.layers:  # empty-initialised expert weights: give them values
        torch.nn.init.normal_(layer.mlp.experts.gate_up_proj, std=0.2)
        torch.nn.init.normal_(layer.mlp.experts.down_proj, std=0.2)
    reference = copy.deepcopy(base)
    config = LoraConfig(r=3, lora_alpha=5, target_modules=[],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])  # fmt: skip
    model = get_peft_model(base, config).eval()
    # ParamWrapper -> the name of the parameter it adapts, in the reference model
    wrappers = {m: n.removeprefix("base_model.model.").replace(".base_layer", "") + "." + m.parameter_name
                for n, m in model.named_modules() if type(m).__name__ == "ParamWrapper"}  # fmt: skip
    assert len(wrappers) == 2 * cfg.num_hidden_layers
    with torch.no_grad():
        for w in wrappers:  # random, non-zero adapters (PEFT zero-initialises B)
            torch.nn.init.normal_(w.lora_A["default"].weight)
            torch.nn.init.normal_(w.lora_B["default"].weight)
    return model, reference, wrappers


def test_peft_delta_matches_get_delta_weight(peft_model):
    _, _, wrappers = peft_model
    for w in wrappers:
        assert param_wrapper_layout(w) == SWAPPED  # PEFT 0.21 on Transformers' [E, out, in]
        lora, scale = stacked_from_param_wrapper(w)
        e, n_out, n_in = w.get_param().shape
        assert lora.a.shape == (e, 3, n_in) and lora.b.shape == (e, n_out, 3)
        assert scale == pytest.approx(5 / 3)
        torch.testing.assert_close(delta(lora, scale).float(), w.get_delta_weight("default"), rtol=1e-5, atol=1e-6)
        # and back to PEFT's own tensors, bitwise
        a, b = stacked_to_peft(lora, param_wrapper_layout(w))
        assert_bitwise(a, w.lora_A["default"].weight.detach())
        assert_bitwise(b, w.lora_B["default"].weight.detach())
        with pytest.raises(ValueError, match="holding adapter 'other'"):
            stacked_from_param_wrapper(w, "other")
    with pytest.raises(ValueError, match="expected a PEFT ParamWrapper"):
        stacked_from_param_wrapper(torch.nn.Linear(2, 2))


def test_peft_state_dict_detects_the_layout(peft_model):
    from peft import get_peft_model_state_dict

    model, _, _ = peft_model
    state = get_peft_model_state_dict(model)
    params = {n: p for n, p in model.named_parameters()}
    prefix = "base_model.model.model.layers.0.mlp.experts."
    for sub, name in (("base_layer.", "gate_up_proj"), ("", "down_proj")):
        shape = tuple(next(p for n, p in params.items() if n.startswith(prefix) and n.endswith(name)).shape)
        a, b = state[f"{prefix}{sub}lora_A.weight"], state[f"{prefix}{sub}lora_B.weight"]
        assert detect_peft_layout(a, b, shape) == SWAPPED
        assert peft_to_stacked(a, b, shape).b.shape == (shape[0], shape[1], 3)


def test_peft_model_equals_merged_stacked_adapter(peft_model):
    """The PEFT model's forward equals the base model with W + scale * B @ A formed from our stacked adapters."""
    model, reference, wrappers = peft_model
    merged = copy.deepcopy(reference)
    with torch.no_grad():
        for w, name in wrappers.items():
            lora, scale = stacked_from_param_wrapper(w)
            assert torch.equal(merged.get_parameter(name), w.get_param())
            merged.get_parameter(name).add_(delta(lora, scale).float())
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        base = reference(input_ids=ids).logits
    assert not torch.allclose(want, base, atol=1e-3)  # the adapters matter
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
