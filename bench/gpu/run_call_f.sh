#!/usr/bin/env bash
# Device call: the split deployment as users start it (epserve up --mps auto starts the MPS daemon),
# with the fused local-slot kernel and the single-worker receive; tokens against colocated, then the
# deployed benchmark. Results under $OUT.
set -u
R=${OUT:-/tmp/callf_out}
W=/tmp/callf_work
mkdir -p "$R"
source bench/gpu/device_env.sh
# alone first: this pytest process must hold no CUDA context while epserve up's MPS daemon serves
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 90 tests/e2e/test_step_path.py \
    > "$W/tests_step.txt" 2>&1; echo "step tests exit $?" >> "$W/tests_step.txt"
timeout 60 python3 -m pytest -q -p no:cacheprovider --timeout 50 tests/kernels/test_local_slots.py \
    tests/epserve/dataplane/test_dataplane_cuda_ipc_gpu.py > "$W/tests_units.txt" 2>&1
echo "unit tests exit $?" >> "$W/tests_units.txt"
timeout ${DEPLOYED_S:-170} python3 bench/serve_deployed.py --out-dir "$W/deployed" --log-dir "$W/deployed_logs" \
    --bandwidth-from bench/results/serve_gpu_h100.json --batches 1 32 128 --new-tokens 48 --modes local cuda_ipc \
    > "$W/deployed.txt" 2>&1; echo "deployed exit $?" >> "$W/deployed.txt"
cp "$W"/deployed/*.json "$R"/ 2>/dev/null
tar czf "$R/all.tgz" -C "$W" .
grep -E "passed|failed|FAILED|Error|exit" "$W/tests_step.txt" "$W/tests_units.txt" | tail -12
grep -v "^RESULT" "$W/deployed.txt" | tail -12
grep -h "MPS daemon" "$W"/deployed_logs/cuda_ipc/up.log | head -2
