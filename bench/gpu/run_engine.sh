#!/usr/bin/env bash
# One device call for the GPU engine: GPU tests, attention kernel benchmark, end-to-end serve benchmark.
# Run from the repo root on the GPU machine, carrying .whl (opentelemetry etc., missing there).
# Env: OUT (results), BUDGET (seconds), STAGES (subset of "tests attn profile serve"), SERVE_ARGS, TESTS,
# PROFILE_ARGS.
set -u
START=$SECONDS
BUDGET=${BUDGET:-580}
OUT=${OUT:-/tmp/engine_out}
STAGES=${STAGES:-"tests attn serve"}
mkdir -p "$OUT"
left() { echo $(( BUDGET - (SECONDS - START) )); }
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        > "$OUT/pip.txt" 2>&1 || echo "wheel install failed (see pip.txt)"
fi
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
LOG=$OUT/log.txt
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,memory.used,clocks_event_reasons.active \
    --format=csv -lms 1000 > "$OUT/smi.csv" 2>&1 &
SMI=$!
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total,power.limit --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$LOG" 2>&1
case " $STAGES " in *" tests "*)
    echo "--- tests ($(left)s left)" >> "$LOG"
    timeout "${TESTS_S:-200}" python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 300 \
        ${TESTS:-tests/kernels/test_paged_attention.py tests/kernels/test_rope.py tests/kernels/test_rms_norm.py tests/kernels/test_sampling.py tests/kernels/test_moe_router.py tests/attention_worker/test_gpu_engine.py tests/epserve/test_dummy_weights.py tests/e2e/test_colocated_serving.py} > "$OUT/tests.txt" 2>&1
    echo "tests exit $?" >> "$LOG"; grep -E "passed|failed|FAILED|Error" "$OUT/tests.txt" | tail -30 >> "$LOG" ;;
esac
case " $STAGES " in *" attn "*)
    echo "--- attention kernels ($(left)s left)" >> "$LOG"
    timeout "${ATTN_S:-90}" python3 bench/gpu/attention_kernels.py --out "$OUT/attention_kernels.json" ${ATTN_ARGS:-} \
        > "$OUT/attn.txt" 2>&1
    echo "attention exit $?" >> "$LOG"; tail -25 "$OUT/attn.txt" >> "$LOG" ;;
esac
case " $STAGES " in *" profile "*)
    echo "--- profile ($(left)s left)" >> "$LOG"
    timeout "${PROFILE_S:-150}" python3 bench/gpu/profile_decode.py --out "$OUT/profile.json" ${PROFILE_ARGS:-} \
        > "$OUT/profile.txt" 2>&1
    echo "profile exit $?" >> "$LOG"; grep -v "drawing\|loading" "$OUT/profile.txt" | tail -90 >> "$LOG" ;;
esac
case " $STAGES " in *" serve "*)
    echo "--- serve ($(left)s left)" >> "$LOG"
    timeout "$(( $(left) - 10 ))" python3 bench/serve_gpu.py --out-dir "$OUT" ${SERVE_ARGS:-} > "$OUT/serve.txt" 2>&1
    echo "serve exit $?" >> "$LOG"; grep -v "drawing\|loading" "$OUT/serve.txt" | tail -30 >> "$LOG" ;;
esac
kill $SMI 2>/dev/null
cat "$LOG"
(cd "$OUT" && tar czf logs.tgz ./*.txt smi.csv 2>/dev/null)
