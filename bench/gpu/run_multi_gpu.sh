#!/usr/bin/env bash
# Issue 19, ready for a machine with two or more GPUs (not lent so far): NCCL and cuda_ipc across GPUs,
# then the split deployment with attention on cuda:0 and the expert worker on cuda:1, against colocated.
# Results under $OUT. Run: bash bench/gpu/run_multi_gpu.sh (carry .whl, as every device call).
set -u
R=${OUT:-/tmp/multi_out}
W=/tmp/multi_work
mkdir -p "$R"
source bench/gpu/device_env.sh
{ nvidia-smi topo -m; nvidia-smi --query-gpu=index,name,memory.total --format=csv
  python3 -c "import torch; print('GPUs', torch.cuda.device_count(), 'peer 0->1',
      torch.cuda.can_device_access_peer(0, 1) if torch.cuda.device_count() > 1 else None)"
  for m in deep_ep mooncake.engine deep_gemm; do python3 -c "import $m; print('$m', getattr($m, '__version__', 'loads'))" 2>&1 | tail -1; done
} > "$W/machine.txt" 2>&1
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 200 \
    tests/epserve/dataplane/test_dataplane_torch_nccl_gpu.py tests/epserve/dataplane/test_dataplane_cuda_ipc_gpu.py \
    tests/e2e/test_step_path.py > "$W/tests.txt" 2>&1; echo "tests exit $?" >> "$W/tests.txt"
timeout 150 python3 bench/serve_deployed.py --out-dir "$W/deployed" --log-dir "$W/deployed_logs" --name serve_one_gpu \
    --batches 1 32 128 --new-tokens 48 --modes local > "$W/deployed.txt" 2>&1
timeout 300 python3 bench/serve_deployed.py --out-dir "$W/deployed" --log-dir "$W/deployed_logs" --name serve_two_gpus \
    --batches 1 32 128 --new-tokens 48 --modes torch cuda_ipc \
    --up-args --attention-device cuda:0 --expert-devices cuda:1 >> "$W/deployed.txt" 2>&1
echo "deployed exit $?" >> "$W/deployed.txt"
cp "$W"/deployed/*.json "$R"/ 2>/dev/null
tar czf "$R/all.tgz" -C "$W" .
cat "$W/machine.txt"; grep -E "passed|failed|FAILED|exit" "$W/tests.txt" | tail -8; grep -v "^RESULT" "$W/deployed.txt" | tail -12
