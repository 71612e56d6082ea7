# Sourced by the device-call scripts (bench/gpu/run_call_*.sh) with W set to their work folder (results straight
# under it): installs the carried wheels (.whl: opentelemetry, grpcio, ...; missing on the device machine) into
# /tmp/site, exports the environment every stage runs in (the tests' helper modules importable) and records the GPU.
mkdir -p "$W"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$W/pip.txt" 2>&1 || echo "wheel install failed (see $W/pip.txt)"
export PYTHONPATH=$PWD:/tmp/site:$PWD/tests:$PWD/tests/attention_worker PYTHONUNBUFFERED=1 \
    TRITON_CACHE_DIR=$PWD/.triton_cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$W/gpu.txt" 2>&1
