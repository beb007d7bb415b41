"""Host time per call: what the Python adapter, the custom ops and PEFT's wrappers cost the CPU for one MoE layer, at
a shape so small that the kernels hardly count. Where the GPU waits for the host (small batches, one synchronised
layer as bench_layer.py times it), this is time the GPU sits idle.

Rows: the experts op alone (frozen or with stacked adapters on both projections), called as torch.ops.moefuse.experts
or through its eager caller, which the package exports and the experts backend uses (moefuse.experts: the same code
without torch.library's per-call layers), an HF Qwen3MoeSparseMoeBlock with the moefuse experts (frozen, or with
PEFT LoRA on both expert projections through use_moefuse_lora), and MoeBlock (frozen, or with its own stacked adapters
on both), forward and forward+backward, microseconds per call
(median of --repeats loops of --calls calls; on a GPU the loop synchronises once at its end, so the figure is the
host's issue time while it exceeds the GPU's).

    python3 bench/bench_host.py [--device cpu|cuda] [--calls 200] [--repeats 5]
"""
import argparse
import time

import torch
from bench_layer import add_lora, hf_block, make

SHAPE = dict(hidden_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2)
TOKENS, RANK = 16, 16


def per_call_us(fn, calls, repeats, cuda):
    def loop():
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / calls * 1e6

    loop()  # warm-up
    return sorted(loop() for _ in range(repeats))[repeats // 2]


def op_rows(device, dtype):
    """(name, forward, forward+backward) of the experts op, frozen and with adapters."""
    H, I, E, k = (SHAPE[n] for n in ("hidden_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok"))
    r = lambda *s: torch.randn(*s, device=device, dtype=dtype) * 0.1
    x = r(TOKENS, H).requires_grad_()
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(TOKENS)]).to(device, torch.int32)
    w = torch.rand(TOKENS, k, device=device)
    gate_up, down = r(E, 2 * I, H), r(E, H, I)
    a1, b1, a2, b2 = (t.requires_grad_() for t in (r(E, RANK, H), r(E, 2 * I, RANK), r(E, RANK, I), r(E, H, RANK)))
    lora = (a1, b1, 2.0, a2, b2, 2.0)  # gate_up's adapter and scale, then down's
    import moefuse

    for name, extra in (("experts op, frozen", ()), ("experts op, LoRA", lora)):
        for how, call in (("torch.ops", torch.ops.moefuse.experts), ("moefuse.experts", moefuse.experts)):
            fwd = lambda call=call, extra=extra: call(x, ids, w, gate_up, down, *extra)[0]
            yield f"{name} ({how})", fwd, lambda fwd=fwd: fwd().sum().backward()


def block_rows(device, dtype):
    ref = hf_block(SHAPE, "eager", dtype, device)
    x = torch.randn(1, TOKENS, SHAPE["hidden_size"], device=device, dtype=dtype, requires_grad=True)
    for name, lora in (("HF block + moefuse experts, frozen", False), ("HF block + moefuse experts, PEFT LoRA", True)):
        m = hf_block(SHAPE, "moefuse", dtype, device, ref.state_dict())
        if lora:
            m = add_lora(m, "moefuse_experts", RANK)
        for n, p in m.named_parameters():
            p.requires_grad_(lora and "lora_" in n)
        fwd = lambda m=m: m(x).squeeze(0)  # as bench_layer.py: no zero-fill + copy in the backward
        yield name, fwd, lambda fwd=fwd: fwd().sum().backward()
    for name, rank in (("MoeBlock, frozen", 0), ("MoeBlock, its own LoRA (add_lora)", RANK)):
        block, m = make("moefuse", SHAPE, dtype, device, ref, rank)
        for n, p in m.named_parameters():
            p.requires_grad_(bool(rank) and "lora_" in n)
        fwd = lambda block=block: block(x[0])
        yield name, fwd, lambda fwd=fwd: fwd().sum().backward()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    import moefuse  # noqa: F401  (registers the ops and the experts implementation)

    torch.manual_seed(0)
    cuda = a.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"# {name}, torch {torch.__version__}, T={TOKENS} {SHAPE}, LoRA r={RANK}; microseconds per call")
    print("| what | forward | forward+backward |\n|---|---|---|")
    for rows in (op_rows(a.device, dtype), block_rows(a.device, dtype)):
        for what, fwd, step in rows:
            f, s = (per_call_us(fn, a.calls, a.repeats, cuda) for fn in (fwd, step))
            print(f"| {what} | {f:.0f} | {s:.0f} |", flush=True)


if __name__ == "__main__":
    main()
