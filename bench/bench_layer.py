"""One Qwen3-MoE layer, side by side in one run: moefuse, Hugging Face's Qwen3MoeSparseMoeBlock (grouped_mm, eager)
and a dense cuBLAS GEMM pair doing the same FLOPs (the ceiling a grouped kernel aims at).

FLOPs: 6*T*k*H*I forward; x3 for forward+backward with every gradient; x2 with frozen experts (dX only, the LoRA
fine-tuning case). "extra GiB" is the peak memory of a forward+backward beyond what was allocated before it
(inputs, weights, gradients of the previous step).

    python3 bench/bench_layer.py [--shape 30b|235b] [--tokens 4096,16384] [--impls ...] [--dtype bf16]
"""
import argparse
import json
import sys

import torch

IMPLS = ("dense", "moefuse", "moefuse_experts", "hf_grouped_mm", "hf_eager")
SHAPES = {"30b": dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8),
          "235b": dict(hidden_size=4096, moe_intermediate_size=1536, num_experts=128, num_experts_per_tok=8),
          "cpu": dict(hidden_size=1024, moe_intermediate_size=512, num_experts=32, num_experts_per_tok=4)}


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="30b", choices=SHAPES)
    p.add_argument("--tokens", default="4096,16384")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--modes", default="trained,frozen")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "f16", "f32"))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="write all results to this file")
    return p.parse_args()


class Timer:
    """Median milliseconds: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device, iters):
        self.cuda, self.iters = device == "cuda", iters

    def __call__(self, fn):
        import time
        for _ in range(2):
            fn()
        self.sync()
        ts = []
        for _ in range(self.iters):
            if self.cuda:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record(); fn(); e.record(); e.synchronize()
                ts.append(s.elapsed_time(e))
            else:
                t0 = time.perf_counter(); fn(); ts.append((time.perf_counter() - t0) * 1e3)
        return sorted(ts)[len(ts) // 2]

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def hf_block(shape, impl, dtype, device, state=None):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    cfg = Qwen3MoeConfig(**shape, norm_topk_prob=True, hidden_act="silu", num_hidden_layers=1, vocab_size=128)
    cfg._experts_implementation = impl
    m = Qwen3MoeSparseMoeBlock(cfg).to(device, dtype)
    if state is None:
        with torch.no_grad():
            for prm in m.parameters():
                prm.normal_(0, 0.02)
    else:
        m.load_state_dict(state)
    return m


def make(impl, shape, dtype, device, ref):
    """A callable x -> output tensor, and the modules whose parameters it trains."""
    if impl.startswith("hf_") or impl == "moefuse_experts":
        if impl == "moefuse_experts":  # HF's router + moefuse's experts, through the Transformers experts interface
            import moefuse  # noqa: F401  (registers the "moefuse" experts implementation)
        m = hf_block(shape, "moefuse" if impl == "moefuse_experts" else impl[3:], dtype, device, ref.state_dict())
        return (lambda x: m(x[None])[0]), m  # HF's block takes [batch, seq, hidden]
    if impl == "moefuse":  # the whole block in moefuse
        import moefuse
        m = moefuse.MoeBlock.from_hf(ref).to(device)
        return (lambda x: m(x)[0]), m
    raise ValueError(impl)


def run_dense(T, shape, dtype, device, frozen, timer):
    H, I, k = shape["hidden_size"], shape["moe_intermediate_size"], shape["num_experts_per_tok"]
    r = lambda *s: torch.randn(*s, device=device, dtype=dtype)
    A, W1, B, W2 = r(T * k, H), r(H, 2 * I), r(T * k, I), r(I, H)
    G1, G2 = r(T * k, 2 * I), r(T * k, H)
    fwd = timer(lambda: (A @ W1, B @ W2))
    bwd = (lambda: (G1 @ W1.t(), G2 @ W2.t())) if frozen else (lambda: (G1 @ W1.t(), A.t() @ G1, G2 @ W2.t(), B.t() @ G2))
    return dict(fwd_ms=fwd, fwdbwd_ms=fwd + timer(bwd))


def run_impl(impl, T, shape, dtype, device, frozen, timer, ref, x0, y_ref):
    fn, module = make(impl, shape, dtype, device, ref)
    for p in module.parameters():
        p.requires_grad_(not frozen)
    r = {}
    with torch.no_grad():
        y = fn(x0).float()
        r["rel_err"] = ((y - y_ref).norm() / y_ref.norm()).item()
        r["fwd_ms"] = timer(lambda: fn(x0))
    x = x0.clone().requires_grad_(True)
    gy = torch.randn_like(x0)
    step = lambda: fn(x).backward(gy)
    step()
    timer.sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        timer.sync()
        r["extra_GiB"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    r["fwdbwd_ms"] = timer(step)
    return r


def main():
    a = parse()
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[a.dtype]
    shape = SHAPES[a.shape]
    H, I, k = shape["hidden_size"], shape["moe_intermediate_size"], shape["num_experts_per_tok"]
    dev = a.device
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"# {name}, torch {torch.__version__}, {a.dtype}, shape {a.shape} {shape}", flush=True)
    timer = Timer(dev, a.iters)
    ref = hf_block(shape, "eager", dtype, dev)
    rows = []
    for T in (int(t) for t in a.tokens.split(",")):
        x0 = torch.randn(T, H, device=dev, dtype=dtype)
        with torch.no_grad():
            y_ref = ref(x0[None]).reshape(T, H).float()  # HF eager: the reference every impl is compared with
        for mode in a.modes.split(","):
            frozen = mode == "frozen"
            flops = 6.0 * T * k * H * I
            for impl in a.impls.split(","):
                row = dict(shape=a.shape, T=T, mode=mode, impl=impl)
                try:
                    if impl == "dense":
                        row.update(run_dense(T, shape, dtype, dev, frozen, timer))
                    else:
                        row.update(run_impl(impl, T, shape, dtype, dev, frozen, timer, ref, x0, y_ref))
                    row["fwd_TFLOPs"] = flops / row["fwd_ms"] * 1e-9
                    row["fwdbwd_TFLOPs"] = (2 if frozen else 3) * flops / row["fwdbwd_ms"] * 1e-9
                except Exception as e:  # one failing impl must not hide the others' numbers
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                if dev == "cuda":
                    torch.cuda.empty_cache()
                print(json.dumps(row), flush=True)
                rows.append(row)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    print_table(rows)


def print_table(rows):
    dense = {(r["T"], r["mode"]): r for r in rows if r["impl"] == "dense" and "error" not in r}
    print("\n| shape | T | weights | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | vs dense | extra GiB | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['T']} | {r['mode']} | {r['impl']} | error: {r['error'][:80]} |")
            continue
        d = dense.get((r["T"], r["mode"]))
        vs = f"{d['fwdbwd_ms'] / r['fwdbwd_ms']:.2f}" if d else ""
        print(f"| {r['shape']} | {r['T']} | {r['mode']} | {r['impl']} | {r['fwd_ms']:.2f} | {r['fwd_TFLOPs']:.0f} | "
              f"{r['fwdbwd_ms']:.2f} | {r['fwdbwd_TFLOPs']:.0f} | {vs} | {r.get('extra_GiB', float('nan')):.2f} | "
              f"{r.get('rel_err', float('nan')):.1e} |")


if __name__ == "__main__":
    sys.exit(main())
