#!/usr/bin/env bash
# Device call R (fourth session, issue 13): the split deployment against colocated through the gateway
# with --num-micro-batches 1 and 2 (the step-path GPU tests ran in call Q; the fused attention input of
# issue 12 is on in all modes, the expert server's busy poll in the cuda_ipc ones).
# Results straight under $OUT (what ran comes back if the call is cut short).
set -u
R=${OUT:-/tmp/callr_out}
W=$R
mkdir -p "$R"
source bench/gpu/device_env.sh
export PYTHONFAULTHANDLER=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$W/gpu.txt"
deployed() {   # name seconds args...
    local name=$1 secs=$2; shift 2
    python3 bench/serve_deployed.py --out-dir "$W" --name "$name" --log-dir "/tmp/logs_$name" \
        --batches 1 32 128 --new-tokens 48 "$@" > "$W/$name.txt" 2>&1 &
    local pid=$!
    for _ in $(seq 1 "$secs"); do kill -0 $pid 2>/dev/null || break; sleep 1; done
    if kill -0 $pid 2>/dev/null; then
        echo "still running: SIGABRT to the workers" >> "$W/$name.txt"
        pkill -ABRT -f "epserve attention"; pkill -ABRT -f "epserve expert"; sleep 3
        kill $pid; sleep 2; pkill -9 -f serve_deployed; pkill -9 -f "epserve "
    fi
    wait $pid 2>/dev/null; echo "deployed exit $?" >> "$W/$name.txt"
}
deployed serve_deployed_mb1 200 --modes local cuda_ipc
deployed serve_deployed_mb2 130 --modes cuda_ipc --up-args --num-micro-batches 2
tar czf "$R/logs_r.tgz" -C /tmp logs_serve_deployed_mb1 logs_serve_deployed_mb2 2>/dev/null
cat "$W/gpu.txt"
grep -v "^RESULT" "$W/serve_deployed_mb1.txt" | tail -10; grep -v "^RESULT" "$W/serve_deployed_mb2.txt" | tail -6
