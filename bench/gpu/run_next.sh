#!/usr/bin/env bash
# The next session's first device call: what the fourth session could not run, most important first, each
# stage under its own time limit, results straight under $OUT (what ran comes back even if cut short).
#   0. down_ahead's outputs compiled on a GPU (tests/kernels/test_fused_moe.py's "ahead" cases; if they pass,
#      set "down_ahead": true in the GEMV entries of kernels/configs/S=128,D=2048,I=768,*.json: -1.7% at
#      batch 1 in engine_ab_h100_fused.json), the refusal of two micro-batches on the GPU step path, and
#      the defaults against the session's start (run_call_s.sh's A/B and serving table);
#   1. GPT-OSS's GPU mismatch (issue 17): the kernel/backend checks written for it, then the diagnostic
#      with and without PDL (bench/results/diag_gpt_oss_h100.txt is the failing baseline).
#   2. On an H200 only: the serving table (issue 12) and the DeepSeek-V3 rows (issue 17) there.
set -u
R=${OUT:-/tmp/next_out}
W=$R
mkdir -p "$R"
source bench/gpu/device_env.sh
export PYTHONPATH=$PYTHONPATH:$PWD/tests:$PWD/tests/attention_worker
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$W/gpu.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider --timeout 120 tests/kernels/test_fused_moe.py \
    "tests/e2e/test_step_path.py::test_two_micro_batches_are_refused_on_the_gpu_step_path" \
    > "$W/ahead_tests.txt" 2>&1; echo "exit $?" >> "$W/ahead_tests.txt"
OUT=$W/s SERVE=1 bash bench/gpu/run_call_s.sh > "$W/call_s.txt" 2>&1
timeout 150 python3 -m pytest -q -p no:cacheprovider --timeout 120 tests/kernels/test_rope.py \
    tests/kernels/test_paged_attention_sinks.py tests/attention_worker/test_gpu_gpt_oss.py \
    tests/attention_worker/test_gpu_gqa_families.py \
    > "$W/gpt_oss_tests.txt" 2>&1; echo "exit $?" >> "$W/gpt_oss_tests.txt"
EPSERVE_GPT_OSS_TRITON=1 timeout 60 python3 bench/gpu/diag_gpt_oss.py > "$W/diag_pdl.txt" 2>&1
EPSERVE_GPT_OSS_TRITON=1 EPSERVE_MOE_PDL=0 timeout 60 python3 bench/gpu/diag_gpt_oss.py > "$W/diag_no_pdl.txt" 2>&1
if grep -q H200 "$W/gpu.txt"; then
    OUT=$R/final SERVE_BUDGET=200 TESTS_BUDGET=1 IPC_S=1 bash bench/gpu/run_final.sh > "$W/final.txt" 2>&1
    OUT=$R/deepseek bash bench/gpu/run_call_i.sh > "$W/deepseek.txt" 2>&1
fi
grep -E "passed|failed|exit" "$W/gpt_oss_tests.txt" | tail -4
grep "rel" "$W/diag_pdl.txt" "$W/diag_no_pdl.txt" | head -8
tail -12 "$W/final.txt" "$W/deepseek.txt" 2>/dev/null
