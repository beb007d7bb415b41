"""The main job: LoRA fine-tuning of a tiny Qwen3-MoE on the built-in corpus, with moefuse's experts and with
Hugging Face's eager experts, side by side: same initial weights, same batches, same optimizer.

It prints the loss of both runs, their throughput, saves moefuse's adapter in PEFT's format (safetensors),
reloads it onto a fresh base model, and checks that the reloaded model gives the same outputs.

    python3 examples/finetune_lora.py [--steps 40] [--impls moefuse,eager] [--out runs/finetune_lora] [--compile]
                                      [--nf4]

--compile compiles each decoder layer (torch.compile per layer, as docs recommend for training: the causal mask
stays eager, so SDPA keeps its causal kernel); the first steps then include compilation.
--nf4 keeps every run's expert weights in 4 bits (moefuse.quantize_experts before the adapters: QLoRA). The eager
experts then run on each weight's dequantized copy, made anew at every use: the same model, as slow as that is.
"""
import argparse
import json
import os
import time

import torch
from tqdm import tqdm

import moefuse  # registers the "moefuse" experts implementation with Transformers

HERE = os.path.dirname(os.path.abspath(__file__))
BYTE_VOCAB = 256  # the model reads UTF-8 bytes: no tokenizer download needed


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--impls", default="moefuse,eager", help="experts implementations to train with, first is saved")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="runs/finetune_lora")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    p.add_argument("--nf4", action="store_true", help="the expert weights in 4 bits (QLoRA)")
    return p.parse_args()


def tiny_config():
    from transformers import Qwen3MoeConfig
    # Many small experts, as in real MoE models (HF eager loops over them); E and k not powers of two.
    return Qwen3MoeConfig(vocab_size=BYTE_VOCAB, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                          num_experts=30, num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=512,
                          output_router_logits=True, router_aux_loss_coef=0.01, tie_word_embeddings=False)


def base_model(impl, a, dtype):
    from transformers import Qwen3MoeForCausalLM
    torch.manual_seed(a.seed)  # the same "pretrained" base for every run
    m = Qwen3MoeForCausalLM(tiny_config())
    m.set_experts_implementation(impl)
    m = m.to(a.device, dtype)
    return moefuse.quantize_experts(m) if a.nf4 else m


def lora(model, impl, a):
    """LoRA on attention, and on the experts too when moefuse is under test (every run gets the same config);
    moefuse's run applies the expert adapters through its stacked path (use_moefuse_lora)."""
    from peft import LoraConfig, get_peft_model
    experts = "moefuse" in a.impls.split(",")
    cfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if experts else None)
    model = get_peft_model(model, cfg)
    return moefuse.use_moefuse_lora(model) if experts and impl == "moefuse" else model


def batches(device, batch, seq, steps, seed):
    data = torch.tensor(list(open(os.path.join(HERE, "data", "corpus.txt"), "rb").read()), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        yield torch.stack([data[s:s + seq] for s in start.tolist()]).to(device)


def fit(model, a, device, desc, quiet=False):
    """AdamW on the trainable parameters over the corpus batches, with a progress bar: (losses, tokens/s)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr)
    losses, tokens, busy = [], 0, 0.0
    bar = tqdm(batches(device, a.batch, a.seq, a.steps, a.seed), total=a.steps, desc=desc, unit="step", disable=quiet)
    for ids in bar:
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        busy += time.perf_counter() - t0
        tokens += ids.numel()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / busy:,.0f}")
    return losses, tokens / busy


def train(impl, a, dtype):
    model = lora(base_model(impl, a, dtype), impl, a)
    if a.compile:
        moefuse.compile_decoder_layers(model)
    return (model, *fit(model, a, a.device, f"{impl:>8}"))


def check_reload(model, impl, a, dtype, path):
    """Saves the adapter (PEFT format), loads it onto a fresh base, and compares outputs."""
    from peft import PeftModel
    model.save_pretrained(path)
    fresh = PeftModel.from_pretrained(base_model(impl, a, dtype), path).eval()
    if impl == "moefuse":
        moefuse.use_moefuse_lora(fresh)
    model.eval()
    probe = next(batches(a.device, 2, a.seq, 1, a.seed + 1))
    with torch.no_grad():
        diff = (model(input_ids=probe).logits - fresh(input_ids=probe).logits).abs().max().item()
    return diff


def plot(runs, path, nf4):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (impl, r), style in zip(runs.items(), ("-", "--", ":")):  # the curves coincide: keep each visible
        ax.plot(r["losses"], style, linewidth=2.5 if style == "-" else 1.5,
                label=f"{impl} ({r['tokens_per_s']:,.0f} tok/s)")
    ax.set(xlabel="step", ylabel="loss", title=f"{'QLoRA' if nf4 else 'LoRA'} fine-tuning, tiny Qwen3-MoE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main():
    a = parse()
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    os.makedirs(a.out, exist_ok=True)
    backend = "CUDA" if a.device == "cuda" else "CPU"
    print(f"moefuse {moefuse.__version__} ({backend} backend), torch {torch.__version__}, {a.steps} steps of "
          f"{a.batch}x{a.seq} tokens{', experts in 4 bits' if a.nf4 else ''}", flush=True)
    impls = a.impls.split(",")
    runs, saved = {}, None
    for impl in impls:
        model, losses, tps = train(impl, a, dtype)
        runs[impl] = dict(losses=losses, tokens_per_s=tps)
        if saved is None:
            saved = impl
            runs[impl]["reload_max_abs_diff"] = check_reload(model, impl, a, dtype, os.path.join(a.out, "adapter"))
        del model

    first = runs[impls[0]]
    print(f"\n{'experts':>8} | {'first loss':>10} | {'last loss':>9} | {'tokens/s':>10} | speed vs {impls[-1]}")
    for impl, r in runs.items():
        speed = r["tokens_per_s"] / runs[impls[-1]]["tokens_per_s"]
        print(f"{impl:>8} | {r['losses'][0]:10.4f} | {r['losses'][-1]:9.4f} | {r['tokens_per_s']:10,.0f} | "
              f"{speed:.2f}x")
    if len(runs) > 1:
        gap = max(abs(x - y) for x, y in zip(first["losses"], runs[impls[-1]]["losses"]))
        print(f"largest step-by-step loss difference between {impls[0]} and {impls[-1]}: {gap:.2e}")
    print(f"adapter saved to {os.path.join(a.out, 'adapter')}; reloaded model's logits differ by at most "
          f"{runs[saved]['reload_max_abs_diff']:.2e}")
    png = plot(runs, os.path.join(a.out, "loss.png"), a.nf4)
    if png:
        print(f"loss curves: {png}")
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(runs, f, indent=1)
    assert first["losses"][-1] < first["losses"][0], "the loss did not go down"


if __name__ == "__main__":
    main()
