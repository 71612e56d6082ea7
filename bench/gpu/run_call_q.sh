#!/usr/bin/env bash
# Device call Q (fourth session), one call for what matters most, each stage under its own limit:
#   1. the fused attention input (kernels/norm_qkv_rope.py) and down_ahead: kernel + engine GPU tests, then
#      the engine A/B at the batch sizes they serve (issue 12);
#   2. the cuda_ipc step path's GPU tests, two micro-batches included (issue 13);
#   3. on an H200 only: the serving table (issue 12's target machine).
# Results straight under $OUT.
set -u
R=${OUT:-/tmp/callq_out}
W=$R
mkdir -p "$R"
source bench/gpu/device_env.sh
export PYTHONPATH=$PYTHONPATH:$PWD/tests:$PWD/tests/attention_worker PYTHONFAULTHANDLER=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$W/gpu.txt"
timeout 130 python3 -m pytest -q -p no:cacheprovider --timeout 120 tests/kernels/test_norm_qkv_rope.py \
    tests/kernels/test_dense_gemv.py tests/attention_worker/test_gpu_engine.py > "$W/tests.txt" 2>&1; echo "exit $?" >> "$W/tests.txt"
timeout 120 python3 bench/gpu/engine_ab.py --batches 1 2 4 8 --new-tokens 64 --out "$W/engine_ab.json" \
    --variants unfused_input fused_input "fused_input bk512" "fused + o_proj prefetched" "fused + down_ahead" \
    "all: fused + prefetched + down_ahead" "unfused_input (again)" > "$W/engine_ab.txt" 2>&1
echo "exit $?" >> "$W/engine_ab.txt"
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 70 tests/e2e/test_step_path.py \
    > "$W/tests_step.txt" 2>&1; echo "step tests exit $?" >> "$W/tests_step.txt"
if grep -q H200 "$W/gpu.txt"; then
    OUT=/tmp/q_serve BUDGET=190 STAGES=serve bash bench/gpu/run_engine.sh > /tmp/q_serve.log 2>&1
    cp /tmp/q_serve/serve_gpu_*.json /tmp/q_serve/serve_gpu_*.md "$W"/ 2>/dev/null
    grep -v "drawing\|loading" /tmp/q_serve/serve.txt > "$W/serve.txt" 2>/dev/null
fi
cat "$W/gpu.txt"; grep -E "passed|failed|FAILED|exit" "$W/tests.txt" "$W/tests_step.txt" | tail -12
tail -9 "$W/engine_ab.txt"; tail -14 "$W/serve.txt" 2>/dev/null
