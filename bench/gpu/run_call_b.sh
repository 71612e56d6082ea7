#!/usr/bin/env bash
# Device call: dense GEMV A/B, GPU tests, bf16 diagnosis, serve bench with the GEMV on and off, the
# deployed cuda_ipc benchmark. Results under $OUT (≤ 8 files: JSONs + one archive).
set -u
R=${OUT:-/tmp/callb_out}
W=/tmp/callb_work
mkdir -p "$R" "$W"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$W/pip.txt" 2>&1 || echo "wheel install failed"
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
nvidia-smi --query-gpu=name,driver_version --format=csv > "$W/gpu.txt" 2>&1
timeout 60 python3 bench/gpu/dense_gemv_ab.py > "$W/gemv.txt" 2>&1; echo "gemv exit $?" >> "$W/gemv.txt"
timeout 130 python3 -m pytest -q -p no:cacheprovider -x --timeout 120 tests/kernels/test_dense_gemv.py \
    tests/attention_worker/test_gpu_engine.py > "$W/tests.txt" 2>&1; echo "tests exit $?" >> "$W/tests.txt"
timeout 90 python3 bench/gpu/diag_bf16.py > "$W/diag.txt" 2>&1; echo "diag exit $?" >> "$W/diag.txt"
timeout 110 python3 bench/serve_gpu.py --out-dir "$W/serve_on" --modes colocated --name serve_gemv_on \
    > "$W/serve_on.txt" 2>&1; echo "serve_on exit $?" >> "$W/serve_on.txt"
EPSERVE_DENSE_GEMV=0 timeout 70 python3 bench/serve_gpu.py --out-dir "$W/serve_off" --modes colocated \
    --batches 1 32 --name serve_gemv_off > "$W/serve_off.txt" 2>&1; echo "serve_off exit $?" >> "$W/serve_off.txt"
timeout ${DEPLOYED_S:-200} python3 bench/serve_deployed.py --out-dir "$W/deployed" --log-dir "$W/deployed_logs" \
    --bandwidth-from "$W/serve_on/serve_gemv_on.json" --batches 1 32 128 --new-tokens 48 \
    > "$W/deployed.txt" 2>&1; echo "deployed exit $?" >> "$W/deployed.txt"
cp "$W"/serve_on/*.json "$W"/serve_off/*.json "$W"/deployed/*.json "$R"/ 2>/dev/null
tar czf "$R/all.tgz" -C "$W" --exclude='*.safetensors' .
grep -v "^RESULT" "$W/gemv.txt" | tail -10
tail -4 "$W/tests.txt"
grep -v "^RESULT" "$W/diag.txt" | tail -12
grep "B=\|exit\|Error" "$W/serve_on.txt" "$W/serve_off.txt" | grep -v transformers
grep -v "^RESULT" "$W/deployed.txt" | tail -14
