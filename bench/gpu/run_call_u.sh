#!/usr/bin/env bash
# Device call U (fifth session): the split deployment on one GPU (issue 13). serve_gpu.py --modes cuda_ipc: the
# colocated deployment (now with the overlap schedule) and the cuda_ipc one (MPS) through their gateways; then
# the two-micro-batch capture gate's GPU tests (EPSERVE_GPU_TWO_MICRO_BATCHES=1). Results straight under $OUT.
set -u
W=${OUT:-/tmp/u_out}
source bench/gpu/device_env.sh
timeout 300 python3 bench/serve_gpu.py --out-dir "$W" --modes cuda_ipc --batches 1 32 128 --name serve_gpu_cuda_ipc \
    > "$W/serve.txt" 2>&1; echo "exit $?" >> "$W/serve.txt"
TESTS=("tests/e2e/test_step_path.py::test_two_micro_batches_on_the_gpu_step_path[1]"
       "tests/e2e/test_step_path.py::test_two_micro_batches_on_the_gpu_step_path[2]"
       "tests/e2e/test_step_path.py::test_step_path_on_one_gpu[1]" tests/epserve/dataplane/test_dataplane_cuda_ipc_gpu.py)
[ -n "${U_TESTS:-}" ] && read -r -a TESTS <<< "$U_TESTS"
timeout 260 python3 -m pytest -q -p no:cacheprovider --timeout 240 "${TESTS[@]}" \
    > "$W/tests.txt" 2>&1; echo "exit $?" >> "$W/tests.txt"
cat "$W/gpu.txt"; grep -v "drawing\|loading" "$W/serve.txt" | tail -14; grep -E "passed|failed|exit|Error" "$W/tests.txt" | tail -8
