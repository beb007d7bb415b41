"""The same ops on a GPU (skipped without one): DLPack on CUDA, the current stream, CUDA vs the CPU results."""

import copy

import pytest
import torch
from torch.library import opcheck

import moefuse
from conftest import CUDA, E, K, batch, block_tensors, routing, tiny_model
from test_block import hf_block
from test_lora import lora_args, moefuse_and_peft

pytestmark = CUDA
ops = torch.ops.moefuse


def test_opcheck_cuda():
    args = [t.cuda().detach().requires_grad_() for t in block_tensors()]
    opcheck(ops.moe_block, (*args, K, True))
    lora = [t.cuda().requires_grad_() if isinstance(t, torch.Tensor) else t for t in lora_args()]
    frozen = [t.detach() for t in args[2:]]  # an adapter freezes its base weight
    opcheck(ops.moe_block, (*args[:2], *frozen, K, True, *lora))
    ids, w = routing()
    ids, w = ids.cuda(), w.cuda().requires_grad_()
    opcheck(ops.experts, (args[0], ids, w, args[2], args[3]))
    opcheck(ops.routing_plan, (ids, E))
    plan = ops.routing_plan(ids, E)
    opcheck(ops.moe_fused_linear, (args[0], args[2], plan, K, True, w))


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_block_cuda_matches_cpu(dtype, tol, lora):
    block = moefuse.MoeBlock.from_hf(hf_block(dtype=dtype))
    if lora:  # stacked adapters on both projections, b non-zero; the expert weights frozen
        block.add_lora(3, alpha=5.0)
        with torch.no_grad():
            block.gate_up_lora_b.normal_(0, 0.3)
            block.down_lora_b.normal_(0, 0.3)
    x = torch.randn(4, 33, block.gate_up_proj.shape[2], dtype=dtype)
    results = []
    for dev in ("cpu", "cuda"):
        m = copy.deepcopy(block).to(dev)
        xd = x.detach().to(dev).clone().requires_grad_()
        out, logits = m(xd)
        (out.float().square().sum() + logits.float().logsumexp(-1).sum()).backward()
        grads = [p.grad for p in m.parameters() if p.requires_grad]
        assert len(grads) == (5 if lora else 3)
        results.append([t.float().cpu() for t in (out, logits, xd.grad, *grads)])
    for a, b in zip(*results):
        assert (a - b).norm() <= tol * b.norm() + 1e-6


def test_side_stream():
    args = [t.cuda() for t in block_tensors(t=257)]
    expect = ops.moe_block(*args, K, True)[0]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = ops.moe_block(*args, K, True)[0]
    torch.cuda.current_stream().wait_stream(s)
    torch.testing.assert_close(out, expect)


def test_lora_step_replays_from_a_cuda_graph():
    """MoeBlock's LoRA step at sizes the Hopper forms take, its adapters' rows u kept for the backward, captured in a
    CUDA graph: the replay gives the eager step's bits."""
    block = moefuse.MoeBlock.from_hf(hf_block(dtype=torch.bfloat16)).cuda()
    block.add_lora(16, alpha=32.0)
    with torch.no_grad():
        block.gate_up_lora_b.normal_(0, 0.3)
        block.down_lora_b.normal_(0, 0.3)
    x = torch.randn(300, block.router_weight.shape[1], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    params = [p for p in block.parameters() if p.requires_grad]
    gy, gl = torch.randn_like(x), torch.randn(300, E, device="cuda", dtype=torch.bfloat16)

    def step():
        for t in (x, *params):
            t.grad = None
        out, logits = block(x)
        torch.autograd.backward((out, logits), (gy, gl))
        return [out, logits, x.grad, *(p.grad for p in params)]

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up off the capturing stream, as torch.cuda.graph asks
        eager = [t.detach().clone() for t in step()]  # no reference to the warm-up's autograd graph
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    graph.replay()
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(static, eager)):
        assert torch.equal(a, b), i


def test_hf_moefuse_vs_eager_cuda():
    eager = tiny_model("eager").cuda()
    fused = copy.deepcopy(eager)
    fused.set_experts_implementation("moefuse")
    outs = []
    for model in (eager, fused):
        out = model(**{k: v.cuda() for k, v in batch().items()}, output_router_logits=True)
        out.loss.backward()
        outs.append((out.loss, out.aux_loss, [p.grad for p in model.parameters()]))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-4, atol=1e-5)
    for a, b in zip(outs[1][2], outs[0][2]):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-5)


def test_peft_expert_lora_cuda_matches_peft():
    outs = []
    for model in (m.cuda() for m in moefuse_and_peft()):
        out = model(**{k: v.cuda() for k, v in batch().items()})
        out.loss.backward()
        outs.append((out.logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-3, atol=1e-4)
    for name, grad in outs[1][1].items():
        torch.testing.assert_close(outs[0][1][name], grad, rtol=2e-3, atol=1e-5, msg=name)


def test_compile_cuda_dynamic():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    m = moefuse.MoeBlock.from_hf(hf_block().cuda())
    compiled = torch.compile(m, fullgraph=True, dynamic=True)
    for t in (100, 300):
        x = torch.randn(t, m.router_weight.shape[1], device="cuda")
        torch.testing.assert_close(compiled(x)[0], m(x)[0])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_rows_past_int32_elements():
    """Sorted-row buffers of more than 2**31 elements (T*k rows of H): the tokens at the end of such a batch get the
    same results, forward and backward, as when they run alone."""
    t, h, i, e, k, tail = 2**19 + 3, 2048, 768, 8, 2, 257  # T*k*H = 2**31 + 12288
    if torch.cuda.mem_get_info()[0] < 48 * 2**30:
        pytest.skip("needs 48 GiB of free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s, scale=1.0: (torch.randn(*s, device="cuda", generator=g) * scale).to(torch.bfloat16)
    x, gy = r(t, h).requires_grad_(), r(t, h)
    gate_up, down = r(e, 2 * i, h, scale=h**-0.5), r(e, h, i, scale=i**-0.5)
    ids = torch.rand(t, e, device="cuda", generator=g).argsort(-1)[:, :k].int()  # k distinct experts per token
    w = torch.rand(t, k, device="cuda", generator=g).requires_grad_()
    out = ops.experts(x, ids, w, gate_up, down)[0]
    out.backward(gy)
    x_tail, w_tail = x[-tail:].detach().clone().requires_grad_(), w[-tail:].detach().clone().requires_grad_()
    out_tail = ops.experts(x_tail, ids[-tail:], w_tail, gate_up, down)[0]
    out_tail.backward(gy[-tail:])
    torch.testing.assert_close(out[-tail:], out_tail, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(x.grad[-tail:], x_tail.grad, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(w.grad[-tail:], w_tail.grad, rtol=1e-2, atol=1e-2)
