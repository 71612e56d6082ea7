#!/usr/bin/env bash
# Device call S (fourth session, last): this session's defaults on the GPU — the changed kernels' GPU tests,
# the engine A/B of the defaults against the step as it was before the session, and the serving table
# (colocated; transformers' rows are the earlier runs'). Results straight under $OUT.
set -u
R=${OUT:-/tmp/calls_out}
W=$R
mkdir -p "$R"
source bench/gpu/device_env.sh
export PYTHONPATH=$PYTHONPATH:$PWD/tests:$PWD/tests/attention_worker
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$W/gpu.txt"
timeout 45 python3 -m pytest -q -p no:cacheprovider --timeout 40 tests/kernels/test_norm_qkv_rope.py \
    tests/kernels/test_dense_gemv.py > "$W/tests.txt" 2>&1; echo "exit $?" >> "$W/tests.txt"
timeout 75 python3 bench/gpu/engine_ab.py --batches 1 2 --new-tokens 64 --out "$W/engine_ab.json" \
    --variants "before: three launches, cuBLAS o_proj, no down_ahead" defaults "before (again)" \
    > "$W/engine_ab.txt" 2>&1; echo "exit $?" >> "$W/engine_ab.txt"
[ "${SERVE:-1}" = 1 ] && OUT=/tmp/s_serve BUDGET=150 STAGES=serve SERVE_ARGS="--modes colocated --batches 1 32 128 --name serve_gpu_h100_fused" \
    bash bench/gpu/run_engine.sh > /tmp/s_serve.log 2>&1
cp /tmp/s_serve/serve_gpu_*.json /tmp/s_serve/serve_gpu_*.md "$W"/ 2>/dev/null
grep -v "drawing\|loading" /tmp/s_serve/serve.txt > "$W/serve.txt" 2>/dev/null
cat "$W/gpu.txt"; grep -E "passed|failed|exit" "$W/tests.txt" | tail -3; tail -7 "$W/engine_ab.txt"; tail -12 "$W/serve.txt"
