"""Bar charts of what the benchmarks wrote with --json: bench_layer.py's forward+backward times (one panel per shape
and token count, bars per implementation in each mode) and bench_model.py's step throughput (one panel, bars per
implementation for each LoRA placement, eager and compiled).

    python3 bench/plot.py build/logs/layer_30b.json build/logs/model.json -o bench.png [--skip hf_eager]

Needs matplotlib (the benchmarks themselves do not); rows that failed are left out.
"""
import argparse
import json
import sys

ORDER = ("dense", "moefuse", "moefuse_experts", "moefuse_nf4", "grouped_mm", "hf_grouped_mm", "eager", "hf_eager")
# One colour per implementation in every panel; Hugging Face's under both of its names.
COLORS = {"dense": "0.6", "moefuse": "C0", "moefuse_experts": "C9", "moefuse_nf4": "C4", "grouped_mm": "C1",
          "hf_grouped_mm": "C1", "eager": "C3", "hf_eager": "C3"}


def panels(rows, skip=()):
    """[(title, y label, {group: {impl: value}})]: layer rows by (shape, T), model rows in one panel; implementations
    in `skip` left out."""
    out = {}
    for r in rows:
        if "error" in r or r.get("impl") in skip:
            continue
        if "fwdbwd_ms" in r:
            key = (f"layer {r['shape']}, T={r['T']}", "forward+backward ms (lower is better)")
            group, value = r["mode"], r["fwdbwd_ms"]
        elif "tokens_per_s" in r:
            key = (f"{r['layers']}-layer model step", "tokens/s (higher is better)")
            group, value = f"LoRA on {r['mode']}" + compiled(r["compiled"]), r["tokens_per_s"]
        else:
            raise ValueError(f"not a bench_layer.py or bench_model.py row: {r}")
        out.setdefault(key, {}).setdefault(group, {})[r["impl"]] = value
    return [(title, ylabel, groups) for (title, ylabel), groups in out.items()]


def compiled(how):
    """The group suffix of a model row's torch.compile mode ("no" | "model" | "layers"; older files: a bool)."""
    if how in (False, None, "no"):
        return ""
    return ", compiled" if how in (True, "model") else f", compiled per {how[:-1]}"


def rank(impl):
    return (ORDER.index(impl) if impl in ORDER else len(ORDER), impl)


def draw(ax, title, ylabel, groups):
    impls = sorted({i for g in groups.values() for i in g}, key=rank)
    width = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        xs = [g + (j - (len(impls) - 1) / 2) * width for g in range(len(groups))]
        values = [groups[g].get(impl, float("nan")) for g in groups]
        bars = ax.bar(xs, values, width, label=impl, color=COLORS.get(impl))
        ax.bar_label(bars, fmt=lambda v: f"{v / 1e3:.0f}k" if v >= 1e4 else f"{v:.3g}", fontsize=7)
    ax.set_xticks(range(len(groups)), [g.replace(", ", ",\n") for g in groups], fontsize=8)  # long groups wrap
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", help="files written by bench_layer.py / bench_model.py --json")
    p.add_argument("-o", "--out", default="bench.png")
    p.add_argument("--skip", default="", help="implementations to leave out, comma-separated (e.g. hf_eager, whose "
                   "layer times, 40x moefuse's, flatten the other bars)")
    a = p.parse_args()
    rows = []
    for path in a.json:
        try:
            with open(path) as f:
                rows += json.load(f)
        except (OSError, ValueError) as e:
            sys.exit(f"plot.py: cannot read {path}: {e}")
    try:
        found = panels(rows, a.skip.split(","))
    except ValueError as e:
        sys.exit(f"plot.py: {e}")
    if not found:
        sys.exit("plot.py: no rows to draw (none succeeded, or --skip left none) in " + ", ".join(a.json))
    try:
        import matplotlib
    except ImportError:
        sys.exit("plot.py needs matplotlib: pip install matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Wide enough that the bars' value labels do not run into each other.
    widths = [max(5.5, 0.55 * len(groups) * len({i for g in groups.values() for i in g})) for _, _, groups in found]
    fig, axes = plt.subplots(1, len(found), figsize=(sum(widths), 4.5), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, panel in zip(axes[0], found):
        draw(ax, *panel)
    fig.tight_layout()
    fig.savefig(a.out, dpi=150)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
