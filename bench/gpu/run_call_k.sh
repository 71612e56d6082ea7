#!/usr/bin/env bash
# Device call: the fused cuda_ipc hand-offs (epserve/dataplane/cuda_ipc_handoff.py, issue 13): their
# kernel tests compiled, the data-plane GPU tests and the step path end to end, then — only if those
# pass — the split deployment against colocated through the gateway (bench/serve_deployed.py).
set -u
R=${OUT:-/tmp/callk_out}
W=/tmp/callk_work
mkdir -p "$R"
source bench/gpu/device_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$W/gpu.txt"
# alone first: this pytest process must hold no CUDA context while epserve up's MPS daemon serves
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 90 tests/e2e/test_step_path.py \
    > "$W/tests_step.txt" 2>&1; STEP=$?; echo "step tests exit $STEP" >> "$W/tests_step.txt"
timeout 90 python3 -m pytest -q -p no:cacheprovider --timeout 80 tests/epserve/dataplane/test_cuda_ipc_handoff.py \
    tests/kernels/test_local_slots.py tests/epserve/dataplane/test_dataplane_cuda_ipc_gpu.py \
    > "$W/tests_units.txt" 2>&1; UNITS=$?; echo "unit tests exit $UNITS" >> "$W/tests_units.txt"
if [ $STEP -eq 0 ] && [ $UNITS -eq 0 ]; then
    timeout ${DEPLOYED_S:-210} python3 bench/serve_deployed.py --out-dir "$W/deployed" --log-dir "$W/deployed_logs" \
        --bandwidth-from bench/results/serve_gpu_h100.json --batches 1 32 128 --new-tokens 48 --modes local cuda_ipc \
        > "$W/deployed.txt" 2>&1; echo "deployed exit $?" >> "$W/deployed.txt"
fi
cp "$W"/deployed/*.json "$R"/ 2>/dev/null
tar czf "$R/all_k.tgz" -C "$W" .
cat "$W/gpu.txt"
grep -E "passed|failed|FAILED|Error|exit" "$W/tests_step.txt" "$W/tests_units.txt" | tail -14
grep -v "^RESULT" "$W/deployed.txt" 2>/dev/null | tail -12
