#!/usr/bin/env bash
# Device call Z (fifth session, last): on an H200, the serving table issue 12 asks for (colocated with the overlap
# schedule and down_ahead; transformers' H200 rows are call 1's) and the engine's GPU tests; on an H100, call Y.
set -u
W=${OUT:-/tmp/z_out}
source bench/gpu/device_env.sh
if grep -q H200 "$W/gpu.txt"; then
    timeout 170 python3 bench/serve_gpu.py --out-dir "$W" --modes colocated --batches 1 32 128 256 \
        --name serve_gpu_h200_overlap > "$W/serve.txt" 2>&1; echo "exit $?" >> "$W/serve.txt"
    timeout 90 python3 -m pytest -q -p no:cacheprovider --timeout 80 tests/attention_worker/test_gpu_engine.py \
        > "$W/tests.txt" 2>&1; echo "exit $?" >> "$W/tests.txt"
    cat "$W/gpu.txt"; grep -v "drawing\|loading" "$W/serve.txt" | tail -12; grep -E "passed|failed|exit|^FAILED" "$W/tests.txt" | tail -4
else
    OUT=$W bash bench/gpu/run_call_y.sh
fi
