#!/usr/bin/env bash
# Device call: the fused split-KV merge and the L2 weight prefetch (issue 12, batch 1): kernel tests
# on the GPU, the engine A/B (bench/gpu/engine_ab.py), then the GPU engine tests. Results under $OUT.
set -u
R=${OUT:-/tmp/callg_out}
W=/tmp/callg_work
mkdir -p "$R"
source bench/gpu/device_env.sh
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader > "$W/gpu.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider --timeout 110 tests/kernels/test_paged_attention.py \
    tests/kernels/test_l2_prefetch.py tests/kernels/test_moe_router.py tests/kernels/test_fused_moe.py \
    > "$W/tests_kernels.txt" 2>&1; echo "kernel tests exit $?" >> "$W/tests_kernels.txt"
timeout ${AB_S:-300} python3 bench/gpu/engine_ab.py --out "$W/engine_ab.json" ${AB_ARGS:-} \
    > "$W/engine_ab.txt" 2>&1; echo "engine_ab exit $?" >> "$W/engine_ab.txt"
timeout ${ENGINE_TESTS_S:-150} python3 -m pytest -q -p no:cacheprovider --timeout 140 \
    tests/attention_worker/test_gpu_engine.py > "$W/tests_engine.txt" 2>&1
echo "engine tests exit $?" >> "$W/tests_engine.txt"
cp "$W"/engine_ab.json "$R"/ 2>/dev/null
tar czf "$R/all.tgz" -C "$W" .
cat "$W/gpu.txt"
grep -E "passed|failed|FAILED|Error|exit" "$W/tests_kernels.txt" | tail -8
tail -14 "$W/engine_ab.txt"
grep -E "passed|failed|FAILED|exit" "$W/tests_engine.txt" | tail -8
