#!/usr/bin/env bash
# Device call T (fifth session): the overlap schedule on a GPU, and what the fourth session could not run.
#   1. GPU tests: the engine's (overlap on by default: parity, graph replay, the overlap test), the fused-MoE
#      kernels' including down_ahead's compiled outputs ("ahead" cases), the fused input and o_proj GEMV, the
#      refusal of two micro-batches on the GPU step path;
#   2. engine A/B, overlap schedule on and off: the step before the fourth session, the defaults, + down_ahead;
#   3. the serving table (colocated, --overlap-ab: each batch with and without the overlap schedule).
# Results straight under $OUT.
set -u
W=${OUT:-/tmp/t_out}
source bench/gpu/device_env.sh
timeout 230 python3 -m pytest -q -p no:cacheprovider --timeout 150 tests/attention_worker/test_gpu_engine.py \
    tests/kernels/test_fused_moe.py tests/kernels/test_norm_qkv_rope.py tests/kernels/test_dense_gemv.py \
    "tests/e2e/test_step_path.py::test_two_micro_batches_are_refused_on_the_gpu_step_path" \
    > "$W/tests.txt" 2>&1; echo "exit $?" >> "$W/tests.txt"
timeout 120 python3 bench/gpu/engine_ab.py --batches 1 2 --new-tokens 64 --out "$W/engine_ab.json" --overlap both \
    --variants "before: three launches, cuBLAS o_proj, no down_ahead" defaults "defaults + down_ahead" \
    > "$W/engine_ab.txt" 2>&1; echo "exit $?" >> "$W/engine_ab.txt"
OUT=/tmp/t_serve BUDGET=200 STAGES=serve SERVE_ARGS="--modes colocated --overlap-ab --batches 1 32 128 256 --name serve_gpu_overlap" \
    bash bench/gpu/run_engine.sh > /tmp/t_serve.log 2>&1
cp /tmp/t_serve/serve_gpu_*.json /tmp/t_serve/serve_gpu_*.md "$W"/ 2>/dev/null
grep -v "drawing\|loading" /tmp/t_serve/serve.txt > "$W/serve.txt" 2>/dev/null
cat "$W/gpu.txt"; grep -E "passed|failed|exit|Error" "$W/tests.txt" | tail -8; tail -9 "$W/engine_ab.txt"; tail -16 "$W/serve.txt"
