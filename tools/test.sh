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

# The installed library as a C++ project outside this tree uses it: find_package(moefuse), then the example.
cmake --install build/test --prefix "$PWD/build/test-install" > /dev/null
cmake -S examples/cpp -B build/test-example -DCMAKE_PREFIX_PATH="$PWD/build/test-install" > /dev/null
cmake --build build/test-example -j"$jobs"
build/test-example/moe_block_example > /dev/null && echo "installed moefuse: examples/cpp built and ran against it"

# The C++ core and CPU backend again under AddressSanitizer (leaks included) and UndefinedBehaviorSanitizer: bad
# input must get an error, never a stray read or write (the CUDA kernels get compute-sanitizer on the GPU machine).
san="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
cmake -S . -B build/sanitize -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOEFUSE_CUDA=OFF -DCMAKE_CXX_FLAGS="$san" \
  -DCMAKE_EXE_LINKER_FLAGS="$san"
cmake --build build/sanitize -j"$jobs"
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 ctest --test-dir build/sanitize --output-on-failure -j"$jobs"

# The Python module needs the CUDA backend only where a GPU can run it (the build above compiled every CUDA source).
cuda=OFF
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && cuda=ON
python3 -m pip install -q --no-build-isolation --disable-pip-version-check -C cmake.define.MOEFUSE_CUDA=$cuda .
python3 -m pytest -q tests/python
