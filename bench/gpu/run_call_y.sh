#!/usr/bin/env bash
# Device call Y (fifth session, last): the engine's GPU tests again (captures with the garbage collector off:
# the seeded overlap test failed only inside the full file in call T), then the one-token gate_up GEMV's tile
# timed inside the engine (the table's was tuned on the kernel alone; down_ahead now on). Results under $OUT.
set -u
W=${OUT:-/tmp/y_out}
source bench/gpu/device_env.sh
timeout 130 python3 -m pytest -q -p no:cacheprovider --timeout 120 tests/attention_worker/test_gpu_engine.py \
    ${Y_TESTS:-} > "$W/tests.txt" 2>&1; echo "exit $?" >> "$W/tests.txt"
timeout ${AB_S:-120} python3 bench/gpu/engine_ab.py --batches 1 2 --new-tokens 64 --out "$W/engine_ab.json" \
    --variants defaults --gate-up-tiles 4,1024,4 8,2048,8 16,512,4 8,1024,4 \
    > "$W/engine_ab.txt" 2>&1; echo "exit $?" >> "$W/engine_ab.txt"
cat "$W/gpu.txt"; grep -E "passed|failed|exit|^FAILED" "$W/tests.txt" | tail -5; tail -12 "$W/engine_ab.txt"
