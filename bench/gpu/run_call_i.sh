#!/usr/bin/env bash
# Device call: DeepSeek-V3 on the GPU (issue 17): the MLA kernels and the tiny V3/V2 against
# transformers (tests marked gpu), the MLA kernel timings, the serving benchmark's DeepSeek-V3 row
# (dummy weights, fewer layers: 4 on an H200, 3 on an H100's 80 GB) and the MoE kernels' DeepSeek-V3
# whole-layer shape. Results under $OUT.
set -u
R=${OUT:-/tmp/calli_out}
W=/tmp/calli_work
mkdir -p "$R"
source bench/gpu/device_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$W/gpu.txt"
case "$(cat "$W/gpu.txt")" in *H200*) LAYERS=4; CARD=h200 ;; *) LAYERS=3; CARD=h100 ;; esac
timeout 170 python3 -m pytest -q -p no:cacheprovider --timeout 160 tests/kernels/test_mla_attention.py \
    tests/attention_worker/test_gpu_deepseek.py > "$W/tests.txt" 2>&1; echo "tests exit $?" >> "$W/tests.txt"
timeout 60 python3 bench/gpu/mla_kernels.py --out "$W/mla_kernels_$CARD.json" > "$W/mla_kernels.txt" 2>&1
echo "mla_kernels exit $?" >> "$W/mla_kernels.txt"
timeout 170 python3 bench/serve_gpu.py --model deepseek-v3 --layers $LAYERS --out-dir "$W/serve" \
    --name serve_gpu_deepseek_v3_$CARD > "$W/serve.txt" 2>&1; echo "serve exit $?" >> "$W/serve.txt"
timeout 110 python3 bench/moe_kernels.py --models DeepSeek-V3 --tokens 1 16 64 256 1024 4096 --backends triton torch \
    --out-dir "$W/moe" --name moe_kernels_deepseek_v3_$CARD > "$W/moe.txt" 2>&1; echo "moe exit $?" >> "$W/moe.txt"
cp "$W"/mla_kernels_*.json "$W"/serve/*.json "$W"/serve/*.md "$W"/moe/*.json "$W"/moe/*.md "$R"/ 2>/dev/null
tar czf "$R/all_i.tgz" -C "$W" .
cat "$W/gpu.txt"
grep -E "passed|failed|FAILED|exit" "$W/tests.txt" | tail -12
tail -12 "$W/mla_kernels.txt"
grep -v "drawing\|loading" "$W/serve.txt" | tail -10
tail -14 "$W/moe.txt"
