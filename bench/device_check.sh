#!/usr/bin/env bash
# One call on the GPU machine: build (sm_90a only), run the CUDA tests, compute-sanitizer memcheck and racecheck on
# the small block test, then the block benchmark. Logs and the CSV go to $OUT; a compact summary prints last.
# Expects .deps/googletest (GoogleTest sources) and .deps/openblas or .deps/blas ({include,lib}) in the repo root.
#   OUT=/tmp/out bash bench/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moefuse-out}
mkdir -p "$OUT"
root=$PWD
summary=()
note() { summary+=("$1"); echo "== $1"; }

nvidia-smi -L >"$OUT/gpu.txt" 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv >>"$OUT/gpu.txt" 2>&1

# BLAS for the CPU backend (the reference the tests compare with).
if [ -d .deps/openblas ]; then blas=$root/.deps/openblas; vendor=OpenBLAS; else blas=$root/.deps/blas; vendor=Generic; fi
export LD_LIBRARY_PATH=$blas/lib:${LD_LIBRARY_PATH:-}
export OMP_WAIT_POLICY=PASSIVE

t0=$(date +%s)
generator=""
command -v ninja >/dev/null && generator="-G Ninja"
cmake -S . -B build-dev $generator -DCMAKE_BUILD_TYPE=Release -DMOEFUSE_CUDA=ON -DMOEFUSE_BUILD_TESTS=ON \
  -DMOEFUSE_BUILD_APPS=OFF -DMOEFUSE_GTEST_SOURCE="$root/.deps/googletest" -DBLA_VENDOR=$vendor \
  -DCMAKE_PREFIX_PATH="$blas" -DMOEFUSE_CBLAS_INCLUDE="$blas/include" \
  "-DMOEFUSE_CUDA_GENCODE=-gencode=arch=compute_90a,code=sm_90a" >"$OUT/configure.log" 2>&1
if ! cmake --build build-dev -j16 --target test_cuda bench_block >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  note "BUILD FAILED (see build.log)"
  printf '%s\n' "${summary[@]}"
  exit 1
fi
note "build ok in $(($(date +%s) - t0)) s"

# 1. Tests (all CUDA ops vs the CPU backend, the block, determinism).
t0=$(date +%s)
timeout 360 build-dev/tests/cuda/test_cuda --gtest_brief=1 >"$OUT/test_cuda.log" 2>&1
rc=$?
grep -E "^\[  (PASSED|FAILED|SKIPPED) " "$OUT/test_cuda.log" | tail -12
note "test_cuda rc=$rc in $(($(date +%s) - t0)) s: $(grep -E '^\[  PASSED|^\[  FAILED' "$OUT/test_cuda.log" | tr '\n' ' ')"

# 2. compute-sanitizer on the small block shapes (every kernel, every dtype).
for tool in memcheck racecheck; do
  t0=$(date +%s)
  timeout 150 compute-sanitizer --tool $tool --error-exitcode 9 \
    build-dev/tests/cuda/test_cuda --gtest_filter='CudaBlock.SmallShapesMatchCpu:CudaPlan.NegativeIds*' \
    >"$OUT/sanitizer_$tool.log" 2>&1
  rc=$?
  note "compute-sanitizer $tool rc=$rc in $(($(date +%s) - t0)) s: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_$tool.log" | head -2 | tr '\n' ' ')"
done

# 3. Benchmark: the block at the Qwen3 shapes, and a dense cuBLAS pair of the same FLOPs.
t0=$(date +%s)
timeout 240 build-dev/bench/cuda/bench_block "$OUT/bench.csv" >"$OUT/bench.txt" 2>"$OUT/bench.err"
rc=$?
note "bench rc=$rc in $(($(date +%s) - t0)) s"

echo
echo "================ summary ================"
printf '%s\n' "${summary[@]}"
grep -E "FAILED|Failure|error" "$OUT/test_cuda.log" | head -20
tail -3 "$OUT/bench.err"
cat "$OUT/bench.txt"
