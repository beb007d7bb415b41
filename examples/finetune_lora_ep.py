"""The main job's LoRA fine-tuning on several processes with expert parallelism: each rank holds E/N of the tiny
Qwen3-MoE's experts (Transformers' DistributedConfig over torch.distributed), moefuse runs them and their LoRA.
Launch with torchrun (gloo on the CPU, NCCL on GPUs):

    torchrun --nproc_per_node 2 examples/finetune_lora_ep.py [--steps 20] [--device cpu] [--out runs/finetune_lora_ep]

Expert parallelism splits the experts, not the data: every rank trains on the same batches. Rank 0 prints the loss
and throughput, saves the adapter in PEFT's format, then loads it onto a single-process model and compares that
model's logits with the expert-parallel one's.
"""
import argparse
import os

import torch
import torch.distributed as dist
from finetune_lora import batches, fit, tiny_config

import moefuse


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--out", default="runs/finetune_lora_ep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda: one GPU per rank")
    return p.parse_args()


def with_lora(model, a):
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])  # fmt: skip
    torch.manual_seed(a.seed + 1)  # the same adapters on every rank
    return moefuse.use_moefuse_lora(get_peft_model(model, cfg))


def main():
    a = parse()
    if "WORLD_SIZE" not in os.environ:
        raise SystemExit("launch with torchrun, e.g. torchrun --nproc_per_node 2 examples/finetune_lora_ep.py")
    from transformers import AutoModelForCausalLM, Qwen3MoeForCausalLM
    from transformers.distributed import DistributedConfig

    cuda = a.device == "cuda"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    base = os.path.join(a.out, "base")
    if rank == 0:  # the "pretrained" model every rank loads its share of
        torch.manual_seed(a.seed)
        Qwen3MoeForCausalLM(tiny_config()).to(dtype).save_pretrained(base)
    dist.barrier()

    ep = DistributedConfig(tp_size=world, tp_plan="auto", enable_expert_parallel=True)
    model = with_lora(AutoModelForCausalLM.from_pretrained(base, experts_implementation="moefuse", dtype=dtype,
                                                           distributed_config=ep), a)  # fmt: skip
    losses, tokens_per_s = fit(model, a, device, f"moefuse, {world} ranks", quiet=rank != 0)

    model.eval()
    probe = next(batches(device, 2, a.seq, 1, a.seed + 1))
    with torch.no_grad():
        logits = model(input_ids=probe).logits.float()  # a collective forward: every rank runs it
    adapter = os.path.join(a.out, "adapter")
    model.save_pretrained(adapter, is_main_process=rank == 0)  # collective too (the base's sharded state)
    dist.barrier()
    try:
        if rank == 0:
            from peft import PeftModel
            single = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
                base, experts_implementation="moefuse", dtype=dtype).to(device), adapter).eval()  # fmt: skip
            moefuse.use_moefuse_lora(single)
            with torch.no_grad():
                # per token: in bf16 a few tokens differ by far more than the rest (rounding, or a routing flip)
                diff = (single(input_ids=probe).logits.float() - logits).abs().amax(-1).flatten()
            print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {a.steps} steps, {tokens_per_s:,.0f} tokens/s on "
                  f"{world} ranks; adapter saved to {adapter}; one process with it: logits differ by at most "
                  f"{diff.max().item():.2e}, {diff.median().item():.2e} for the median token (largest logit "
                  f"{logits.abs().max().item():.2f}, {dtype})")  # fmt: skip
            assert losses[-1] < losses[0], "the loss did not go down"
    finally:
        dist.barrier()  # rank 0's check done, or failed, before any rank tears its connections down
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
