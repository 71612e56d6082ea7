#!/usr/bin/env bash
# Device call (H100): which fused-MoE table serves best — the H200's (the stand-in), the heuristic
# default, or one tuned here (seeded from the H200's, re-tuned at the decode sizes) — end to end in
# bench/serve_gpu.py; then the GPU tests. Results under $OUT.
set -u
R=${OUT:-/tmp/callc_out}
W=/tmp/callc_work
mkdir -p "$R"
source bench/gpu/device_env.sh
DEV=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
H200=kernels/configs/S=128,D=2048,I=768,device=NVIDIA_H200.json
OWN="kernels/configs/S=128,D=2048,I=768,device=$DEV.json"
serve() {  # name, extra args
    timeout 100 python3 bench/serve_gpu.py --out-dir "$W/$1" --modes colocated --name "$1" "${@:2}" > "$W/$1.txt" 2>&1
    echo "$1 exit $?" >> "$W/$1.txt"
}
serve serve_standin
mv "$H200" /tmp/h200_table.json && serve serve_default && mv /tmp/h200_table.json "$H200"
cp "$H200" "$OWN"
timeout ${TUNE_S:-230} python3 bench/gpu/tune_moe.py --out "$W/tune.json" --models Qwen3-30B-A3B --merge \
    --tokens 1 32 128 256 --budget-s ${TUNE_BUDGET:-130} > "$W/tune.txt" 2>&1; echo "tune exit $?" >> "$W/tune.txt"
cp "$OWN" "$R/" 2>/dev/null
serve serve_tuned
timeout ${TESTS_S:-150} python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 140 \
    tests/attention_worker/test_gpu_engine.py tests/kernels/test_fused_moe.py ${EXTRA_TESTS:-} > "$W/tests.txt" 2>&1
echo "tests exit $?" >> "$W/tests.txt"
cp "$W"/serve_*/*.json "$R"/ 2>/dev/null
tar czf "$R/all.tgz" -C "$W" .
for f in serve_standin serve_default serve_tuned; do grep -h "B=\|TTFT\|exit" "$W/$f.txt"; done
grep -E "T=|best|FAILED|wrote|exit" "$W/tune.txt" | tail -12
grep -E "passed|failed|FAILED|Error|exit" "$W/tests.txt" | tail -12
