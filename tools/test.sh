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

python3 -m pip install -q --no-build-isolation --disable-pip-version-check .
python3 -m pytest -q tests/python
