"""bench/bench_layer.py on the CPU at a small size: each impl's modes give a row of medians over the rounds, and an
impl that fails gives an error row without hiding the others."""
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_layer.py"


def test_layer_rows(tmp_path):
    out = tmp_path / "layer.json"
    args = ["--device", "cpu", "--shape", "cpu", "--dtype", "f32", "--tokens", "24", "--iters", "1", "--rounds", "2",
            "--impls", "moefuse,moefuse_experts,nonesuch", "--modes", "frozen,lora", "--json", str(out)]  # fmt: skip
    r = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    assert [(row["impl"], row["mode"]) for row in rows] == [(impl, mode) for impl in ("moefuse", "moefuse_experts")
                                                            for mode in ("frozen", "lora")] + [("nonesuch", "frozen")]
    for row in rows[:4]:
        assert "error" not in row and row["fwd_ms"] > 0 and row["fwdbwd_ms"] > 0 and row["rel_err"] < 1e-4
    assert rows[4]["error"] == "ValueError: nonesuch"
    for impl in ("moefuse", "moefuse_experts"):
        assert f"| lora | {impl} |" in r.stdout  # the table, with the LoRA rows' ratios to frozen


def test_each_impl_owns_its_parameters(monkeypatch):
    """An impl's modes are built together and each sets its parameters' requires_grad, so no two builds may share a
    parameter (MoeBlock.from_hf shares the HF block's): else the last mode built would set every mode's."""
    monkeypatch.syspath_prepend(str(BENCH.parent))
    import bench_layer
    import torch

    shape = dict(hidden_size=16, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2)
    ref = bench_layer.hf_block(shape, "eager", torch.float32, "cpu")
    for impl in ("moefuse", "moefuse_experts", "hf_grouped_mm", "hf_eager"):
        builds = [bench_layer.make(impl, shape, torch.float32, "cpu", ref)[1] for _ in range(2)]  # alive: ids unique
        owned = [{id(p) for p in m.parameters()} for m in (*builds, ref)]
        assert owned[0] and not owned[0] & owned[1] and not owned[0] & owned[2], impl
