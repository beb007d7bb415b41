#!/usr/bin/env bash
# The main job: builds moefuse and times the MoE block on this machine (CPU, or the GPU when there is one).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh

cmake -S . -B build/run -DCMAKE_BUILD_TYPE=Release -DMOEFUSE_BUILD_TESTS=OFF
cmake --build build/run -j"$(nproc)"
device=cpu
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && device=cuda
build/run/apps/moefuse bench --device "$device" "$@"
