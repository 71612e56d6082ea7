#!/usr/bin/env bash
# Set up a development environment in .venv: a CPU build of torch (pinned: an unpinned torch
# pulls a multi-GB CUDA build), then epserve with its test dependencies.
# Usage: bash scripts/setup.sh        (idempotent; re-running only installs what changed)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q "torch==${EPSERVE_TORCH_VERSION:-2.13.0}"
fi
.venv/bin/python -m pip install -q -e '.[dev]'
echo "epserve environment ready in .venv" >&2
