"""bench/plot.py: the benchmarks' JSON as bar charts, and a clear exit on what it cannot read."""
# The numbers are made up: only the drawing is tested.
import json
import subprocess
import sys
from pathlib import Path

import pytest

PLOT = Path(__file__).resolve().parents[2] / "bench" / "plot.py"
LAYER = [dict(shape="30b", T=16384, mode=m, impl=i, fwd_ms=1.0, fwdbwd_ms=t)
         for m, i, t in (("frozen", "dense", 1.0), ("frozen", "moefuse_experts", 2.0), ("lora", "moefuse_experts", 3.0),
                         ("lora", "hf_grouped_mm", 4.0))]  # fmt: skip
LAYER.append(dict(shape="30b", T=16384, mode="lora", impl="x", error="RuntimeError: left out"))
MODEL = [dict(impl=i, mode="attn", layers=2, compiled=c, step_ms=1.0, tokens_per_s=v)
         for i, c, v in (("moefuse", False, 2000.0), ("grouped_mm", "no", 1000.0), ("moefuse", True, 3000.0),
                         ("moefuse", "layers", 3500.0))]  # fmt: skip


def plot(tmp_path, *rows_per_file, args=()):
    files = []
    for n, rows in enumerate(rows_per_file):
        files.append(tmp_path / f"{n}.json")
        files[-1].write_text(json.dumps(rows))
    out = tmp_path / "bench.png"
    r = subprocess.run([sys.executable, str(PLOT), *map(str, files), "-o", str(out), *args], capture_output=True,
                       text=True)  # fmt: skip
    return r, out


def test_draws_layer_and_model_panels(tmp_path):
    pytest.importorskip("matplotlib")
    r, out = plot(tmp_path, LAYER, MODEL)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_skipped_implementations_are_left_out(tmp_path):
    pytest.importorskip("matplotlib")
    r, out = plot(tmp_path, LAYER, MODEL, args=["--skip", "hf_grouped_mm,grouped_mm"])
    assert r.returncode == 0, r.stderr
    r, out = plot(tmp_path, MODEL, args=["--skip", "moefuse,grouped_mm"])  # nothing left
    assert r.returncode != 0 and "no rows to draw" in r.stderr


@pytest.mark.parametrize("rows, message", [([dict(a=1)], "not a bench_layer.py or bench_model.py row"),
                                           ([dict(error="x")], "no rows to draw")])  # fmt: skip
def test_bad_input_exits_with_a_message(tmp_path, rows, message):
    r, out = plot(tmp_path, rows)
    assert r.returncode != 0 and message in r.stderr and not out.exists()


def test_unreadable_file_exits_with_a_message(tmp_path):
    (tmp_path / "0.json").write_text("{not json")
    r = subprocess.run([sys.executable, str(PLOT), str(tmp_path / "0.json")], capture_output=True, text=True)
    assert r.returncode != 0 and "cannot read" in r.stderr
