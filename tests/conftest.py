"""Shared fixtures: tiny random models made once per session with `epserve make-tiny-model`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Small models are latency-bound; several test processes share 2 cores: one thread each.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


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
