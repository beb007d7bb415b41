"""LoRA on one MoE block without PEFT: MoeBlock's own stacked adapters, trained, exported per expert and loaded back.

A tiny Qwen3-MoE block is the base. A teacher is the same block with a low-rank change to every expert; the student
is the base as a MoeBlock with adapters on both expert projections (add_lora: the expert weights frozen), trained to
give the teacher's outputs. The trained adapters are then written per expert (experts.{i}.gate_proj / up_proj /
down_proj .lora_A / .lora_B, the form other tools read) as safetensors, read back into a fresh block, and that
block's outputs are checked against the trained one's.

    python3 examples/moeblock_lora.py [--steps 200] [--rank 8] [--out runs/moeblock_lora]
"""
import argparse
import copy
import os

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

import moefuse
from moefuse.convert import per_expert_lora_to_stacked, stacked_lora_to_per_expert


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--tokens", type=int, default=256, help="tokens per batch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="runs/moeblock_lora")
    return p.parse_args()


def base_block(device):
    """A random Qwen3-MoE sparse block: 6 experts, 3 per token, in float32."""
    cfg = Qwen3MoeConfig(hidden_size=64, moe_intermediate_size=48, num_experts=6, num_experts_per_tok=3,
                         norm_topk_prob=True, hidden_act="silu", vocab_size=128)  # fmt: skip
    cfg._experts_implementation = "eager"  # the teacher runs as Transformers runs it
    block = Qwen3MoeSparseMoeBlock(cfg).to(device)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    return block


def teacher_of(base, rank):
    """The base block with W[e] + B[e] . A[e] on both expert projections (the change the student learns)."""
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        for w in (teacher.experts.gate_up_proj, teacher.experts.down_proj):
            e, out, n_in = w.shape
            w += torch.randn(e, out, rank, device=w.device) @ torch.randn(e, rank, n_in, device=w.device) * 0.02
    return teacher


def student_of(base, rank):
    """The base as a MoeBlock with adapters of `rank` (alpha = 2 * rank) on both projections; only they train."""
    student = moefuse.MoeBlock.from_hf(copy.deepcopy(base)).add_lora(rank, alpha=2 * rank)
    student.router_weight.requires_grad_(False)
    return student


def main():
    a = parse()
    torch.manual_seed(0)
    base = base_block(a.device)
    teacher, student = teacher_of(base, 4), student_of(base, a.rank)
    hidden = base.experts.gate_up_proj.shape[2]
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    print(f"moefuse {moefuse.__version__} ({'CUDA' if moefuse.has_cuda() and a.device == 'cuda' else 'CPU'} backend); "
          f"{student}; training {sum(p.numel() for p in params):,} adapter parameters")  # fmt: skip

    losses = []
    bar = tqdm(range(a.steps), desc="MoeBlock LoRA")
    for _ in bar:
        x = torch.randn(a.tokens, hidden, device=a.device)
        with torch.no_grad():
            target = teacher(x[None])[0]
        loss = torch.nn.functional.mse_loss(student(x)[0], target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3e}", refresh=False)
    print(f"loss against the teacher: {losses[0]:.3e} at the first step, {losses[-1]:.3e} at the last")

    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "adapter_per_expert.safetensors")
    adapters = {t: type(lora)(*(p.detach() for p in lora)) for t, lora in student.lora_adapters().items()}
    save_file({k: v.contiguous().cpu() for k, v in stacked_lora_to_per_expert(**adapters).items()}, path,
              metadata={"scale": str(student.lora_scale)})  # fmt: skip
    print(f"adapters written per expert to {path}")

    gate_up, down = per_expert_lora_to_stacked(load_file(path, device=a.device), base.experts.gate_up_proj.shape[0])
    fresh = student_of(base, a.rank)
    with torch.no_grad():
        for target, lora in (("gate_up", gate_up), ("down", down)):
            getattr(fresh, f"{target}_lora_a").copy_(lora.a)
            getattr(fresh, f"{target}_lora_b").copy_(lora.b)
        x = torch.randn(a.tokens, hidden, device=a.device)
        diff = (fresh(x)[0] - student(x)[0]).abs().max().item()
    print(f"a fresh block with the adapters read back: outputs differ from the trained block's by at most {diff:.2e}")
    return 0 if diff == 0 and losses[-1] < losses[0] else 1


if __name__ == "__main__":
    raise SystemExit(main())
