#!/usr/bin/env bash
# Smoke test of the container deployment: build the image, `up` the compose stack, generate
# through the gateway's published port, check the answer against the colocated engine on the
# same model, tear everything down.
#
# Usage (repository root, after `bash scripts/setup.sh` made .venv):  bash compose/smoke.sh
#
#   1. Docker: reuses a running daemon; else (root) installs docker.io, docker-compose and
#      debootstrap with apt-get when missing and starts `dockerd --iptables=false
#      --bridge=none` (compose's own network needs neither), stopped again at the end.
#   2. Base image epserve-base:bookworm by debootstrap (compose/base-image.sh; no registry
#      is reachable here), reused when present.
#   3. The CPU torch wheel into compose/local/ (pip download: on these machines pip finds
#      it on local disk) and the host's extra CA certificates; `docker-compose build`.
#   4. Beside the build: the same tiny model on the host (same command and seed as the
#      image; the files must be byte-identical) and the colocated engine's completions.
#   5. `up -d`, wait until all seven services are healthy, two concurrent Generate calls
#      through 127.0.0.1:<free port> (so both attention workers serve one), compare with
#      step 4; the first prompt again through the `smg` service's OpenAI API
#      (/v1/completions on another free port), compared with step 4 too; `down -v`.
#
# Exit status: 0 when it all passed, or when no Docker daemon can be started at all (no
# permission, no kernel support): then it prints a line starting "SMOKE SKIPPED:". Any other
# failure exits non-zero with the stack's state and logs on stderr. Every wait has a deadline;
# SIGTERM/SIGINT stop the current step at once and still tear down.
# EPSERVE_SMOKE_KEEP=1 leaves the stack (and a daemon it started) running for a look.
set -euo pipefail
cd "$(dirname "$0")/.."

PROJECT=epserve-smoke
TORCH_VERSION=${EPSERVE_TORCH_VERSION:-2.13.0}
MODEL_SEED=0
MAX_NEW_TOKENS=8
PROMPTS=("The quick brown fox" "Mixture of experts")
SERVICES=(placement expert-0 expert-1 attention-0 attention-1 gateway smg)  # docker-compose.yml
# Debian's client first: /usr/local/bin/docker (28.x, no buildx) fails to build with BuildKit.
export PATH=/usr/bin:/usr/sbin:$PATH
export DOCKER=docker DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0 EPSERVE_DEVICE=cpu
IMAGE=epserve:$EPSERVE_DEVICE
KEEP=${EPSERVE_SMOKE_KEEP:-0}

t0=$(date +%s)
# fds 3 and 4: the script's own stderr and stdout, also from inside a redirected command
# (a trap that fires during `run ... >file` would otherwise write into that file).
exec 3>&2 4>&1
log() { printf '[smoke %3ds] %s\n' "$(($(date +%s) - t0))" "$*" >&3; }
die() { log "FAILED: $*"; exit 1; }
skip() { echo "SMOKE SKIPPED: $*" >&4; exit 0; }

[ -x .venv/bin/python ] || die ".venv missing: run 'bash scripts/setup.sh' first"
work=$(mktemp -d "${TMPDIR:-/tmp}/epserve-smoke.XXXXXX")
started_dockerd=""
compose=()
background=()  # pids to stop on exit

# run SECONDS CMD...: CMD under a deadline, in the background so that a signal to this script
# is handled at once (bash defers traps until a foreground command ends).
current=""
run() {
    local seconds=$1 status=0
    shift
    timeout "$seconds" "$@" &
    current=$!
    wait "$current" || status=$?
    current=""
    return "$status"
}

cleanup() {
    local status=$?
    set +e
    # A second signal must not cut the teardown short (a handler, not '': children would
    # inherit an ignored signal).
    trap 'log "tearing down; signal ignored"' INT TERM
    [ -n "$current" ] && kill "$current" 2>/dev/null
    for pid in "${background[@]}"; do kill "$pid" 2>/dev/null; done
    if [ "${#compose[@]}" -gt 0 ] && [ "$KEEP" != 1 ]; then
        timeout 90 "${compose[@]}" down -v -t 10 >"$work/down.log" 2>&1 \
            || { log "compose down failed:"; tail -n 20 "$work/down.log" >&3; }
    fi
    if [ -n "$started_dockerd" ] && [ "$KEEP" != 1 ]; then
        kill "$started_dockerd" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$started_dockerd" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$started_dockerd" 2>/dev/null; then
            log "dockerd did not stop within 30 s; killing it"
            kill -9 "$started_dockerd"
        fi
        log "stopped the Docker daemon it started"
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- 1. Docker --------------------------------------------------------------------------
daemon_up() { timeout 10 docker info >/dev/null 2>&1; }

apt_install() {
    run 300 env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "$@" >>"$work/apt.log" 2>&1 || { tail -n 20 "$work/apt.log" >&2; die "apt-get install $* failed"; }
}

rootfs_pid=""  # a debootstrap for the base image, run while Docker installs
install_tools() {  # apt packages for whatever is missing
    local missing=()
    command -v dockerd >/dev/null && [ -x /usr/bin/docker ] || missing+=(docker.io)
    command -v docker-compose >/dev/null || missing+=(docker-compose)
    [ "${#missing[@]}" -eq 0 ] && command -v debootstrap >/dev/null && return 0
    command -v apt-get >/dev/null || skip "needs ${missing[*]} debootstrap and there is no apt-get to install them"
    log "installing ${missing[*]} debootstrap"
    run 180 apt-get update -qq >"$work/apt.log" 2>&1 \
        || { tail -n 20 "$work/apt.log" >&2; die "apt-get update failed"; }
    command -v debootstrap >/dev/null || apt_install debootstrap
    if [[ " ${missing[*]} " == *" docker.io "* ]]; then
        # No Docker yet, so most likely no base image either: start on it now.
        timeout 600 bash compose/base-image.sh --rootfs "$work/rootfs" >"$work/rootfs.log" 2>&1 &
        rootfs_pid=$!
        background+=("$rootfs_pid")
    fi
    [ "${#missing[@]}" -eq 0 ] || apt_install "${missing[@]}"
}

start_dockerd() {  # overlay2 (fast, small), else vfs (works on any filesystem)
    local driver
    for driver in overlay2 vfs; do
        # Own session: a signal to this script's process group must not reach the daemon
        # before `compose down` has used it; cleanup stops it.
        setsid dockerd --storage-driver="$driver" --iptables=false --bridge=none \
            >"$work/dockerd-$driver.log" 2>&1 &
        started_dockerd=$!
        for _ in $(seq 60); do
            daemon_up && { log "started dockerd (pid $started_dockerd, $driver)"; return 0; }
            kill -0 "$started_dockerd" 2>/dev/null || break
            sleep 0.5
        done
        kill "$started_dockerd" 2>/dev/null && wait "$started_dockerd" 2>/dev/null
        started_dockerd=""
        log "dockerd with $driver did not start: $(tail -n 1 "$work/dockerd-$driver.log")"
    done
    return 1
}

if [ "$(id -u)" -ne 0 ]; then
    command -v docker >/dev/null && daemon_up || skip "not root and no Docker daemon this user can reach"
    command -v docker-compose >/dev/null || skip "not root and docker-compose is not installed"
else
    install_tools
    if daemon_up; then
        log "using the running Docker daemon"
    elif ! start_dockerd; then
        for f in "$work"/dockerd-*.log; do log "--- $f"; tail -n 5 "$f" >&2; done
        skip "no Docker daemon can be started here (see the dockerd logs above)"
    fi
fi
compose=(docker-compose -p "$PROJECT" -f compose/docker-compose.yml)

# --- 2. Base image ----------------------------------------------------------------------
if [ -n "$rootfs_pid" ]; then
    if docker image inspect epserve-base:bookworm >/dev/null 2>&1; then
        kill "$rootfs_pid" 2>/dev/null || true
    else
        log "waiting for the base image's debootstrap"
        wait "$rootfs_pid" || { tail -n 30 "$work/rootfs.log" >&2; die "debootstrap of the base image"; }
    fi
fi
run 600 bash compose/base-image.sh epserve-base:bookworm "$work/rootfs" || die "base image"

# --- 3. Build-context extras ------------------------------------------------------------
if ! ls compose/local/torch-"$TORCH_VERSION"+cpu-*.whl >/dev/null 2>&1; then
    platforms=()
    for tag in manylinux_2_28 manylinux_2_17 manylinux2014; do platforms+=(--platform "${tag}_x86_64"); done
    run 600 .venv/bin/python -m pip download -q --no-deps --only-binary=:all: "${platforms[@]}" \
        --python-version 3.11 --implementation cp --abi cp311 -d "$work/wheel" "torch==$TORCH_VERSION" \
        || die "pip download torch==$TORCH_VERSION failed"
    wheel=$(ls "$work"/wheel/torch-*.whl)
    case "$wheel" in
        *+cpu-*) mv "$wheel" compose/local/ ;;
        *) die "pip found $(basename "$wheel"), not a CPU build: put torch-$TORCH_VERSION+cpu-cp311-*.whl into compose/local/" ;;
    esac
fi
for crt in /usr/local/share/ca-certificates/*.crt; do
    [ -f "$crt" ] || continue
    cmp -s "$crt" "compose/local/$(basename "$crt")" || cp "$crt" compose/local/
done

# --- 4. Reference on the host, beside the build -----------------------------------------
reference() {
    .venv/bin/epserve --log-level WARNING make-tiny-model "$work/model" --arch qwen3_moe \
        --seed "$MODEL_SEED" || return 1
    (cd "$work/model" && sha256sum -- * | sort -k 2) >"$work/model-host.sum"
    local i pids=()
    for i in "${!PROMPTS[@]}"; do
        timeout 300 .venv/bin/epserve generate --model-path "$work/model" --dtype float32 \
            --prompt "${PROMPTS[$i]}" --max-new-tokens "$MAX_NEW_TOKENS" --temperature 0 \
            >"$work/expected-$i" &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i" || return 1; done
}
reference >"$work/reference.log" 2>&1 &
reference_pid=$!
background+=("$reference_pid")

log "building $IMAGE"
run 900 "${compose[@]}" build >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; die "image build"; }
log "built $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}'))"

wait "$reference_pid" || { tail -n 30 "$work/reference.log" >&2; die "reference model or colocated generate on the host"; }
run 120 docker run --rm "$IMAGE" sh -c 'cd /models/tiny && sha256sum -- * | sort -k 2' >"$work/model-image.sum" \
    || die "cannot list the image's model"
diff "$work/model-host.sum" "$work/model-image.sum" >&2 \
    || die "the image's /models/tiny differs from 'epserve make-tiny-model --seed $MODEL_SEED' on the host"
log "image model = host model; the colocated engine's completions are ready"

# --- 5. The stack ----------------------------------------------------------------------
show_stack() {
    timeout 60 "${compose[@]}" ps >&2 || true
    timeout 60 "${compose[@]}" logs --no-color --tail 60 >&2 || true
}
port=$(.venv/bin/python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
export EPSERVE_GATEWAY_PORT=$port
openai_port=$(.venv/bin/python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
export EPSERVE_OPENAI_PORT=$openai_port
run 90 "${compose[@]}" down -v -t 5 >/dev/null 2>&1 || true  # leftovers of an interrupted run
log "compose up (gateway published on 127.0.0.1:$port)"
run 300 "${compose[@]}" up -d >"$work/up.log" 2>&1 || { cat "$work/up.log" >&2; show_stack; die "compose up"; }

ids=$(timeout 60 "${compose[@]}" ps -q)
deadline=$(($(date +%s) + 240))
while :; do
    states=$(timeout 30 docker inspect -f \
        '{{index .Config.Labels "com.docker.compose.service"}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' \
        $ids) || { show_stack; die "cannot inspect the stack's containers"; }
    unhealthy=""
    for service in "${SERVICES[@]}"; do
        read -r _ status health <<<"$(grep "^$service " <<<"$states" || echo "$service missing")"
        case "$status $health" in
            "running healthy") ;;
            running*) unhealthy="$unhealthy $service(${health:-no health check})" ;;
            *) show_stack; die "service $service is $status" ;;
        esac
    done
    [ -z "$unhealthy" ] && break
    [ "$(date +%s)" -lt "$deadline" ] || { show_stack; die "not healthy within 240 s:$unhealthy"; }
    sleep 1
done
log "all ${#SERVICES[@]} services healthy"

pids=()
for i in "${!PROMPTS[@]}"; do
    timeout 120 .venv/bin/epserve generate --gateway "127.0.0.1:$port" --prompt "${PROMPTS[$i]}" \
        --max-new-tokens "$MAX_NEW_TOKENS" --temperature 0 --timeout 100 >"$work/got-$i" 2>"$work/got-$i.log" &
    pids+=($!)
    background+=($!)
done
failed=""
for i in "${!PROMPTS[@]}"; do
    if ! wait "${pids[$i]}"; then
        cat "$work/got-$i.log" >&2
        failed="$failed generate('${PROMPTS[$i]}') through the gateway failed;"
    elif ! cmp -s "$work/expected-$i" "$work/got-$i"; then
        failed="$failed '${PROMPTS[$i]}': gateway $(printf '%q' "$(cat "$work/got-$i")"), colocated engine $(printf '%q' "$(cat "$work/expected-$i")");"
    else
        log "'${PROMPTS[$i]}' -> $(printf '%q' "$(cat "$work/got-$i")") (same as the colocated engine)"
    fi
done
[ -z "$failed" ] || { show_stack; die "$failed"; }

# The OpenAI API through SGLang's model gateway (the smg service) in front of the gateway.
if ! timeout 120 .venv/bin/python - "$openai_port" "${PROMPTS[0]}" "$MAX_NEW_TOKENS" >"$work/openai-0" \
        2>"$work/openai-0.log" <<'PY'
import json, sys, urllib.request
port, prompt, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
with urllib.request.urlopen(request, timeout=100) as response:
    sys.stdout.write(json.load(response)["choices"][0]["text"])
PY
then
    cat "$work/openai-0.log" >&2; show_stack; die "/v1/completions through the smg service failed"
fi
# SMG holds back a trailing incomplete UTF-8 sequence where epserve's detokenizer ends with U+FFFD.
.venv/bin/python -c "import sys; a, b = (open(f, encoding='utf-8').read().rstrip('\ufffd') for f in sys.argv[1:]); \
sys.exit(a != b)" "$work/expected-0" "$work/openai-0" || { show_stack; die "'${PROMPTS[0]}' through smg: \
$(printf '%q' "$(cat "$work/openai-0")"), colocated engine $(printf '%q' "$(cat "$work/expected-0")")"; }
log "'${PROMPTS[0]}' through smg's /v1/completions (127.0.0.1:$openai_port) -> same text"

log "PASSED"
