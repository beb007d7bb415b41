"""MoeBlock: fused vs reference vs Transformers' eager block; torch.compile with dynamic token counts."""

import copy

import pytest
import torch

import moefuse
from conftest import E, H, K, tiny_qwen3_moe_config


def hf_block(hidden=H, dtype=torch.float32):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = tiny_qwen3_moe_config(hidden_size=hidden)
    cfg._experts_implementation = "eager"
    block = Qwen3MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block.to(dtype)


def run(module, x, hf=False, params=None):
    """Output, router logits and every gradient of a fixed loss that uses both (of module's parameters, or of
    `params` for a module that is a plain function)."""
    x = x.detach().clone().requires_grad_()
    if hf:
        out, logits = module(x), module.gate(x.reshape(-1, x.shape[-1]))[0]
    else:
        out, logits = module(x)
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + logits.float().logsumexp(-1).sum()
    params = [p for p in (module.parameters() if params is None else params) if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *params])
    return out.detach(), logits.detach(), grads


def test_from_hf_fused_reference_eager_agree():
    block = hf_block()
    x = torch.randn(2, 7, H)
    fused, ref = moefuse.MoeBlock.from_hf(block), moefuse.MoeBlock.from_hf(block, mode="reference")
    assert fused.gate_up_proj is block.experts.gate_up_proj  # parameters are shared, not copied
    results = [run(fused, x), run(ref, x), run(block, x, hf=True)]
    # MoeBlock's parameters are (router, gate_up, down); HF's block lists experts first, then the router.
    hf_out, hf_logits, (hf_gx, hf_gu, hf_dn, hf_rw) = results[2]
    results[2] = (hf_out, hf_logits, (hf_gx, hf_rw, hf_gu, hf_dn))
    for other in results[1:]:
        for a, b in zip((results[0][0], results[0][1], *results[0][2]), (other[0], other[1], *other[2])):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fused_matches_float64_reference():
    block = hf_block()
    x = torch.randn(19, H)
    out, logits, grads = run(moefuse.MoeBlock.from_hf(block), x)
    block64 = copy.deepcopy(block).double()
    out64, logits64, grads64 = run(moefuse.MoeBlock.from_hf(block64, mode="reference"), x.double())
    torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.double(), logits64, rtol=1e-5, atol=1e-5)
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-4)


def test_bf16_close_to_reference():
    block = hf_block(dtype=torch.bfloat16)
    x = torch.randn(3, 5, H, dtype=torch.bfloat16)
    out, logits = moefuse.MoeBlock.from_hf(block)(x)
    ref_out, ref_logits = moefuse.MoeBlock.from_hf(block, mode="reference")(x)
    assert out.dtype == logits.dtype == torch.bfloat16 and out.shape == x.shape
    torch.testing.assert_close(logits, ref_logits, rtol=2e-2, atol=2e-2)
    assert (out.float() - ref_out.float()).norm() / ref_out.float().norm() < 2e-2


def test_eager_path_matches_the_op(monkeypatch):
    """MoeBlock's eager calls (no torch.library layers) give the block op's outputs and gradients to the bit."""
    m = moefuse.MoeBlock.from_hf(hf_block())
    x = torch.randn(2, 7, H, requires_grad=True)
    assert m(x)[1].grad_fn.name() == "moefuse_moe_blockBackward"
    eager = run(m, x)
    monkeypatch.setattr(moefuse.block, "run_moe_block", torch.ops.moefuse.moe_block)
    assert m(x)[1].grad_fn.name() != "moefuse_moe_blockBackward"
    via_op = run(m, x)
    for a, b in zip((eager[0], eager[1], *eager[2]), (via_op[0], via_op[1], *via_op[2])):
        assert torch.equal(a, b)


def test_frozen_experts():
    block = hf_block()
    block.experts.requires_grad_(False)
    m = moefuse.MoeBlock.from_hf(block)
    x = torch.randn(9, H, requires_grad=True)
    out, logits = m(x)
    out.square().sum().backward()
    assert x.grad is not None and m.router_weight.grad is not None
    assert m.gate_up_proj.grad is None and m.down_proj.grad is None


def test_from_hf_rejects_other_modules():
    with pytest.raises(ValueError, match="sparse block"):
        moefuse.MoeBlock.from_hf(torch.nn.Linear(3, 3))
    from peft import LoraConfig, inject_adapter_in_model

    wrapped = inject_adapter_in_model(LoraConfig(r=2, target_parameters=["experts.gate_up_proj"]), hf_block())
    with pytest.raises(ValueError, match="experts carry PEFT LoRA"):  # not silently without its adapters
        moefuse.MoeBlock.from_hf(wrapped)
    with pytest.raises(ValueError, match="mode"):
        moefuse.MoeBlock.from_hf(hf_block(), mode="fast")


def test_compile_fullgraph_dynamic_tokens_no_recompile():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    m = moefuse.MoeBlock.from_hf(hf_block())
    compiled = torch.compile(m, fullgraph=True, dynamic=True)
    for t in (11, 29):
        x = torch.randn(t, H, requires_grad=True)
        out, logits = compiled(x)
        (out.sum() + logits.square().sum()).backward()
        ref_x = x.detach().clone().requires_grad_()
        ref_out, ref_logits = m(ref_x)
        (ref_out.sum() + ref_logits.square().sum()).backward()
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, dict(torch._dynamo.utils.counters["stats"])


def test_hf_block_with_moefuse_experts_compiles_fullgraph():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    block = hf_block()
    block.experts.config._experts_implementation = "moefuse"
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    for t in (5, 9):
        x = torch.randn(1, t, H, requires_grad=True)
        compiled(x).sum().backward()
        ref_x = x.detach().clone().requires_grad_()
        block(ref_x).sum().backward()
        torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


# ---- stacked LoRA on the experts (add_lora) --------------------------------------------------------------------------


def lora_block(tokens_k=K, mode="fused", dtype=torch.float32, rank=3):
    """A MoeBlock of conftest's sizes with adapters of `rank` on both projections, every b non-zero (add_lora
    zero-initialises them), and its float64 twin in `mode` with the same values."""
    from conftest import block_tensors

    _, rw, gu, dn = block_tensors()
    make = lambda dt, m: moefuse.MoeBlock(*(torch.nn.Parameter(t.to(dt)) for t in (rw, gu, dn)), tokens_k, mode=m)
    block = make(dtype, "fused").add_lora(rank, alpha=5.0)
    with torch.no_grad():
        block.gate_up_lora_b.normal_(0, 0.3)
        block.down_lora_b.normal_(0, 0.3)
    twin = make(torch.float64, mode).add_lora(rank, alpha=5.0)
    twin.load_state_dict({k: v.double() for k, v in block.state_dict().items()})
    return block, twin


@pytest.mark.parametrize("tokens,k", [(19, K), (1, 1), (2, K)])  # one token, top_k = 1: most experts get no rows
def test_lora_fused_matches_float64_reference(tokens, k):
    block, ref = lora_block(k, "reference")
    x = torch.randn(tokens, H)
    got, want = run(block, x), run(ref, x.double())
    names = ["x"] + [n for n, p in block.named_parameters() if p.requires_grad]
    assert names == ["x", "router_weight", "gate_up_lora_a", "gate_up_lora_b", "down_lora_a", "down_lora_b"]
    for name, a, b in zip(["out", "logits", *names], (got[0], got[1], *got[2]), (want[0], want[1], *want[2])):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=name)


def test_lora_reference_gradients_by_finite_differences():
    _, ref = lora_block(mode="reference")
    x = torch.randn(5, H, dtype=torch.float64, requires_grad=True)
    leaves = (x, ref.gate_up_lora_a, ref.gate_up_lora_b, ref.down_lora_a, ref.down_lora_b)
    f = lambda x, *lora: ref(x)[0]  # noqa: E731  (the adapters are read from the block, which gradcheck perturbs)
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-5)


def test_lora_is_the_merged_weights_delta():
    """The block with adapters gives what the block without them gives on W + scale * b.a (the merge PEFT's
    merge_and_unload makes)."""
    block, _ = lora_block()
    x = torch.randn(11, H)
    s, gu, dn = block.lora_scale, block.lora_adapters()["gate_up"], block.lora_adapters()["down"]
    with torch.no_grad():
        merged = moefuse.MoeBlock(block.router_weight, block.gate_up_proj + s * gu.b @ gu.a,
                                  block.down_proj + s * dn.b @ dn.a, block.top_k)  # fmt: skip
        torch.testing.assert_close(block(x)[0], merged(x)[0], rtol=1e-4, atol=1e-5)


def test_add_lora_starts_at_the_base_output_and_trains_only_the_adapters():
    block = moefuse.MoeBlock.from_hf(hf_block())
    x = torch.randn(2, 7, H)
    with torch.no_grad():
        before = block(x)[0]
    assert block.add_lora(4, targets=("down",)) is block and block.lora_scale == 1.0
    assert set(block.lora_adapters()) == {"down"} and block.gate_up_lora_a is None
    assert block.down_lora_a.shape == (E, 4, block.down_proj.shape[2]) and block.down_lora_b.abs().sum() == 0
    assert not block.gate_up_proj.requires_grad and not block.down_proj.requires_grad
    block.router_weight.requires_grad_(False)
    out = block(x.requires_grad_())[0]
    torch.testing.assert_close(out, before)
    out.square().sum().backward()
    assert [n for n, p in block.named_parameters() if p.grad is not None] == ["down_lora_a", "down_lora_b"]
    assert "lora_rank={'down': 4}" in repr(block)


def test_add_lora_errors():
    block = moefuse.MoeBlock.from_hf(hf_block())
    for kw in (dict(rank=0), dict(rank=2, targets=("up",)), dict(rank=2, targets=())):
        with pytest.raises(ValueError, match="rank must be >= 1 and targets"):
            block.add_lora(**kw)
    block.add_lora(2)
    with pytest.raises(ValueError, match="already has adapters"):
        block.add_lora(2)
    with torch.no_grad():
        block.down_lora_b = torch.nn.Parameter(block.down_lora_b[:, :, :1].clone())  # rank 1 against a's 2
    with pytest.raises(ValueError, match="down_lora.b"):
        block(torch.randn(3, H))
    with pytest.raises(ValueError, match="gate_up's adapter needs both a and b"):
        moefuse.reference_moe(torch.randn(3, H), block.router_weight, block.gate_up_proj, block.down_proj, K, True,
                              block.gate_up_lora_a)  # fmt: skip


def test_lora_adapters_export_per_expert_and_back():
    from moefuse.convert import per_expert_lora_to_stacked, stacked_lora_to_per_expert

    block, _ = lora_block()
    state = stacked_lora_to_per_expert(**block.lora_adapters())
    assert state["experts.0.up_proj.lora_B.weight"].shape == (block.gate_up_proj.shape[1] // 2, 3)
    for back, there in zip(per_expert_lora_to_stacked(state, E), block.lora_adapters().values()):
        assert all(torch.equal(a, b) for a, b in zip(back, there))


def test_lora_block_compiles_fullgraph():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    block, _ = lora_block()
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    for t in (6, 17):
        x = torch.randn(t, H)
        got, want = run(compiled, x), run(block, x)
        for a, b in zip((got[0], *got[2]), (want[0], *want[2])):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_moeblock_lora_example_trains_exports_and_reloads(tmp_path):
    """examples/moeblock_lora.py: the loss goes down, and the adapters read back from their per-expert file give the
    trained block's outputs exactly (its exit code says both)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "moeblock_lora.py"
    r = subprocess.run([sys.executable, str(script), "--steps", "40", "--device", "cpu", "--out", str(tmp_path)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "adapter_per_expert.safetensors").exists()
    assert "differ from the trained block's by at most 0.00e+00" in r.stdout


def test_lora_bf16_close_to_float64_reference():
    block, ref = lora_block(dtype=torch.bfloat16, mode="reference")
    x = torch.randn(23, H)
    got, want = run(block, x.bfloat16()), run(ref, x.double())
    for a, b in zip((got[0], *got[2]), (want[0], *want[2])):
        assert a.dtype == torch.bfloat16 and (a.double() - b).norm() <= 2e-2 * b.norm()


def test_lora_gradient_checkpointing_recomputes_the_same_gradients():
    from torch.utils.checkpoint import checkpoint

    block, _ = lora_block()
    x = torch.randn(17, H)
    plain = run(block, x)
    ckpt = run(lambda t: checkpoint(block, t, use_reentrant=False), x, params=list(block.parameters()))
    for a, b in zip((plain[0], *plain[2]), (ckpt[0], *ckpt[2])):
        assert torch.equal(a, b)
