#!/usr/bin/env bash
# Try the carried DeepGEMM wheels (.whl/, see bench/gpu/NOTES.md) against this machine's torch;
# print why each fails. Writes the install dir of the first that works to /tmp/dg_path.
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
for spec in "0.2.0:.whl/sgl_deep_gemm-0.2.0-*.whl" "0.1.7:.whl/dg017/sgl_deep_gemm-0.1.7-*.whl"; do
    version=${spec%%:*}
    wheel=${spec#*:}
    dir=/tmp/deep_gemm_$version
    echo "== sgl-deep-gemm $version (+ apache-tvm-ffi 0.1.11)"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$dir" .whl/apache_tvm_ffi-*.whl $wheel \
        || { echo "install failed"; continue; }
    if PYTHONPATH="$dir:${PYTHONPATH:-}" timeout 60 python3 bench/gpu/probe_deep_gemm.py; then
        echo "$dir" > /tmp/dg_path
        echo "sgl-deep-gemm $version WORKS"
        break
    fi
    echo "sgl-deep-gemm $version does not work here (exit $?)"
done
