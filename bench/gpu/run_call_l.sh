#!/usr/bin/env bash
# Device call: the fused cuda_ipc hand-offs again (waits spin in <= 8 programs and launch their
# dependents only after the wait): the GPU step-path tests with 1 and 2 expert workers, GPT-OSS on the
# batched GPU runner (attention sinks, sliding windows), then the split deployment against colocated
# through the gateway. A deployment still running near its limit gets SIGABRT in its workers first
# (PYTHONFAULTHANDLER: their Python stacks land in their logs). Results under $OUT.
set -u
R=${OUT:-/tmp/calll_out}
W=$R        # straight under $OUT: what ran comes back even if the call is cut short
mkdir -p "$R"
source bench/gpu/device_env.sh
export PYTHONFAULTHANDLER=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$W/gpu.txt"
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 80 tests/e2e/test_step_path.py \
    > "$W/tests_step.txt" 2>&1; STEP=$?; echo "step tests exit $STEP" >> "$W/tests_step.txt"
timeout 110 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 100 ${GPT_OSS_TESTS:-} \
    > "$W/tests_gpt_oss.txt" 2>&1; echo "gpt-oss tests exit $?" >> "$W/tests_gpt_oss.txt"
python3 bench/serve_deployed.py --out-dir "$W/deployed" --log-dir "$W/deployed_logs" \
    --bandwidth-from bench/results/serve_gpu_h100.json --batches 1 32 128 --new-tokens 48 --modes local cuda_ipc \
    > "$W/deployed.txt" 2>&1 &
PID=$!
for _ in $(seq 1 ${DEPLOYED_S:-200}); do kill -0 $PID 2>/dev/null || break; sleep 1; done
if kill -0 $PID 2>/dev/null; then
    echo "still running: SIGABRT to the workers" >> "$W/deployed.txt"
    pkill -ABRT -f "epserve attention" ; pkill -ABRT -f "epserve expert"; sleep 3
    kill $PID; sleep 2; pkill -9 -f serve_deployed; pkill -9 -f "epserve "
fi
wait $PID 2>/dev/null; echo "deployed exit $?" >> "$W/deployed.txt"
tar czf "$R/logs_l.tgz" -C "$W" deployed_logs deployed pip.txt 2>/dev/null; rm -rf "$W/deployed_logs" "$W/pip.txt"
cat "$W/gpu.txt"
grep -E "passed|failed|FAILED|Error|exit" "$W/tests_step.txt" "$W/tests_gpt_oss.txt" | tail -16
grep -v "^RESULT" "$W/deployed.txt" | tail -14
