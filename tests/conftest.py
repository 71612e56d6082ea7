"""Shared fixtures: tiny random models made once per session with `epserve make-tiny-model`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Small models are latency-bound; several test processes share 2 cores: one thread each.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Without CUDA, Triton kernels run in Triton's interpreter. It must be chosen before any kernel is
# defined (``triton.jit`` reads it then), i.e. before the first test module imports epserve.kernels
# — set here, at the top of the collection, for every test directory (the engine tests use the
# batched GPU runner's kernels too). The interpreter mishandles bfloat16 loads: CPU tests use
# float32 and float16.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from epserve.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    from epserve.tiny_model import make_tiny_model

    made: dict[tuple, Path] = {}

    def make(**options) -> Path:
        key = tuple(sorted(options.items()))
        if key not in made:
            made[key] = make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", **options)
        return made[key]

    return make
