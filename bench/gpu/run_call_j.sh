#!/usr/bin/env bash
# Device call: the DeepSeek GPU tests again (float32 runs eager), the Qwen3 serving table with this
# session's engine (colocated only; transformers' rows stand from the last full run), and the split
# deployment through epserve up (issue 13: bench/serve_deployed.py, local vs cuda_ipc). Results under $OUT.
set -u
R=${OUT:-/tmp/callj_out}
W=/tmp/callj_work
mkdir -p "$R"
source bench/gpu/device_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$W/gpu.txt"
timeout 100 python3 -m pytest -q -p no:cacheprovider --timeout 90 tests/attention_worker/test_gpu_deepseek.py \
    > "$W/tests.txt" 2>&1; echo "tests exit $?" >> "$W/tests.txt"
timeout 170 python3 bench/serve_gpu.py --modes colocated --out-dir "$W/serve" --name serve_gpu_h100_fused_merge \
    > "$W/serve.txt" 2>&1; echo "serve exit $?" >> "$W/serve.txt"
timeout 200 python3 bench/serve_deployed.py --out-dir "$W/deployed" --log-dir "$W/deployed_logs" \
    --bandwidth-from bench/results/serve_gpu_h100.json --batches 1 32 128 --new-tokens 48 --modes local cuda_ipc \
    > "$W/deployed.txt" 2>&1; echo "deployed exit $?" >> "$W/deployed.txt"
cp "$W"/serve/*.json "$W"/serve/*.md "$W"/deployed/*.json "$R"/ 2>/dev/null
tar czf "$R/all_j.tgz" -C "$W" .
cat "$W/gpu.txt"
grep -E "passed|failed|FAILED|exit" "$W/tests.txt" | tail -6
grep -v "drawing\|loading" "$W/serve.txt" | tail -12
grep -v "^RESULT" "$W/deployed.txt" | tail -14
grep -h "MPS daemon" "$W"/deployed_logs/cuda_ipc/up.log 2>/dev/null | head -2
