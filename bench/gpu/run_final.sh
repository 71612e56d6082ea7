#!/usr/bin/env bash
# One device call, most important first: the end-to-end serve benchmark, the GPU tests, the cuda_ipc
# hand-off benchmark. Each stage in its own folder; everything comes back as one archive plus the
# result JSONs (at most 8 files come back from a call).
set -u
R=${OUT:-/tmp/final_out}
W=/tmp/final_work
mkdir -p "$R" "$W/serve" "$W/tests" "$W/ipc"
OUT=$W/serve BUDGET=${SERVE_BUDGET:-240} STAGES=serve bash bench/gpu/run_engine.sh > "$W/serve.log" 2>&1
OUT=$W/tests BUDGET=${TESTS_BUDGET:-180} TESTS_S=170 STAGES=tests \
    TESTS="${TESTS:-tests/kernels/test_paged_attention.py tests/kernels/test_rope.py tests/kernels/test_rms_norm.py tests/kernels/test_sampling.py tests/kernels/test_moe_router.py tests/attention_worker/test_gpu_engine.py tests/attention_worker/test_logprobs.py tests/epserve/test_dummy_weights.py tests/epserve/dataplane/test_dataplane_cuda_ipc_gpu.py tests/e2e/test_colocated_serving.py tests/e2e/test_step_path.py}" \
    bash bench/gpu/run_engine.sh > "$W/tests.log" 2>&1
PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 timeout "${IPC_S:-110}" python3 bench/gpu/ipc_handoff.py \
    --out "$W/ipc/ipc_handoff.json" > "$W/ipc/ipc.txt" 2>&1
echo "ipc exit $?" >> "$W/ipc/ipc.txt"
cp "$W"/serve/serve_gpu_h200.json "$W"/serve/serve_gpu_h200.table.md "$W"/ipc/ipc_handoff.json "$R"/ 2>/dev/null
tar czf "$R/all.tgz" -C "$W" .
grep -v "drawing\|loading" "$W/serve/serve.txt" | tail -25
grep -E "passed|failed|FAILED" "$W/tests/tests.txt" | tail -12
tail -25 "$W/ipc/ipc.txt"
