#!/usr/bin/env bash
# Device call V (fifth session): two micro-batches on the cuda_ipc step path measured (issue 13 item 3), once
# call U's GPU tests of the capture gate passed: serve_deployed.py, the split deployment with
# --num-micro-batches 2 (EPSERVE_GPU_TWO_MICRO_BATCHES=1 lifts the GPU refusal) against 1, same run.
set -u
W=${OUT:-/tmp/v_out}
source bench/gpu/device_env.sh
timeout 270 python3 bench/serve_deployed.py --out-dir "$W" --name serve_deployed_one_micro_batch --modes cuda_ipc \
    --batches 1 32 128 --new-tokens 48 > "$W/one.txt" 2>&1; echo "exit $?" >> "$W/one.txt"
EPSERVE_GPU_TWO_MICRO_BATCHES=1 timeout 280 python3 bench/serve_deployed.py --out-dir "$W" \
    --name serve_deployed_two_micro_batches --modes cuda_ipc --batches 32 128 --new-tokens 48 \
    --log-dir /tmp/v_logs --up-args --num-micro-batches 2 > "$W/two.txt" 2>&1; echo "exit $?" >> "$W/two.txt"
tail -3 /tmp/v_logs/cuda_ipc/*.log > "$W/two_logs_tail.txt" 2>/dev/null
cat "$W/gpu.txt"; tail -6 "$W/one.txt"; tail -6 "$W/two.txt"
