#!/usr/bin/env bash
# The main job: builds moefuse, times the MoE block with the command line (`moefuse bench`, a small default
# shape, frozen, with LoRA on the experts, and both again on 4-bit experts), then LoRA-fine-tunes a tiny Qwen3-MoE on
# the built-in corpus with moefuse and with Hugging Face's eager experts side by side (examples/finetune_lora.py).
# Uses the GPU when there is one. Extra arguments go to the fine-tuning script.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh

cuda=OFF
device=cpu
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then cuda=ON; device=cuda; fi

cmake -S . -B build/run -DCMAKE_BUILD_TYPE=Release -DMOEFUSE_BUILD_TESTS=OFF -DMOEFUSE_CUDA=$cuda
cmake --build build/run -j"$(nproc)"
build/run/apps/moefuse bench --device "$device" --lora 16 --nf4

python3 -m pip install -q --no-build-isolation --disable-pip-version-check -C cmake.define.MOEFUSE_CUDA=$cuda .
python3 examples/finetune_lora.py "$@"
