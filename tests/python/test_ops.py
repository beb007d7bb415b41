"""torch.library checks of every moefuse custom op, and clear errors on bad inputs."""

import pytest
import torch
from torch.library import opcheck

import moefuse
from conftest import CUDA, E, H, I, K, T, block_tensors, eager_and_op_steps, routing

ops = torch.ops.moefuse


def _plan(ids):
    return ops.routing_plan(ids, E)


def test_routing_plan_opcheck():
    ids, _ = routing()
    ids[0, 0] = E + 1  # an expert-parallel placeholder
    opcheck(ops.routing_plan, (ids, E))


@pytest.mark.parametrize("gather,combine", [(True, False), (False, False), (False, True), (True, True)])
def test_moe_fused_linear_opcheck(gather, combine):
    ids, w = routing()
    plan = _plan(ids)
    x = torch.randn(T if gather else T * K, H, requires_grad=True)
    weight = torch.randn(E, 2 * I, H, requires_grad=True)
    cw = w.requires_grad_() if combine else None
    opcheck(ops.moe_fused_linear, (x, weight, plan, K, gather, cw))
    grad_out = torch.randn(T if combine else T * K, 2 * I)
    args = (grad_out, x.detach(), weight.detach(), plan, K, gather, None if cw is None else cw.detach())
    opcheck(ops.moe_fused_linear_backward, (*args, [True, True, combine]))
    opcheck(ops.moe_fused_linear_backward, (*args, [False, True, False]))


def test_moe_fused_linear_matches_torch():
    ids, w = routing()
    plan = _plan(ids)
    x = torch.randn(T, H, dtype=torch.float64)
    weight = torch.randn(E, 2 * I, H, dtype=torch.float64)
    expect = torch.stack([sum(w[t, j] * weight[ids[t, j]] @ x[t] for j in range(K)) for t in range(T)])
    out = ops.moe_fused_linear(x.float(), weight.float(), plan, K, True, w)
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32), pytest.param("cuda", torch.bfloat16, marks=CUDA)])
@pytest.mark.parametrize("gather,combine", [(True, True), (False, False)])
def test_exported_linear_is_the_eager_caller_of_the_op(gather, combine, device, dtype):
    """moefuse.moe_fused_linear runs the op's Python bodies under a plain autograd.Function: the op's outputs and
    gradients to the bit; under torch.compile it is the op."""
    ids, w = routing()
    ids, w = ids.to(device), w.to(device)
    plan = _plan(ids)
    x = torch.randn(T if gather else T * K, H, device=device, dtype=dtype)
    weight = torch.randn(E, 2 * I, H, device=device, dtype=dtype)
    leaves = [x, weight] + ([w] if combine else [])
    args = (x, weight, plan, K, gather, w if combine else None)
    results = eager_and_op_steps(moefuse.moe_fused_linear, ops.moe_fused_linear, args, leaves)
    for got, want in zip(*results):
        assert torch.equal(got, want)
    assert moefuse.moe_fused_linear.__name__ == "moe_fused_linear"
    assert "routing_plan" in moefuse.moe_fused_linear.__doc__
    compiled = torch.compile(lambda *a: moefuse.moe_fused_linear(*a), fullgraph=True, backend="eager")
    assert torch.equal(compiled(x.detach(), weight.detach(), plan, K, gather, w.detach() if combine else None),
                       results[0][0])


def test_experts_opcheck():
    x, _, gate_up, down = block_tensors(requires_grad=True)
    ids, w = routing()
    ids[1, 2] = E  # placeholder: contributes nothing
    w.requires_grad_()
    opcheck(ops.experts, (x, ids, w, gate_up, down))
    out, saved = ops.experts(x.detach(), ids, w.detach(), gate_up.detach(), down.detach())
    args = (torch.randn_like(out), x.detach(), w.detach(), gate_up.detach(), down.detach(), saved)
    opcheck(ops.experts_backward, (*args, [True] * 4 + [False] * 4))
    opcheck(ops.experts_backward, (*args, [True] + [False] * 7))


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32), pytest.param("cuda", torch.bfloat16, marks=CUDA)])
def test_saved_state_bytes_do_not_depend_on_dirty_memory(monkeypatch, device, dtype):
    """The ops zero only the parts of their saved state that they leave unwritten: over memory that held anything
    before, every byte of it must come out the same."""
    from moefuse import _ops

    x, router_weight, gate_up, down = (t.to(device) for t in block_tensors(dtype=dtype))
    ids, w = (t.to(device) for t in routing())
    ids[1, 2] = E  # a placeholder: its rows of h are zeroed, not computed
    clean = _ops._aligned_empty
    saved = []
    for poison in (0xA5, 0x5A):
        monkeypatch.setattr(_ops, "_aligned_empty", lambda n, dev, p=poison: clean(n, dev).fill_(p))
        block = ops.moe_block(x, router_weight, gate_up, down, K, True)
        saved.append((ops.experts(x, ids, w, gate_up, down)[1], block[2]))
    for a, b in zip(*saved):
        assert torch.equal(a, b)


@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_block_opcheck(renormalize):
    args = block_tensors(requires_grad=True)
    opcheck(ops.moe_block, (*args, K, renormalize))
    det = [a.detach() for a in args]
    out, logits, saved = ops.moe_block(*det, K, renormalize)
    # needs: x, router, gate_up, down, then the adapters' a and b (none here)
    for needs, grad_logits in (([True] * 4 + [False] * 4, torch.randn_like(logits)),
                               ([True, True] + [False] * 6, None)):  # fmt: skip
        opcheck(ops.moe_block_backward,
                (torch.randn_like(out), grad_logits, *det, logits, saved, K, renormalize, needs))  # fmt: skip


def test_moe_block_frozen_experts_skip_weight_grads():
    x, rw, gu, dn = block_tensors()
    x.requires_grad_(), rw.requires_grad_()
    out, logits, _ = ops.moe_block(x, rw, gu, dn, K, True)
    out.sum().backward()
    assert x.grad is not None and rw.grad is not None and gu.grad is None and dn.grad is None


def test_experts_matches_reference_float64_math():
    x, _, gu, dn = block_tensors()
    ids, w = routing()
    ids[0, 1] = E + 3  # placeholder
    out, _ = ops.experts(x, ids, w, gu, dn)
    xd, gud, dnd = x.double(), gu.double(), dn.double()
    expect = torch.zeros_like(xd)
    for t in range(T):
        for j in range(K):
            e = int(ids[t, j])
            if e < E:
                g, u = (gud[e] @ xd[t]).chunk(2)
                expect[t] += w[t, j].double() * dnd[e] @ (torch.nn.functional.silu(g) * u)
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-5)


# ---- bad inputs: clear Python exceptions, never a crash --------------------------------------------------------------


def test_bad_dtype():
    x, rw, gu, dn = block_tensors()
    with pytest.raises(moefuse.MoefuseError, match="x"):
        ops.moe_block(x.double(), rw.double(), gu.double(), dn.double(), K, True)
    with pytest.raises(ValueError, match="same dtype|dtype"):
        ops.moe_block(x, rw.half(), gu, dn, K, True)
    ids, w = routing()
    with pytest.raises(ValueError, match="int32"):
        ops.experts(x, ids.long(), w, gu, dn)
    with pytest.raises(ValueError, match="topk_weights"):
        ops.experts(x, ids, w.double(), gu, dn)


def test_inputs_of_the_wrong_rank_or_size():
    x, rw, gu, dn = block_tensors()
    ids, w = routing()
    plan = _plan(ids)
    bad = [(ops.experts, (x[0], ids, w, gu, dn), "x must be 2-D"),
           (ops.experts, (x, ids, w[0], gu, dn), "topk_weights must be 2-D"),
           (ops.moe_block, (x[0, 0], rw, gu, dn, K, True), "x must be 2-D"),
           (ops.moe_fused_linear, (x[0], gu, plan, K, True), "x must be 2-D"),
           (ops.moe_fused_linear, (x, gu, plan, K, True, w[0]), "combine_weights must be 2-D"),
           (ops.moe_fused_linear, (x[:, :0], gu[:, :, :0], plan, K, True), "at least one output and one input")]  # fmt: skip
    for call, args, message in bad:
        with pytest.raises(ValueError, match=message):
            call(*args)
    out, saved = ops.experts(x, ids, w, gu, dn)
    with pytest.raises(ValueError, match="needs must hold 8 flags"):
        ops.experts_backward(torch.randn_like(out), x, w, gu, dn, saved, [True])
    too_many = torch.zeros(1, K, dtype=torch.int32).expand(2**31 // K + 1, K)  # nothing allocated
    with pytest.raises(ValueError, match="2\\*\\*31 - 1"):
        ops.routing_plan(too_many, E)


def test_mismatched_shapes():
    x, rw, gu, dn = block_tensors()
    with pytest.raises(ValueError, match="down"):
        ops.moe_block(x, rw, gu, dn[:, :, :-1].contiguous(), K, True)
    with pytest.raises(ValueError, match="x"):
        ops.moe_block(x[:, :-1].contiguous(), rw, gu, dn, K, True)
    with pytest.raises(ValueError, match="top_k"):
        ops.moe_block(x, rw, gu, dn, E + 1, True)
    ids, w = routing()
    with pytest.raises(ValueError, match="topk_weights"):
        ops.experts(x, ids, w[:, :-1], gu, dn)
    with pytest.raises(ValueError):
        ops.experts(x[:-1], ids, w, gu, dn)


def test_exported_callers_report_bad_arguments_as_the_ops_do():
    """The eager callers hand what does not fit an op's schema to the op, which names the argument."""
    x, rw, gu, dn = block_tensors(requires_grad=True)
    ids, w = routing()
    bad = [(moefuse.experts, (x.tolist(), ids, w, gu, dn), "argument 'x'"),
           (moefuse.experts, (x, ids, w, gu, dn, None, None, "2"), "argument 'gate_up_scale'"),
           (moefuse.moe_block, (x, rw, gu, dn, float(K), True), "argument 'top_k'"),
           (moefuse.moe_fused_linear, (x, gu, _plan(ids), K, "yes"), "argument 'gather'"),
           (moefuse.experts, (x, ids, w, gu[0], dn), "gate_up must be"),
           (moefuse.moe_block, (x, rw, gu[0], dn, K, True), "gate_up must be")]  # fmt: skip
    for call, args, message in bad:
        with pytest.raises((RuntimeError, ValueError), match=message):
            call(*args)


def test_exported_callers_take_arguments_by_name():
    x, _, gu, dn = block_tensors()
    ids, w = routing()
    a, b = torch.randn(E, 4, I), torch.randn(E, H, 4)
    want = ops.experts(x, ids, w, gu, dn, down_a=a, down_b=b, down_scale=0.5)[0]
    got = moefuse.experts(x, ids, w, gu, dn, down_a=a, down_b=b, down_scale=0.5)[0]
    assert torch.equal(got, want) and not torch.equal(got, moefuse.experts(x, ids, w, gu, dn)[0])
    plan = _plan(ids)
    assert torch.equal(moefuse.moe_fused_linear(x, gu, plan, top_k=K, gather=True),
                       ops.moe_fused_linear(x, gu, plan, K, True))  # fmt: skip
    with pytest.raises(TypeError, match="gather"):
        moefuse.moe_fused_linear(x, gu, plan, K, gathered=True)


def test_a_plan_used_with_another_top_k_or_expert_count_is_refused():
    """A plan's size tells T*k and E apart, even where the padded segments would coincide (5 tokens: 15 and 20
    pairs; 6 and 5 experts)."""
    ids, w = routing(t=5)
    plan = _plan(ids)
    x, weight = torch.randn(5, H), torch.randn(E, 2 * I, H)
    moefuse.moe_fused_linear(x, weight, plan, K, True)
    with pytest.raises(ValueError, match="top_k 4"):
        moefuse.moe_fused_linear(x, weight, plan, K + 1, True)
    with pytest.raises(ValueError, match=f"{E - 1} experts"):
        moefuse.moe_fused_linear(x, weight[:-1], plan, K, True)


def test_linear_path_compiles_without_recompiling_for_new_token_counts():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    weight = torch.randn(E, 2 * I, H)

    def f(x, ids, w):
        return moefuse.moe_fused_linear(x, weight, moefuse.routing_plan(ids, E), K, True, w)

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for t in (11, 29):
        ids, w = routing(t=t)
        x = torch.randn(t, H)
        torch.testing.assert_close(compiled(x, ids, w), f(x, ids, w))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, dict(torch._dynamo.utils.counters["stats"])


def test_negative_expert_ids():
    x, _, gu, dn = block_tensors()
    ids, w = routing()
    ids[3, 0] = -1
    with pytest.raises(ValueError, match="negative"):
        ops.experts(x, ids, w, gu, dn)
    with pytest.raises(ValueError, match="negative"):
        ops.routing_plan(ids, E)


def test_a_plan_or_saved_state_moefuse_did_not_make_is_refused():
    """On the CPU the ops check the plan they index rows with: a garbage plan once hung moe_fused_linear, and a garbage
    saved state crashed the experts backward."""
    x, _, gu, dn = block_tensors()
    ids, w = routing()
    plan = _plan(ids)
    g = torch.Generator().manual_seed(0)
    garbage = torch.randint(-5, 100, plan.shape, dtype=torch.int32, generator=g)
    with pytest.raises(ValueError, match="routing_plan made"):
        ops.moe_fused_linear(x, gu, garbage, K, True)
    out, saved = ops.experts(x, ids, w, gu, dn)
    garbage = torch.randint(0, 256, saved.shape, dtype=torch.uint8, generator=g)
    with pytest.raises(ValueError, match="routing_plan made"):
        ops.experts_backward(torch.randn_like(out), x, w, gu, dn, garbage, [True] * 4 + [False] * 4)


def test_non_contiguous_inputs_are_accepted():
    x, rw, gu, dn = block_tensors()
    out = ops.moe_block(x.t().contiguous().t(), rw, gu, dn, K, True)[0]
    torch.testing.assert_close(out, ops.moe_block(x, rw, gu, dn, K, True)[0])


def test_an_empty_batch_runs_forward_and_backward():
    """No tokens: an empty output, and a backward from .sum(), whose gradient is an expanded empty tensor."""
    _, rw, gu, dn = block_tensors()
    x = torch.randn(0, H, requires_grad=True)
    ids, w = torch.zeros(0, K, dtype=torch.int32), torch.zeros(0, K, requires_grad=True)
    out = ops.experts(x, ids, w, gu.requires_grad_(), dn)[0]
    out.sum().backward()
    assert out.shape == (0, H) and x.grad.shape == (0, H) and w.grad.shape == (0, K)
    assert gu.grad.shape == gu.shape and not gu.grad.any()  # no rows: zero weight gradient
    block = ops.moe_block(x, rw, gu, dn, K, True)[0]
    block.sum().backward()
    assert block.shape == (0, H)
