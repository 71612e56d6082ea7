#!/usr/bin/env bash
# Device call: the split deployment on one GPU through the gateway (local vs cuda_ipc with and without
# MPS), then the GPU tests of the step path and hybrid devices. Results under $OUT.
set -u
R=${OUT:-/tmp/calld_out}
W=/tmp/calld_work
mkdir -p "$R"
source bench/gpu/device_env.sh
timeout ${DEPLOYED_S:-300} python3 bench/serve_deployed.py --out-dir "$W/deployed" --log-dir "$W/deployed_logs" \
    --bandwidth-from bench/results/serve_gpu_h100.json --batches 1 32 128 --new-tokens 48 --modes ${MODES:-local cuda_ipc cuda_ipc_no_mps} \
    > "$W/deployed.txt" 2>&1; echo "deployed exit $?" >> "$W/deployed.txt"
cp "$W"/deployed/*.json "$R"/ 2>/dev/null
timeout ${TESTS_S:-150} python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 140 \
    tests/e2e/test_step_path.py ${EXTRA_TESTS:-} > "$W/tests.txt" 2>&1
echo "tests exit $?" >> "$W/tests.txt"
tar czf "$R/all.tgz" -C "$W" .
grep -v "^RESULT" "$W/deployed.txt" | tail -16
grep -E "passed|failed|FAILED|Error|exit" "$W/tests.txt" | tail -12
