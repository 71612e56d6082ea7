#!/usr/bin/env bash
# Device call Q (fourth session): the fused attention input (kernels/norm_qkv_rope.py) on the GPU — its
# kernel tests, the engine's GPU parity tests that now run through it, and its A/B in the engine at the
# sizes it serves — then the serving table (issue 12) on whatever card this is. Results under $OUT.
set -u
R=${OUT:-/tmp/callq_out}
W=$R
mkdir -p "$R"
source bench/gpu/device_env.sh
export PYTHONPATH=$PYTHONPATH:$PWD/tests:$PWD/tests/attention_worker
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$W/gpu.txt"
timeout 170 python3 -m pytest -q -p no:cacheprovider --timeout 160 tests/kernels/test_norm_qkv_rope.py \
    tests/attention_worker/test_gpu_engine.py tests/attention_worker/test_batched_runner.py \
    > "$W/tests.txt" 2>&1; echo "exit $?" >> "$W/tests.txt"
timeout 150 python3 bench/gpu/engine_ab.py --batches 1 2 4 8 --out "$W/engine_ab.json" > "$W/engine_ab.txt" 2>&1
echo "exit $?" >> "$W/engine_ab.txt"
OUT=/tmp/q_serve BUDGET=240 STAGES=serve bash bench/gpu/run_engine.sh > /tmp/q_serve.log 2>&1
cp /tmp/q_serve/serve_gpu_*.json /tmp/q_serve/serve_gpu_*.md "$W"/ 2>/dev/null
grep -v "drawing\|loading" /tmp/q_serve/serve.txt > "$W/serve.txt" 2>/dev/null
cat "$W/gpu.txt"; grep -E "passed|failed|FAILED|exit" "$W/tests.txt" | tail -8
tail -9 "$W/engine_ab.txt"; tail -16 "$W/serve.txt"
