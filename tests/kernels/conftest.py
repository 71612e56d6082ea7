"""Kernel tests: on a machine without CUDA, Triton kernels run in its interpreter.

TRITON_INTERPRET must be set before triton is imported (``triton.jit`` reads it when a
kernel is defined), so it is set here, at collection, before any test module imports
``kernels``. The interpreter mishandles bfloat16 loads: CPU tests use float32 and float16.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
