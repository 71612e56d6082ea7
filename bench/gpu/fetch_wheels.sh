#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the wheels the device machine lacks or has too old for epserve's serving
# processes and tests (grpc extras, protobuf, OpenTelemetry), at the versions of this checkout's .venv
# (bash scripts/setup.sh first). Device calls then carry ".whl"; bench/gpu/device_env.sh installs them.
set -eu
cd "$(dirname "$0")/../.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
NAMES='^(grpcio|grpcio-health-checking|grpcio-reflection|protobuf|googleapis-common-protos|opentelemetry-api|opentelemetry-sdk|opentelemetry-proto|opentelemetry-exporter-otlp-proto-grpc|opentelemetry-exporter-otlp-proto-common|opentelemetry-semantic-conventions|importlib[-_]metadata)=='
mapfile -t PINS < <(.venv/bin/python -m pip freeze | grep -iE "$NAMES")
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "${PINS[@]}"
ls -la .whl; du -sh .whl
