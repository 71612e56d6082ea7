"""``--capacity auto``: the expert worker times its own MoE runner (expert_worker/capacity.py)."""

from __future__ import annotations

import pytest
import torch

from epserve.expert_worker.__main__ import build_parser
from epserve.expert_worker.capacity import measure_capacity
from epserve.expert_worker.config import ExpertWorkerConfig
from epserve.model_config import load_model_spec
from epserve.moe_runner import make_moe_runner


class RepeatedRunner:
    """A runner that does the torch runner's work ``times`` times: a worker that many times slower."""

    def __init__(self, times: int) -> None:
        self.inner, self.times = make_moe_runner("torch", "cpu"), times
        self.name, self.capturable = f"torch x{times}", False

    def run(self, hidden, slot_ids, weights, w13, w2):
        for _ in range(self.times):
            out = self.inner.run(hidden, slot_ids, weights, w13, w2)
        return out


def test_a_slower_runner_measures_a_lower_capacity(tiny_model):
    spec = load_model_spec(tiny_model)
    fast = measure_capacity(spec, RepeatedRunner(1), torch.float32, "cpu", min_s=0.2)
    slow = measure_capacity(spec, RepeatedRunner(4), torch.float32, "cpu", min_s=0.2)
    assert 0 < slow < 0.6 * fast, (fast, slow)


def test_capacity_flag_takes_a_number_or_auto(capsys):
    parser = build_parser()
    base = ["--model-path", "m", "--placement", "127.0.0.1:1"]
    assert parser.parse_args(base + ["--capacity", "auto"]).capacity is None
    assert parser.parse_args(base + ["--capacity", "0.25"]).capacity == 0.25
    assert parser.parse_args(base).capacity == 1.0
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--capacity", "fast"])
    assert "expected a number > 0 or auto" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--capacity must be a number > 0 or auto"):
        ExpertWorkerConfig(model_path="m", placement="127.0.0.1:1", capacity=0.0)
