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
            "--impls", "moefuse_experts,nonesuch", "--modes", "frozen,lora", "--json", str(out)]  # fmt: skip
    r = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    assert [(row["impl"], row["mode"]) for row in rows] == [("moefuse_experts", "frozen"), ("moefuse_experts", "lora"),
                                                            ("nonesuch", "frozen")]  # fmt: skip
    for row in rows[:2]:
        assert "error" not in row and row["fwd_ms"] > 0 and row["fwdbwd_ms"] > 0 and row["rel_err"] < 1e-4
    assert rows[2]["error"] == "ValueError: nonesuch"
    assert "| lora | moefuse_experts |" in r.stdout  # the table, with the LoRA row's ratio to frozen
