#!/usr/bin/env bash
# Device call P (fourth session): the first H200 lent since call 1. The serving table (issue 12) and the
# DeepSeek-V3 rows (issue 17) on it, and the fused attention-input kernel's GPU tests. Results under $OUT.
set -u
R=${OUT:-/tmp/callp_out}
W=$R
mkdir -p "$R"
source bench/gpu/device_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$W/gpu.txt"
case "$(cat "$W/gpu.txt")" in *H200*) LAYERS=4; CARD=h200 ;; *) LAYERS=3; CARD=h100 ;; esac
timeout 90 python3 -m pytest -q -p no:cacheprovider --timeout 80 tests/kernels/test_norm_qkv_rope.py \
    > "$W/norm_qkv_tests.txt" 2>&1; echo "exit $?" >> "$W/norm_qkv_tests.txt"
OUT=/tmp/p_serve BUDGET=250 STAGES=serve bash bench/gpu/run_engine.sh > /tmp/p_serve.log 2>&1
cp /tmp/p_serve/serve_gpu_*.json /tmp/p_serve/serve_gpu_*.md /tmp/p_serve/serve.txt "$W"/ 2>/dev/null
timeout 170 python3 bench/serve_gpu.py --model deepseek-v3 --layers $LAYERS --out-dir /tmp/p_ds \
    --name serve_gpu_deepseek_v3_$CARD > /tmp/p_ds.txt 2>&1; echo "serve exit $?" >> /tmp/p_ds.txt
tar czf "$W/deepseek.tgz" -C /tmp p_ds p_ds.txt 2>/dev/null
cat "$W/gpu.txt"; tail -3 "$W/norm_qkv_tests.txt"
grep -v "drawing\|loading" "$W/serve.txt" | tail -16
grep -v "drawing\|loading" /tmp/p_ds.txt | tail -8
