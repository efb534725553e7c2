#!/usr/bin/env bash
# The checks of a lent-GPU session (device time is short: about 15 minutes, start-up included).
# From the repository root on the GPU machine:
#
#   bash tests/gpu/session.sh build,smoke,test              # first call: build + correctness
#   bash tests/gpu/session.sh build,bench,sanitize,ncu      # second call, on the warm machine
#   bash tests/gpu/session.sh build,trace                   # host vs kernel time, small levels
#
# What fitted one 15-minute lease on an H200 (2026-12-04; the machine starts in ~30 s, and stays
# warm 30 s after a call, so issue the next call at once): call 1
#   DEADLINE=555 SMOKE_CAP=90 TEST_CAP=130 OPS_CAP=110 NECK_CAP=120 \
#     bash tests/gpu/session.sh build,smoke,test,bench                (459 s: build 130 s)
# then, warm, `DEADLINE=230 bash tests/gpu/session.sh build,test,sanitize,ncu` (158 s) - the
# test step was cut at 130 s in call 1; `-m cuda -n 14` runs all GPU tests in 75 s.
#
# build is a no-op when litefpn_kernels/_C*.so with CUDA kernels is already there (a warm
# machine keeps ignored build outputs between calls); it builds for this GPU's arch only
# (TORCH_CUDA_ARCH_LIST, e.g. 9.0: a third of the default's nvcc work). DEADLINE (seconds,
# default 540) is the whole script's budget: each step runs under min(its cap, time left), so
# the script ends inside the device tool's limit and $OUT holds whatever finished. The bench
# writes its JSON after every timed group, so a run cut short still leaves its measurements:
# `python -m benchmarks.run --render FILE.json` makes the report from them on any machine.
#
# At most 8 files land in $OUT (what the device tool brings back): build.log, tests.log (smoke +
# pytest), sanitizer.log, bench.log, ops.json, neck.json, ncu.csv, trace.txt.
# Knobs: MAX_JOBS, SMOKE_CAP / TEST_CAP / OPS_CAP / NECK_CAP (seconds per step), TEST_ARGS (pytest; default the GPU-marked tests), OPS_ARGS / NECK_ARGS
# (benchmarks.run), NCU_BATCH.
set -u
OUT=${OUT:-/tmp/litefpn_gpu}
mkdir -p "$OUT"
STEPS=${1:-build,smoke,test}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
START=$(date +%s)
DEADLINE=${DEADLINE:-540}
step() { [[ ",$STEPS," == *",$1,"* ]]; }
say() { echo "== $* ($(( $(date +%s) - START )) s)"; }
# seconds a step may run: its cap, or what is left of the budget less a reserve for the rest
cap() {
  local left=$(( START + DEADLINE - $(date +%s) - ${2:-5} ))
  (( left > $1 )) && left=$1
  (( left < 1 )) && left=1
  echo "$left"
}
has_cuda_ext() {
  "$PY" -c "from litefpn_kernels.backends import compiled; import sys
sys.exit(0 if any(key == 'CUDA' for _, key in compiled.COMPILED_FOR) else 1)" 2>/dev/null
}

if step build; then
  say build
  { nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv
    nvcc --version | tail -2; command -v compute-sanitizer ncu
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  } >> "$OUT/build.log" 2>&1
  if has_cuda_ext; then
    echo "extension already built with CUDA kernels" >> "$OUT/build.log"
  else
    arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    # setup.py builds the CUDA kernels when torch has CUDA and nvcc is found
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} MAX_JOBS=${MAX_JOBS:-16} \
      timeout "$(cap 300 200)" "$PY" setup.py build_ext --inplace >> "$OUT/build.log" 2>&1 \
      || echo "build FAILED: see build.log"
  fi
  "$PY" -c "from litefpn_kernels import info; info.main()" >> "$OUT/build.log" 2>&1
  say "build done"; tail -25 "$OUT/build.log"
fi

if step smoke; then
  say smoke
  timeout "$(cap "${SMOKE_CAP:-120}" 10)" "$PY" -m tests.gpu.smoke >> "$OUT/tests.log" 2>&1
  echo "smoke exit $?"; grep -E "FAIL|failures|Error" "$OUT/tests.log" | tail -20
fi

if step test; then
  say test
  # the GPU-marked tests: every op test's cuda / triton-cuda rows (tests/conftest.py), incl.
  # tests/ops/test_grad_layouts.py (grad_out laid out unlike the inputs); the rest runs in CI
  LITEFPN_REQUIRE_EXT=1 timeout "$(cap "${TEST_CAP:-300}" 10)" "$PY" -m pytest tests -p no:cacheprovider \
    ${TEST_ARGS:--m cuda -n 8 --dist loadfile -v -rfE --timeout 120} >> "$OUT/tests.log" 2>&1
  echo "pytest exit $?"
  grep -E "FAILED|ERROR|passed|failed" "$OUT/tests.log" | tail -30
fi

if step bench; then
  say bench
  # the op rows against eager (no torch.compile: its per-level compiles would take the lease);
  # the neck against eager and torch.compile (default mode: max-autotune's tuning would too)
  timeout "$(cap "${OPS_CAP:-200}" 10)" "$PY" -m benchmarks.run --out "$OUT/ops" --no-model \
    ${OPS_ARGS:---ops up2_fuse,lateral_up2_fuse,bn_silu --impls eager,triton,cuda --dtypes bf16} \
    >> "$OUT/bench.log" 2>&1
  echo "bench ops exit $?"
  timeout "$(cap "${NECK_CAP:-240}" 10)" "$PY" -m benchmarks.run --out "$OUT/neck" --no-model \
    ${NECK_ARGS:---ops neck --dtypes bf16 --layouts channels_last --compile-mode default} \
    >> "$OUT/bench.log" 2>&1
  echo "bench neck exit $?"
  grep -E "^\[|Error" "$OUT/bench.log" | grep -v "ETA" | tail -40
  rm -f "$OUT"/*.md "$OUT"/*.png  # rendered here from the JSON (--render): fewer files back
fi

if step sanitize; then
  say sanitize
  for tool in memcheck racecheck; do
    echo "---- compute-sanitizer --tool $tool" >> "$OUT/sanitizer.log"
    timeout "$(cap 90 40)" compute-sanitizer --tool "$tool" --error-exitcode 9 \
      "$PY" -m tests.gpu.smoke >> "$OUT/sanitizer.log" 2>&1
    echo "$tool exit $?" | tee -a "$OUT/sanitizer.log"
  done
  grep -E "ERROR SUMMARY|failures|Error" "$OUT/sanitizer.log" | tail
fi

if step ncu; then
  say ncu
  timeout "$(cap 120 3)" ncu --clock-control none --profile-from-start off --csv \
    --section SpeedOfLight --metrics launch__registers_per_thread,dram__bytes.sum \
    "$PY" -m tests.gpu.profile_top "${NCU_BATCH:-64}" > "$OUT/ncu.csv" 2>&1
  echo "ncu exit $?"; wc -l "$OUT/ncu.csv"
fi
if step trace; then
  say trace
  timeout "$(cap 120 3)" "$PY" -m tests.gpu.profile_small cuda 256 1/16,1/8 \
    > "$OUT/trace.txt" 2>&1
  echo "trace exit $?"; cat "$OUT/trace.txt"
fi
say done
