#!/usr/bin/env bash
# One device call: DeepGEMM probe, config tuning (TUNE=1), GPU tests, benchmark; all under $OUT.
# Run from the repo root on the GPU machine; carry .whl (DeepGEMM wheels). BUDGET = seconds.
# TUNE_ARGS: extra tuner arguments, e.g. "--merge --models Qwen3-30B-A3B --tokens 4096".
set -u
START=$SECONDS
BUDGET=${BUDGET:-575}
OUT=${OUT:-/tmp/moe_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
left() { echo $(( BUDGET - (SECONDS - START) )); }
LOG=$OUT/log.txt
# clocks, power and throttle reasons every 0.5 s (the H200 runs into its 700 W cap under bf16 GEMMs)
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active \
    --format=csv -lms 500 > "$OUT/smi.csv" 2>&1 &
SMI=$!
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$LOG" 2>&1
if [ "${PROBE:-1}" = 1 ]; then
    echo "--- deep_gemm probe" >> "$LOG"
    timeout "${PROBE_S:-80}" bash bench/gpu/probe_deep_gemm.sh >> "$LOG" 2>&1
fi
BACKENDS="triton torch"
if [ -f /tmp/dg_path ]; then
    export PYTHONPATH=$PYTHONPATH:$(cat /tmp/dg_path)
    [ "${BENCH_DEEP_GEMM:-0}" = 1 ] && BACKENDS="$BACKENDS deep_gemm"
fi
if [ "${TUNE:-1}" = 1 ]; then
    echo "--- tune ($(left)s left)" >> "$LOG"
    timeout "${TUNE_S:-240}" python3 bench/gpu/tune_moe.py --out "$OUT/tune.json" --budget-s "${TUNE_BUDGET_S:-150}" \
        ${TUNE_ARGS:-} > "$OUT/tune_log.txt" 2>&1
    echo "tune exit $?" >> "$LOG"
fi
echo "--- tests ($(left)s left)" >> "$LOG"
timeout "${TESTS_S:-120}" python3 -m pytest -v -m gpu -p no:cacheprovider tests/kernels tests/epserve/test_moe_runner.py \
    > "$OUT/tests.txt" 2>&1
echo "tests exit $?" >> "$LOG"
echo "--- bench ($(left)s left)" >> "$LOG"
timeout "$(( $(left) - 5 ))" python3 bench/moe_kernels.py --out-dir "$OUT" --backends $BACKENDS > "$OUT/bench_log.txt" 2>&1
echo "bench exit $?" >> "$LOG"
kill $SMI 2>/dev/null
cat "$LOG"; tail -5 "$OUT/tests.txt"; grep -E "T=|best|FAILED|precompiled" "$OUT/tune_log.txt" 2>/dev/null | tail -60
grep -E "T=|ceilings|FAILED|wrote" "$OUT/bench_log.txt"
# at most 8 files come back: the tuned tables and the logs travel together
cp kernels/configs/*.json "$OUT/" 2>/dev/null
(cd "$OUT" && tar czf logs.tgz log.txt tune_log.txt tests.txt bench_log.txt smi.csv ./*device=*.json 2>/dev/null \
    && rm -f log.txt tune_log.txt tests.txt bench_log.txt smi.csv ./*device=*.json)
