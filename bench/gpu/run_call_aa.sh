#!/usr/bin/env bash
# Device call AA (sixth session's work, for the next session with a GPU; issue 13): the step path with the
# overlap schedule. serve_gpu.py --modes cuda_ipc --overlap-ab: the colocated deployment, the cuda_ipc one (MPS)
# with the overlap schedule, and the cuda_ipc one again with --disable-overlap-schedule (the before), all
# through their gateways; then the step path's GPU tests (one and two expert workers, the data plane's GPU
# tests, an expert worker killed and restarted, two micro-batches with EPSERVE_GPU_TWO_MICRO_BATCHES=1). Results
# straight under $OUT.
set -u
W=${OUT:-/tmp/aa_out}
source bench/gpu/device_env.sh
timeout 340 python3 bench/serve_gpu.py --out-dir "$W" --modes cuda_ipc --overlap-ab --batches 1 32 128 \
    --name serve_gpu_cuda_ipc_overlap > "$W/serve.txt" 2>&1; echo "exit $?" >> "$W/serve.txt"
TESTS=("tests/e2e/test_step_path.py::test_step_path_on_one_gpu[1]" "tests/e2e/test_step_path.py::test_step_path_on_one_gpu[2]"
       tests/epserve/dataplane/test_dataplane_cuda_ipc_gpu.py
       "tests/e2e/test_step_path.py::test_an_expert_worker_lost_and_restarted_on_one_gpu"
       "tests/e2e/test_step_path.py::test_two_micro_batches_on_the_gpu_step_path[1]")
[ -n "${AA_TESTS:-}" ] && read -r -a TESTS <<< "$AA_TESTS"
timeout 240 python3 -m pytest -q -p no:cacheprovider --timeout 200 "${TESTS[@]}" \
    > "$W/tests.txt" 2>&1; echo "exit $?" >> "$W/tests.txt"
cat "$W/gpu.txt"; grep -v "drawing\|loading" "$W/serve.txt" | tail -16; grep -E "passed|failed|exit|Error" "$W/tests.txt" | tail -8
