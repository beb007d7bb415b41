#!/usr/bin/env bash
# Runs every test: the C++ suite (ctest; CUDA code is compiled, its tests skip without a GPU) and the Python
# suite (pytest). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh

jobs=$(nproc)
cmake -S . -B build/test -DCMAKE_BUILD_TYPE=Release
cmake --build build/test -j"$jobs"
ctest --test-dir build/test --output-on-failure -j"$jobs"

# The Python module needs the CUDA backend only where a GPU can run it (the build above compiled every CUDA source).
cuda=OFF
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && cuda=ON
python3 -m pip install -q --no-build-isolation --disable-pip-version-check -C cmake.define.MOEFUSE_CUDA=$cuda .
python3 -m pytest -q tests/python
