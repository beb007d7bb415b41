import pytest
import torch

import moefuse  # noqa: F401  (registers the ops and the "moefuse" experts backend)

# Small but not toy-regular: E and k are not powers of two.
T, H, I, E, K = 13, 32, 24, 6, 3
# Marks a test (or a parameter) that runs the CUDA backend.
CUDA = pytest.mark.skipif(not (torch.cuda.is_available() and moefuse.has_cuda()), reason="needs a GPU and CUDA")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def block_tensors(t=T, dtype=torch.float32, requires_grad=False):
    """x, router_weight, gate_up, down of the sizes above."""
    ts = (torch.randn(t, H), torch.randn(E, H) * 0.5, torch.randn(E, 2 * I, H) * H**-0.5,
          torch.randn(E, H, I) * I**-0.5)  # fmt: skip
    return [x.to(dtype).requires_grad_(requires_grad) for x in ts]


def routing(t=T, k=K, e=E):
    """int32 ids [t, k] (distinct per token) and float32 weights."""
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)]).to(torch.int32)
    return ids, torch.rand(t, k)


def eager_and_op_steps(eager, op, args, leaves):
    """[output, leaf grads...] of one step through a moefuse eager caller and through its op, the output (the first
    one of a tuple) backpropagated from the same ramp. The eager step must run its own autograd.Function (named
    moefuse_<op>Backward), the op's not."""
    steps = []
    for call in (eager, op):
        for t in leaves:
            t.requires_grad_().grad = None
        out = call(*args)
        out = out[0] if isinstance(out, tuple) else out
        assert (out.grad_fn.name() == f"moefuse_{eager.__name__}Backward") == (call is eager)
        out.backward(torch.linspace(-1, 1, out.numel(), device=out.device, dtype=out.dtype).view_as(out))
        steps.append([out.detach()] + [t.grad for t in leaves])
    return steps


def tiny_qwen3_moe_config(**kw):
    from transformers import Qwen3MoeConfig

    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=E, num_experts_per_tok=K,
               norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=64,
               router_aux_loss_coef=0.01, hidden_act="silu")  # fmt: skip
    cfg.update(kw)
    return Qwen3MoeConfig(**cfg)


def tiny_model(impl="eager"):
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(tiny_qwen3_moe_config())
    with torch.no_grad():  # HF initialises the router to zeros: give it something to route with
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    model.set_experts_implementation(impl)
    return model


def batch(seed=0, b=2, s=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (b, s), generator=g)
    return dict(input_ids=ids, labels=ids)
