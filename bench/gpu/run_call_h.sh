#!/usr/bin/env bash
# Device call: dense projections at decode sizes (bench/gpu/dense_gemv.py), the engine A/B (fused
# merge, projections as (W @ x.T).T), then issue 13's unvalidated GPU pieces (bench/gpu/run_call_f.sh:
# step-path tests, local-slot kernel, the deployed benchmark through epserve up --mps auto).
set -u
R=${OUT:-/tmp/callh_out}
W=/tmp/callh_work
mkdir -p "$R"
source bench/gpu/device_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$W/gpu.txt"
timeout 90 python3 bench/gpu/dense_gemv.py --out "$W/dense_gemv.json" > "$W/dense_gemv.txt" 2>&1
echo "dense_gemv exit $?" >> "$W/dense_gemv.txt"
timeout ${AB_S:-200} python3 bench/gpu/engine_ab.py --out "$W/engine_ab.json" > "$W/engine_ab.txt" 2>&1
echo "engine_ab exit $?" >> "$W/engine_ab.txt"
cp "$W"/dense_gemv.json "$W"/engine_ab.json "$R"/ 2>/dev/null
OUT=$R/f bash bench/gpu/run_call_f.sh > "$W/call_f.txt" 2>&1
tar czf "$R/all_h.tgz" -C "$W" .
cat "$W/gpu.txt"
grep -E "o_proj|qkv" "$W/dense_gemv.txt" | grep -E "M=  1|M=  2|M=  8" ; tail -1 "$W/dense_gemv.txt"
tail -7 "$W/engine_ab.txt"
cat "$W/call_f.txt" | tail -20
