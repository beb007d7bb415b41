"""One Qwen3-MoE layer, side by side in one run: moefuse, Hugging Face's Qwen3MoeSparseMoeBlock (grouped_mm, eager)
and a dense cuBLAS GEMM pair doing the same FLOPs (the ceiling a grouped kernel aims at).

Modes: trained (every weight gets a gradient), frozen (experts and router frozen: dX only), lora (experts and router
frozen, LoRA of rank --lora-rank (16), alpha twice that, on both expert projections: for moefuse_experts and
hf_grouped_mm PEFT's through target_parameters, which moefuse_experts runs through moefuse.use_moefuse_lora and
hf_grouped_mm through PEFT's own merged-weight path; for moefuse the block's own stacked adapters (MoeBlock.add_lora);
other impls skip this mode).

FLOPs: 6*T*k*H*I forward; x3 for forward+backward with every gradient; x2 with frozen experts or LoRA (the LoRA
FLOPs are not counted). "extra GiB" is the peak memory of a forward+backward beyond what was allocated before it
(inputs, weights, gradients of the previous step). "vs frozen" is a LoRA row's forward+backward time over the same
impl's frozen forward+backward (forward+dX) time. Each step is timed alone (synchronised), so its time includes
the GPU waiting for the host at its start; "GPU ms" (CUDA) leaves that out (Timer.gpu_only), and "vs frozen (GPU)"
compares those. An impl's modes are built together and timed in turn, --rounds times (medians reported).

    python3 bench/bench_layer.py [--shape 30b|235b] [--tokens 4096,16384] [--impls ...] [--modes trained,frozen,lora]
                                 [--rounds 5] [--lora-rank 16]
"""
import argparse
import statistics
import sys

import torch
from timing import elapsed_ms, failed, profile, result_row, save

IMPLS = ("dense", "moefuse", "moefuse_experts", "hf_grouped_mm", "hf_eager")
LORA_IMPLS = ("moefuse", "moefuse_experts", "hf_grouped_mm")
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
    p.add_argument("--rounds", type=int, default=1,
                   help="time each impl's modes this many times in turn and report the medians (the ratios between "
                        "modes then do not move with the host's speed over the run)")
    p.add_argument("--lora-rank", type=int, default=16, help="rank of the LoRA mode's adapters")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="write all results to this file")
    p.add_argument("--profile", action="store_true",
                   help="print each forward+backward's top kernels (torch.profiler) and the GPU's idle gaps; "
                        "MOEFUSE_TRACE_DIR=dir also writes a Chrome trace per step")
    return p.parse_args()


class Timer:
    """Median milliseconds: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device, iters):
        self.cuda, self.iters = device == "cuda", iters

    def __call__(self, fn):
        for _ in range(2):
            fn()
        self.sync()
        return sorted(elapsed_ms(fn, self.cuda) for _ in range(self.iters))[self.iters // 2]

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def gpu_only(self, fn):
        """The GPU's own time for fn (CUDA only): a spinning kernel of about 4 ms goes first, so the host has issued
        fn's kernels before the GPU reaches them; its time, measured alone, is subtracted. What this leaves out of
        __call__'s time is the GPU waiting for the host."""
        cycles = int(4e-3 * torch.cuda.get_device_properties(torch.cuda.current_device()).clock_rate * 1e3)
        spin = lambda: torch.cuda._sleep(cycles)
        return self(lambda: (spin(), fn())) - self(spin)


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


def add_lora(m, impl, rank):
    """PEFT LoRA on both expert projections of an HF block, as users add it; only the adapters train."""
    from peft import LoraConfig, inject_adapter_in_model
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank,
                     target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    m = inject_adapter_in_model(cfg, m)
    if impl == "moefuse_experts":
        import moefuse
        moefuse.use_moefuse_lora(m)
    return m


def make(impl, shape, dtype, device, ref, lora_rank=0):
    """A callable x -> output tensor, and the modules whose parameters it trains (with PEFT LoRA of lora_rank on the
    experts, where that is not 0): parameters of their own, with ref's values."""
    if impl.startswith("hf_") or impl == "moefuse_experts":
        if impl == "moefuse_experts":  # HF's router + moefuse's experts, through the Transformers experts interface
            import moefuse  # noqa: F401  (registers the "moefuse" experts implementation)
        m = hf_block(shape, "moefuse" if impl == "moefuse_experts" else impl[3:], dtype, device, ref.state_dict())
        if lora_rank:
            m = add_lora(m, impl, lora_rank)
        # HF's block takes [batch, seq, hidden]; squeeze, not [0], whose backward would zero-fill and copy a [1, T, H]
        # gradient (0.07 ms at T=16384) that the anchors' harness does not pay
        return (lambda x: m(x[None]).squeeze(0)), m
    if impl == "moefuse":  # the whole block in moefuse, on a copy: from_hf shares the block's parameters, and an
        import moefuse     # impl's modes, built together, each set their own requires_grad
        m = moefuse.MoeBlock.from_hf(hf_block(shape, "eager", dtype, device, ref.state_dict()))
        if lora_rank:
            m.add_lora(lora_rank, alpha=2 * lora_rank)
        return (lambda x: m(x)[0]), m
    raise ValueError(impl)


def run_dense(T, shape, dtype, device, frozen, timer):
    H, I, k = shape["hidden_size"], shape["moe_intermediate_size"], shape["num_experts_per_tok"]
    r = lambda *s: torch.randn(*s, device=device, dtype=dtype)
    A, W1, B, W2 = r(T * k, H), r(H, 2 * I), r(T * k, I), r(I, H)
    G1, G2 = r(T * k, 2 * I), r(T * k, H)
    fwd = timer(lambda: (A @ W1, B @ W2))
    if frozen:
        bwd = lambda: (G1 @ W1.t(), G2 @ W2.t())
    else:
        bwd = lambda: (G1 @ W1.t(), A.t() @ G1, G2 @ W2.t(), B.t() @ G2)
    return dict(fwd_ms=fwd, fwdbwd_ms=fwd + timer(bwd))


def prepare(impl, T, shape, dtype, device, mode, ref, x0, y_ref, lora_rank, prof=False):
    """One impl in one mode, ready to time: (its one-off figures: error against HF eager and the step's extra peak
    memory, a timing function timer -> {fwd_ms, fwdbwd_ms[, fwdbwd_gpu_ms]})."""
    if impl == "dense":
        frozen = mode != "trained"
        return {}, lambda timer: run_dense(T, shape, dtype, device, frozen, timer)
    fn, module = make(impl, shape, dtype, device, ref, lora_rank if mode == "lora" else 0)
    for name, p in module.named_parameters():
        p.requires_grad_(mode == "trained" or (mode == "lora" and "lora_" in name))
    r = {}
    with torch.no_grad():
        y = fn(x0).float()
        r["rel_err"] = ((y - y_ref).norm() / y_ref.norm()).item()
    x = x0.clone().requires_grad_(True)
    gy = torch.randn_like(x0)
    step = lambda: fn(x).backward(gy)
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        r["extra_GiB"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    if prof:
        profile(step, device, f"{impl}, {mode}, T={T}")

    def times(timer):
        with torch.no_grad():
            t = {"fwd_ms": timer(lambda: fn(x0))}
        t["fwdbwd_ms"] = timer(step)
        if device == "cuda":
            t["fwdbwd_gpu_ms"] = timer.gpu_only(step)
        return t

    return r, times


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
        flops = 6.0 * T * k * H * I
        for impl in a.impls.split(","):
            # An impl's modes are timed round by round, so that a drift of the host's speed (which moves a synchronised
            # step's time by tenths of a millisecond over a run) falls on each of them alike.
            runs = []  # (row, its timing function, its rounds' times)
            for mode in a.modes.split(","):
                if mode == "lora" and impl not in LORA_IMPLS:
                    continue
                row, times = dict(shape=a.shape, T=T, mode=mode, impl=impl), None
                if mode == "lora":
                    row["lora_rank"] = a.lora_rank
                try:
                    extra, times = prepare(impl, T, shape, dtype, dev, mode, ref, x0, y_ref, a.lora_rank, a.profile)
                    row.update(extra)
                except Exception as e:
                    failed(row, e)
                runs.append((row, times, []))
            for _ in range(a.rounds):
                for row, times, rounds in runs:
                    if "error" not in row:
                        try:
                            rounds.append(times(timer))
                        except Exception as e:
                            failed(row, e)
            for row, _, rounds in runs:
                with result_row(rows, row, dev == "cuda"):
                    if "error" not in row:
                        row.update({key: statistics.median(t[key] for t in rounds) for key in rounds[0]})
                        row["fwd_TFLOPs"] = flops / row["fwd_ms"] * 1e-9
                        row["fwdbwd_TFLOPs"] = (3 if row["mode"] == "trained" else 2) * flops / row["fwdbwd_ms"] * 1e-9
            del runs  # this impl's modules, before the next impl's are built
    save(rows, a.json)
    print_table(rows)


def print_table(rows):
    ok = {(r["T"], r["mode"], r["impl"]): r for r in rows if "error" not in r}
    print("\n| shape | T | weights | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | vs dense | vs frozen "
          "| fwd+bwd GPU ms | vs frozen (GPU) | extra GiB | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['T']} | {r['mode']} | {r['impl']} | error: {r['error'][:80]} |")
            continue
        d = ok.get((r["T"], "frozen" if r["mode"] == "lora" else r["mode"], "dense"))
        vs = f"{d['fwdbwd_ms'] / r['fwdbwd_ms']:.2f}" if d else ""
        f = ok.get((r["T"], "frozen", r["impl"])) if r["mode"] == "lora" else None
        # three decimals: issue 5's bar is 1.15x, and LoRA's step sits within a percent of it
        vs_frozen = f"{r['fwdbwd_ms'] / f['fwdbwd_ms']:.3f}" if f else ""
        gpu = r.get("fwdbwd_gpu_ms")
        vs_frozen_gpu = f"{gpu / f['fwdbwd_gpu_ms']:.3f}" if f and gpu and f.get("fwdbwd_gpu_ms") else ""
        print(f"| {r['shape']} | {r['T']} | {r['mode']} | {r['impl']} | {r['fwd_ms']:.2f} | {r['fwd_TFLOPs']:.0f} | "
              f"{r['fwdbwd_ms']:.2f} | {r['fwdbwd_TFLOPs']:.0f} | {vs} | {vs_frozen} | "
              f"{f'{gpu:.2f}' if gpu else ''} | {vs_frozen_gpu} | "
              f"{r.get('extra_GiB', float('nan')):.2f} | {r.get('rel_err', float('nan')):.1e} |")


if __name__ == "__main__":
    sys.exit(main())
