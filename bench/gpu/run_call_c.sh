#!/usr/bin/env bash
# Device call: GPU tests (engine criteria, the cuda_ipc step path, hybrid devices), then the deployed
# benchmark (local vs cuda_ipc with and without MPS, through the gateway). Results under $OUT.
set -u
R=${OUT:-/tmp/callc_out}
W=/tmp/callc_work
mkdir -p "$R" "$W"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$W/pip.txt" 2>&1 || echo "wheel install failed"
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
timeout ${TESTS_S:-170} python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 160 \
    tests/attention_worker/test_gpu_engine.py tests/e2e/test_step_path.py ${EXTRA_TESTS:-} > "$W/tests.txt" 2>&1
echo "tests exit $?" >> "$W/tests.txt"
timeout ${DEPLOYED_S:-330} python3 bench/serve_deployed.py --out-dir "$W/deployed" --log-dir "$W/deployed_logs" \
    --bandwidth-from bench/results/serve_gpu_h100.json --batches 1 32 128 --new-tokens 48 \
    > "$W/deployed.txt" 2>&1; echo "deployed exit $?" >> "$W/deployed.txt"
cp "$W"/deployed/*.json "$W"/deployed/*.md "$R"/ 2>/dev/null
tar czf "$R/all.tgz" -C "$W" .
grep -E "passed|failed|FAILED|Error|exit" "$W/tests.txt" | tail -12
grep -v "^RESULT" "$W/deployed.txt" | tail -16
