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


def run(module, x, hf=False):
    """Output, router logits and every gradient of a fixed loss that uses both."""
    x = x.detach().clone().requires_grad_()
    if hf:
        out, logits = module(x), module.gate(x.reshape(-1, x.shape[-1]))[0]
    else:
        out, logits = module(x)
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + logits.float().logsumexp(-1).sum()
    params = [p for p in module.parameters() if p.requires_grad]
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
