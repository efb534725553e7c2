#!/usr/bin/env bash
# The checks of a lent-GPU session, prepared on a machine without a GPU (not yet run on one: fix
# what a first run shows). From the repository root on the GPU machine:
#
#   bash tests/gpu/session.sh build,test,sanitize    # first call (~10 min at most)
#   bash tests/gpu/session.sh bench                  # later call(s), _C.so carried
#
# A lent machine is bare at every call and one call runs 10 minutes at most, so the build step
# also leaves the compiled extension in $OUT/_C.so: copy it to litefpn_kernels/_C.so here and
# `carry` that path in later calls, which then skip the build (the package runs from the
# repository root, no install needed). Every step has its own time limit (*_TIMEOUT, seconds);
# the script goes on after a failing step. At most 8 files land in $OUT (what the device tool
# brings back): build.log (environment + build), _C.so, tests.log, sanitizer.log, bench.log and
# the report's gpu.json / gpu.md / gpu.png.
# Knobs: MAX_JOBS (build), TEST_ARGS (pytest; default the GPU-marked tests, then the Triton kernel
# and mixed-layout backward tests again on the GPU; the rest runs in CI),
# BENCH_ARGS (benchmarks.run, e.g. "--levels 1/4 --dtypes bf16 --ops up2_fuse,lateral_up2_fuse").
# The report counts each row's moved bytes on the CPU (benchmarks/bandwidth_model.py, up to a
# minute for the default rows); "--no-model" in BENCH_ARGS skips it.
set -u
OUT=${OUT:-/tmp/litefpn_gpu}
mkdir -p "$OUT"
STEPS=${1:-build,test,sanitize}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
step() { [[ ",$STEPS," == *",$1,"* ]]; }
say() { echo "== $* ($(date +%T))"; }

if step build; then
  say build
  { nvidia-smi; nvcc --version; command -v compute-sanitizer
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  } > "$OUT/build.log" 2>&1
  # setup.py builds the CUDA kernels when torch has CUDA and nvcc is found
  MAX_JOBS=${MAX_JOBS:-16} timeout "${BUILD_TIMEOUT:-360}" "$PY" setup.py build_ext --inplace \
    >> "$OUT/build.log" 2>&1 || echo "build FAILED: see build.log"
  cp litefpn_kernels/_C*.so "$OUT/_C.so" 2>/dev/null
fi
"$PY" -c "from litefpn_kernels.backends import compiled; print('extension compiled for',
sorted(compiled.COMPILED_FOR))" 2>&1 | tee -a "$OUT/build.log"

if step test; then
  say test
  # the GPU-marked tests (incl. tests/ops/test_grad_layouts.py's cuda / triton-cuda rows:
  # grad_out laid out unlike the inputs), then the Triton kernel tests at their GPU plan
  LITEFPN_REQUIRE_EXT=1 timeout "${TEST_TIMEOUT:-180}" "$PY" -m pytest tests -q -ra \
    ${TEST_ARGS:--m cuda} > "$OUT/tests.log" 2>&1
  LITEFPN_TRITON_PLAN=gpu LITEFPN_REQUIRE_EXT=1 timeout "${TEST_TIMEOUT:-180}" "$PY" -m pytest \
    tests/kernels/triton tests/ops/test_grad_layouts.py -q -ra -x >> "$OUT/tests.log" 2>&1
  echo "pytest exit $?"; tail -3 "$OUT/tests.log"
fi

if step sanitize; then
  say sanitize
  : > "$OUT/sanitizer.log"
  for tool in memcheck racecheck; do
    echo "---- compute-sanitizer --tool $tool" >> "$OUT/sanitizer.log"
    timeout "${SANITIZE_TIMEOUT:-120}" compute-sanitizer --tool "$tool" --error-exitcode 9 \
      "$PY" -m tests.gpu.smoke >> "$OUT/sanitizer.log" 2>&1
    echo "$tool exit $?" | tee -a "$OUT/sanitizer.log"
  done
  grep -E "ERROR SUMMARY|failures" "$OUT/sanitizer.log"
fi

if step bench; then
  say bench
  timeout "${BENCH_TIMEOUT:-540}" "$PY" -m benchmarks.run --out "$OUT/gpu" ${BENCH_ARGS:-} \
    > "$OUT/bench.log" 2>&1
  echo "bench exit $?"
  [ -f "$OUT/gpu.md" ] && tail -40 "$OUT/gpu.md"
fi
say done
