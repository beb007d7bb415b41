"""A LoRA fine-tuning step of a Qwen3-30B-A3B-shaped model cut to a few decoder layers, as users run it with
Transformers + PEFT, for each experts implementation side by side: tokens/s and peak memory.

    python3 bench/bench_model.py [--layers 2] [--batch 4 --seq 4096] [--impls moefuse,grouped_mm,eager]
                                 [--modes attn,attn_experts] [--compile no,layers] [--lora-rank 16] [--profile]

--compile lists how each model runs: `no` (eager), `model` (torch.compile of the whole model) or `layers` (each
decoder layer compiled: PyTorch's regional compilation); the first step compiles, timings start after it. Under
`layers` Transformers builds the causal mask outside the compiled code, where it can see that the batch has no
padding and skip it for SDPA's causal kernel; traced (`model`), it materialises the mask. Ratios are against
grouped_mm run the same way, and against eager grouped_mm when that ran too.
Modes: attn = LoRA (rank --lora-rank, 16) on q/k/v/o with frozen experts; attn_experts = also LoRA on the experts
through PEFT's target_parameters (mlp.experts.gate_up_proj, mlp.experts.down_proj).
Impls: Transformers' experts implementations (grouped_mm, eager, ...), moefuse, and moefuse_nf4: moefuse with the
expert weights in 4 bits (moefuse.quantize_experts before PEFT wraps the model: QLoRA on the experts).
"""
import argparse

import torch
from timing import elapsed_ms, profile, result_row, save

import moefuse  # registers the "moefuse" experts implementation with Transformers


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--impls", default="moefuse,grouped_mm,eager")
    p.add_argument("--modes", default="attn,attn_experts")
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--lora-rank", type=int, default=16, help="every adapter's rank (lora_alpha = 2 * rank)")
    p.add_argument("--json", default=None)
    p.add_argument("--compile", default="no", help="comma list of no | model | layers")
    p.add_argument("--profile", action="store_true",
                   help="print the step's top kernels (torch.profiler) and the GPU's idle gaps per run; "
                        "MOEFUSE_TRACE_DIR=dir also writes a Chrome trace per step")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny model on the CPU: checks the script, times nothing real")
    return p.parse_args()


SHAPE = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
             num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=32000)
SMOKE = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256)


def model(impl, mode, layers, seq, shape, device, rank):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    torch.manual_seed(0)
    c = Qwen3MoeConfig(**shape, norm_topk_prob=True, num_hidden_layers=layers, max_position_embeddings=seq,
                       attn_implementation="sdpa")
    nf4 = impl == "moefuse_nf4"
    c._experts_implementation = "moefuse" if nf4 else impl
    with torch.device(device):
        m = Qwen3MoeForCausalLM(c).to(torch.bfloat16 if device == "cuda" else torch.float32)
    if nf4:
        moefuse.quantize_experts(m)
    lora = dict(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    if mode == "attn_experts":
        lora["target_parameters"] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    m = get_peft_model(m, LoraConfig(**lora))
    if impl.startswith("moefuse") and mode == "attn_experts":
        moefuse.use_moefuse_lora(m)  # expert LoRA through moefuse's stacked path instead of PEFT's merged weights
    return m.train()


def step_fn(m, ids, compiled=None):
    fwd = torch.compile(m) if compiled == "model" else m
    if compiled == "layers":
        moefuse.compile_decoder_layers(m)

    def step():
        fwd(input_ids=ids, labels=ids).loss.backward()
    return step


def main():
    a = parse()
    device, shape = ("cpu", SMOKE) if a.smoke else ("cuda", SHAPE)
    if a.smoke:
        a.batch, a.seq, a.iters = 2, 32, 2
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)"
    print(f"# {name}, torch {torch.__version__}, {a.layers} layers, {a.batch}x{a.seq} tokens", flush=True)
    rows = []
    hows = a.compile.split(",")
    for how in hows:
        if how not in ("no", "model", "layers"):
            raise SystemExit(f"--compile: {how!r} is not one of no, model, layers")
    for how, mode, impl in ((h, m, i) for h in hows for m in a.modes.split(",") for i in a.impls.split(",")):
        r = dict(impl=impl, mode=mode, layers=a.layers, compiled=how, lora_rank=a.lora_rank)
        with result_row(rows, r, device == "cuda"):
            if how != "no":  # each model compiles from scratch: no recompile limit reached through another's frames
                torch._dynamo.reset()
            m = model(impl, mode, a.layers, a.seq, shape, device, a.lora_rank)
            ids = torch.randint(0, shape["vocab_size"], (a.batch, a.seq), device=device)
            step = step_fn(m, ids, how)
            step()
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            ts = sorted(elapsed_ms(step, device == "cuda") for _ in range(a.iters))
            r["step_ms"] = ts[len(ts) // 2]
            r["tokens_per_s"] = a.batch * a.seq / r["step_ms"] * 1e3
            r["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
            if a.profile:
                profile(step, device, f"{impl}, LoRA on {mode}, compile: {how}")
            del m, step
    save(rows, a.json)
    table(rows)


def table(rows):
    """Markdown rows, each against grouped_mm run the same way and against eager grouped_mm."""
    base = {(r["mode"], r["compiled"]): r for r in rows if r["impl"] == "grouped_mm" and "error" not in r}
    print("\n| LoRA on | experts impl | torch.compile | step ms | tokens/s | vs grouped_mm (same compile) | "
          "vs eager grouped_mm | peak GiB |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | {r['impl']} | {r['compiled']} | error: {r['error'][:100]} |")
            continue
        ratios = [base.get((r["mode"], how)) for how in (r["compiled"], "no")]
        same, eager = (f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x" if b else "" for b in ratios)
        # with expert LoRA, the other impls run PEFT's own path for it (its merged-weight parametrisation)
        peft = r["mode"] == "attn_experts" and not r["impl"].startswith("moefuse")
        impl = f"{r['impl']} + PEFT" if peft else r["impl"]
        print(f"| {r['mode']} | {impl} | {r['compiled']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{same} | {eager} | {r['peak_GiB']:.1f} |")


if __name__ == "__main__":
    main()
