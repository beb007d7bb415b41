#!/usr/bin/env bash
# Everything the GPU machine runs, in one call: tools/device.sh [stage ...] (default: all stages in order).
# Stages: build ctest sanitize python pytest bench layer model finetune plot, and ab (not in the default run).
# Environment: CTEST_ARGS (e.g. "-R Cuda"), SANITIZERS (default "memcheck racecheck"), AB_PATCH (ab's diff),
# AB_IMPLS (the impls ab times, default moefuse_experts; e.g. moefuse,moefuse_experts).
# That machine has no network and no BLAS or GoogleTest: the caller carries .deps/ (Debian's reference BLAS with
# CBLAS, and GoogleTest's sources; see docs/device.md). Logs and JSON go to build/logs, packed into $OUT/logs.tgz
# at the end (the device tool returns few files).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
OUT=${OUT:-$root/build/out}
LOG=$root/build/logs
mkdir -p "$OUT" "$LOG"
export PYTHONUNBUFFERED=1 LD_LIBRARY_PATH=$root/.deps/blas/lib:${LD_LIBRARY_PATH:-}
# The build stage also builds the Python module into python/moefuse, so the Python stages need no pip install
# (the python stage checks that pip install works; its package is the same code).
export PYTHONPATH=$root/python${PYTHONPATH:+:$PYTHONPATH}
deps=(-DBLA_VENDOR=Generic -DCMAKE_PREFIX_PATH=$root/.deps/blas -DMOEFUSE_CBLAS_INCLUDE=$root/.deps/blas/include
      -DMOEFUSE_GTEST_SOURCE=$root/.deps/googletest)
# CUTLASS headers for the sm_90a grouped GEMM: that machine's Python lacks nvidia-cutlass, so unpack the carried
# wheel (.whl/, see docs/device.md) unless a directory is given.
if [ -z "${MOEFUSE_CUTLASS_INCLUDE:-}" ] && ! python3 -c "import cutlass_library" 2>/dev/null &&
   ls .whl/nvidia_cutlass-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/cutlass .whl/nvidia_cutlass-*.whl &&
    export MOEFUSE_CUTLASS_INCLUDE=/tmp/cutlass/cutlass_library/source/include
fi
[ -n "${MOEFUSE_CUTLASS_INCLUDE:-}" ] && deps+=(-DMOEFUSE_CUTLASS_INCLUDE=$MOEFUSE_CUTLASS_INCLUDE)
stages=("$@")
((${#stages[@]})) || stages=(build ctest sanitize python pytest bench layer model finetune plot)

step() { echo "=== $1 ($(date +%T))"; }
# sanitize TOOL TEST FILTER: one compute-sanitizer run of build/dev/tests/TEST, its summary line printed.
sanitize() {
  local log="$LOG/sanitize_$1_${2#*/}.log"
  timeout 270 compute-sanitizer --tool "$1" --error-exitcode 9 "build/dev/tests/$2" --gtest_filter="$3" > "$log" 2>&1
  echo "$1 ${2#*/} rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|PASSED|FAILED' "$log" | tail -3 | tr '\n' ' ')"
}

for s in "${stages[@]}"; do
  case $s in
    build)
      step build
      cmake -S . -B build/dev -G Ninja "${deps[@]}" -DMOEFUSE_CUDA=ON -DMOEFUSE_BUILD_PYTHON=ON \
        > "$LOG/cmake.log" 2>&1 || tail -30 "$LOG/cmake.log"
      cmake --build build/dev -j16 > "$LOG/build.log" 2>&1 || grep -E "error|FAILED" "$LOG/build.log" | head -30 ;;
    ctest)
      step ctest
      ctest --test-dir build/dev -j8 --output-on-failure --timeout 300 ${CTEST_ARGS:-} > "$LOG/ctest.log" 2>&1
      grep -E "tests passed|FAILED|Failed|Timeout" "$LOG/ctest.log" | head -30 ;;
    sanitize)
      step "compute-sanitizer memcheck, racecheck"
      # racecheck is ~50x slower than memcheck: it gets the block (both GEMM paths at bf16) and the gather GEMM with
      # its LoRA k-block (SwigluForward, Lora), but not the linear sweep. Both tools then run the block with adapters on
      # both projections, contiguous and strided f32 as PEFT's (test_lora's two CUDA tests: every LoRA kernel, ~25 s).
      filter='CudaRouter.*:CudaPlan.*:CudaSwiglu.*:CudaBlock.SmallShapesMatchCpu:CudaBlock.StepReplaysFromACudaGraph'
      filter+=':CudaLinear.SwigluForwardMatchesCpu:CudaLinear.LoraMatchesCpu:CudaNf4.QuantizeDequantizeMatchCpu'
      filter+=':CudaNf4.BlockMatchesDequantizedWeights'
      for tool in ${SANITIZERS:-memcheck racecheck}; do
        sanitize $tool cuda/test_cuda "$([ $tool = memcheck ] && echo "$filter:CudaLinear.*" || echo "$filter")"
        sanitize $tool cpp/test_lora 'MoeBlockLora*Cuda*'
      done ;;
    python)
      step "pip install (CUDA backend)"
      python3 -m pip install --no-build-isolation --no-deps -C build-dir=build/py \
        -C cmake.define.BLA_VENDOR=Generic -C cmake.define.CMAKE_PREFIX_PATH="$root/.deps/blas" \
        -C cmake.define.MOEFUSE_CBLAS_INCLUDE="$root/.deps/blas/include" \
        ${MOEFUSE_CUTLASS_INCLUDE:+-C cmake.define.MOEFUSE_CUTLASS_INCLUDE=$MOEFUSE_CUTLASS_INCLUDE} . > "$LOG/pip.log" 2>&1
      echo "pip rc=$?" ;;
    pytest)
      step pytest
      timeout 400 python3 -m pytest -v -p no:cacheprovider tests/python > "$LOG/pytest.log" 2>&1
      echo "pytest rc=$?"; grep -E "passed|failed|FAILED|Error|Fatal" "$LOG/pytest.log" | tail -15 ;;
    bench)
      step "moefuse bench (C++, bf16)"
      for args in "--preset 30b --tokens 4096" "--preset 30b --tokens 16384" "--preset 235b --tokens 8192"; do
        build/dev/apps/moefuse bench --device cuda --dtype bf16 --iters 20 --lora 16 --nf4 $args
      done 2>&1 | tee "$LOG/bench_cli.txt" ;;
    layer)
      step "layer benchmark vs Hugging Face and dense cuBLAS"
      python3 bench/bench_layer.py --shape 30b --tokens 4096,16384 --modes trained,frozen,lora --json "$LOG/layer_30b.json" > "$LOG/layer_30b.txt" 2>&1
      python3 bench/bench_layer.py --shape 235b --tokens 8192 --impls dense,moefuse,moefuse_experts,hf_grouped_mm \
        --json "$LOG/layer_235b.json" > "$LOG/layer_235b.txt" 2>&1
      grep "^|" "$LOG/layer_30b.txt" "$LOG/layer_235b.txt" ;;
    model)
      step "model step benchmark"
      python3 bench/bench_model.py --profile --json "$LOG/model.json" > "$LOG/model.txt" 2>&1
      grep "^|" "$LOG/model.txt" || tail -20 "$LOG/model.txt"
      python3 bench/bench_model.py --compile layers --impls moefuse,moefuse_nf4,grouped_mm \
        --json "$LOG/model_compiled.json" > "$LOG/model_compiled.txt" 2>&1
      grep "^|" "$LOG/model_compiled.txt" || tail -20 "$LOG/model_compiled.txt" ;;
    finetune)
      step "main job on the GPU"
      python3 examples/finetune_lora.py --out "$LOG/finetune" > "$LOG/finetune.txt" 2>&1
      tail -8 "$LOG/finetune.txt" ;;
    ab)
      # The working tree against a baseline, on one machine, after the build stage: a baseline from another machine or
      # call is worth little. AB_PATCH is the working tree's diff from the baseline, made on the calling machine (that
      # machine's git may lack the baseline's commits; docs/device.md). Each side is built in turn into build/dev
      # (base first, so the tree ends as it came), times the 30B layer's frozen and LoRA steps (--rounds 7) and
      # profiles one step of each (its kernel table: ab_profile_*.txt in logs.tgz).
      step "A/B: the working tree without and with ${AB_PATCH:-(no AB_PATCH)}"
      if [ ! -s "${AB_PATCH:-}" ]; then
        echo "ab: AB_PATCH must name a non-empty diff (docs/device.md)"
      else
        layer=(--shape 30b --tokens 16384 --impls "${AB_IMPLS:-moefuse_experts}" --modes frozen,lora)
        for side in base tree; do
          flag=$([ $side = base ] && echo -R)
          git apply $flag "$AB_PATCH" || { echo "ab: git apply $flag $AB_PATCH failed"; break; }
          if ! cmake --build build/dev -j16 > "$LOG/ab_build_$side.log" 2>&1; then
            grep -E "error|FAILED" "$LOG/ab_build_$side.log" | head -20
            continue
          fi
          timeout 150 python3 bench/bench_layer.py "${layer[@]}" --iters 30 --rounds 7 --json "$LOG/ab_$side.json" \
            > "$LOG/ab_$side.txt" 2>&1
          echo "$side:"; grep "^| 30b" "$LOG/ab_$side.txt" || tail -5 "$LOG/ab_$side.txt"
          timeout 150 python3 bench/bench_layer.py "${layer[@]}" --iters 5 --profile > "$LOG/ab_profile_$side.txt" 2>&1
        done
      fi ;;
    plot)
      step "plots of the benchmark JSON"
      # That machine may lack matplotlib: plot.py then says so, and the JSON in logs.tgz plots here the same way.
      python3 bench/plot.py "$LOG"/layer_30b.json "$LOG"/layer_235b.json "$LOG"/model*.json --skip hf_eager \
        -o "$OUT/bench.png" ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
  tar czf "$OUT/logs.tgz" -C build logs  # after every stage: a call cut off by its time limit still returns them
done
