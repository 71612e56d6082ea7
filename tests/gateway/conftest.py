"""Fixtures for the gateway tests: a tiny model directory (tokenizer + config only)."""

from __future__ import annotations

from pathlib import Path

import pytest
from gateway_testlib import build_tokenizer, write_model_dir

from epserve.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def gateway_model_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("gateway_model"), build_tokenizer())


@pytest.fixture(scope="session")
def gateway_tokenizer(gateway_model_dir) -> Tokenizer:
    return Tokenizer.from_dir(gateway_model_dir)
