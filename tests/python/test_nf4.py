"""4-bit expert weights (moefuse.quantize_experts, Nf4Weight): a quantized model against the same model given the
dequantized weights as plain parameters, which must agree exactly (the ops dequantize, then run the float path); QLoRA
through PEFT and through MoeBlock; torch.compile; what Nf4Weight does as a tensor; bad input."""

import copy
import io
import sys

import pytest
import torch

import moefuse
from conftest import CUDA, E, H, I, K, batch, tiny_model
from moefuse.nf4 import Nf4Weight, quantize

BOTH = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
LEVELS = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                       0.7229568362236023, 1.0], dtype=torch.float64)  # fmt: skip
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def experts_of(model):
    return [layer.mlp.experts for layer in model.model.layers]


def quantized_and_dequantized(impl="moefuse", device="cpu"):
    """(the tiny model with 4-bit experts, a copy whose experts are the dequantized weights as plain parameters)."""
    q = moefuse.quantize_experts(tiny_model(impl).to(device))
    d = copy.deepcopy(q)
    for ex in experts_of(d):
        for name in ("gate_up_proj", "down_proj"):
            setattr(ex, name, torch.nn.Parameter(getattr(ex, name).dequantize(), requires_grad=False))
    return q, d


def on(device, b):
    return {k: v.to(device) for k, v in b.items()}


def test_quantize_is_nearest_level_of_run_maximum():
    w = torch.randn(3, 5, 130, dtype=torch.float64).float()
    deq = quantize(w).dequantize().double()
    runs = torch.nn.functional.pad(w.double(), (0, 62)).view(3, 5, 3, 64)
    m = runs.abs().amax(-1, keepdim=True)
    nearest = (runs / m).unsqueeze(-1).sub(LEVELS).abs().argmin(-1)
    want = (LEVELS[nearest] * m).view(3, 5, 192)[..., :130]
    torch.testing.assert_close(deq, want.float().double(), rtol=1e-6, atol=0)


def test_nf4_weight_behaves_as_its_logical_tensor():
    w = torch.randn(E, 2 * I, H).bfloat16()
    q = quantize(w)
    assert isinstance(q, Nf4Weight) and q.shape == w.shape and q.dtype == torch.bfloat16 and not q.requires_grad
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (E, 2 * I, moefuse._C.nf4_row_bytes(H))
    p = torch.nn.Parameter(q, requires_grad=False)
    assert isinstance(p, torch.nn.Parameter) and isinstance(p, Nf4Weight)
    torch.testing.assert_close(q + 1, q.dequantize() + 1)  # other ops see the dequantized weight
    assert (q.dequantize() - w).abs().max() <= w.abs().max() * 0.2
    assert isinstance(q.to(torch.float32), Nf4Weight) and q.to(torch.float32).dtype == torch.float32
    assert torch.equal(q.detach().packed, q.packed) and torch.equal(q.clone().packed, q.packed)
    with pytest.raises(moefuse.MoefuseError, match="frozen"):
        with torch.no_grad():
            p.add_(1)


@pytest.mark.parametrize("device", DEVICES)
def test_quantized_model_matches_its_dequantized_weights(device):
    q, d = quantized_and_dequantized(device=device)
    assert all(isinstance(ex.gate_up_proj, Nf4Weight) for ex in experts_of(q))
    b = on(device, batch())
    outs = [m(**b, output_router_logits=True) for m in (q, d)]
    assert torch.equal(outs[0].logits, outs[1].logits)
    assert torch.equal(outs[0].aux_loss, outs[1].aux_loss)
    for o in outs:
        o.loss.backward()
    for (n, pq), (_, pd) in zip(q.named_parameters(), d.named_parameters()):
        if pq.requires_grad:
            assert torch.equal(pq.grad, pd.grad), n


def test_quantized_experts_hold_their_packed_bytes_only():
    model = moefuse.quantize_experts(tiny_model("moefuse"))
    row = moefuse._C.nf4_row_bytes
    for ex in experts_of(model):
        assert ex.gate_up_proj.packed.nbytes == E * 2 * I * row(64) and ex.down_proj.packed.nbytes == E * 64 * row(I)
    assert row(2048) / (2 * 2048) == 0.28125  # Qwen3-30B-A3B's gate_up rows: 28 % of their bf16 bytes


@pytest.mark.parametrize("device", DEVICES)
def test_qlora_through_peft_matches_dequantized_and_trains(device):
    from peft import LoraConfig, get_peft_model

    models = []
    for m in quantized_and_dequantized(device=device):
        torch.manual_seed(1)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=BOTH)
        m = get_peft_model(m, cfg)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2)
        models.append(moefuse.use_moefuse_lora(m))
    b = on(device, batch())
    losses = []
    for m in models:
        loss = m(**b).loss
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in models]
    assert grads[0].keys() == grads[1].keys() and any("experts" in n for n in grads[0])
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n
    q = models[0]
    opt = torch.optim.AdamW([p for p in q.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(8):
        opt.zero_grad()
        loss = q(**b).loss
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first


@torch.no_grad()
def test_qlora_adapter_saves_and_merges_once_dequantized(tmp_path):
    # PEFT saves the adapter alone with the experts in 4 bits; the whole model and merge_and_unload need the weights
    # themselves: dequantize_experts, after which the merged model gives the QLoRA model's logits.
    from peft import LoraConfig, PeftModel, get_peft_model

    m = get_peft_model(moefuse.quantize_experts(tiny_model("moefuse")),
                       LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=BOTH))  # fmt: skip
    for name, p in m.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.2)
    moefuse.use_moefuse_lora(m)
    want = m(**batch()).logits
    m.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(moefuse.quantize_experts(tiny_model("moefuse")), tmp_path / "adapter")
    assert torch.equal(moefuse.use_moefuse_lora(reloaded)(**batch()).logits, want)
    with pytest.raises(moefuse.MoefuseError, match="dequantize_experts"):
        m.base_model.model.save_pretrained(tmp_path / "model")
    with pytest.raises(moefuse.MoefuseError, match="dequantize"):
        copy.deepcopy(m).merge_and_unload()
    merged = moefuse.dequantize_experts(m).merge_and_unload()
    assert not any(isinstance(p, Nf4Weight) for p in merged.parameters())
    torch.testing.assert_close(merged(**batch()).logits, want, rtol=1e-4, atol=1e-4)
    merged.save_pretrained(tmp_path / "model")
    with pytest.raises(moefuse.MoefuseError, match="no 4-bit expert weights"):
        moefuse.dequantize_experts(merged)


def test_moe_block_qlora_matches_dequantized_and_reference():
    block = moefuse.MoeBlock.from_hf(tiny_model("eager").model.layers[0].mlp)
    moefuse.quantize_experts(block)
    block.add_lora(4, alpha=8)
    with torch.no_grad():
        block.gate_up_lora_b.normal_(0, 0.2)
        block.down_lora_b.normal_(0, 0.2)
    plain = copy.deepcopy(block)
    plain.gate_up_proj = torch.nn.Parameter(block.gate_up_proj.dequantize(), requires_grad=False)
    plain.down_proj = torch.nn.Parameter(block.down_proj.dequantize(), requires_grad=False)
    x = torch.randn(2, 9, 64)
    out = [m(x)[0] for m in (block, plain)]
    assert torch.equal(out[0], out[1])
    block.mode = "reference"
    torch.testing.assert_close(block(x)[0], out[1], rtol=1e-4, atol=1e-5)


def test_compiled_quantized_model_matches_eager():
    q, _ = quantized_and_dequantized()
    b = batch()
    want = q(**b).logits
    compiled = moefuse.compile_decoder_layers(q, fullgraph=True)
    torch.testing.assert_close(compiled(**b).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_linear_on_a_4bit_weight_matches_its_dequantized_weight(device):
    # The op takes the packed bytes and dequantizes them itself: the bits of the op on the dequantized weight.
    torch.manual_seed(0)
    tokens, experts, hidden, out = 9, 5, 64, 40
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16, device=device, requires_grad=True)
    w = quantize(torch.randn(experts, out, hidden, dtype=torch.bfloat16) * 0.1, device)
    ids = torch.randint(0, experts, (tokens, K), dtype=torch.int32, device=device)
    cw = torch.rand(tokens, K, device=device)
    plan = moefuse.routing_plan(ids, experts)
    got = moefuse.moe_fused_linear(x, w, plan, K, gather=True, combine_weights=cw)
    (gx,) = torch.autograd.grad(got.float().square().sum(), x)
    want = moefuse.moe_fused_linear(x, w.dequantize(), plan, K, gather=True, combine_weights=cw)
    (wx,) = torch.autograd.grad(want.float().square().sum(), x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want) and torch.equal(gx, wx)
    compiled = torch.compile(lambda x, w: moefuse.moe_fused_linear(x, w.packed, plan, K, True, cw), fullgraph=True)
    assert torch.equal(compiled(x, w), want)


def test_bad_input_is_refused_clearly():
    with pytest.raises(moefuse.MoefuseError, match="no experts module"):
        moefuse.quantize_experts(torch.nn.Linear(4, 4))
    with pytest.raises(moefuse.MoefuseError, match=r"\[experts, out, in\]"):
        quantize(torch.randn(4, 4))
    with pytest.raises(moefuse.MoefuseError, match=r"\[experts, out, in\]"):
        quantize(torch.zeros(2, 3, 4, dtype=torch.int32))
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("moefuse"), LoraConfig(r=2, target_parameters=BOTH))
    with pytest.raises(moefuse.MoefuseError, match="QLoRA's order"):
        moefuse.quantize_experts(model)
    q = quantize(torch.randn(E, 2 * I, H))
    with pytest.raises(moefuse.MoefuseError, match="gate_up"):  # bytes of another width
        moefuse.experts(torch.randn(5, H), torch.zeros(5, K, dtype=torch.int32), torch.rand(5, K),
                        q.packed[..., :16].contiguous(), quantize(torch.randn(E, H, I)).packed)  # fmt: skip
    # The bytes of widths 65-96 have one size: the Nf4Weight's shape tells them apart.
    w70, ids = quantize(torch.randn(E, 12, 70)), torch.zeros(3, 1, dtype=torch.int32)
    with pytest.raises(moefuse.MoefuseError, match="takes inputs 70 wide, got 71"):
        moefuse.moe_fused_linear(torch.randn(3, 71), w70, moefuse.routing_plan(ids, E), 1, gather=True)


def test_quantizing_shows_progress_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    model = moefuse.quantize_experts(tiny_model("moefuse"))
    assert "moefuse: quantizing experts: 100%" in sys.stderr.getvalue()
    moefuse.dequantize_experts(model, progress=False)
    assert "dequantizing" not in sys.stderr.getvalue()
