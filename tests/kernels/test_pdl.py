"""Programmatic dependent launch switches (the launches themselves are tested on the GPU)."""

from __future__ import annotations

import torch

from epserve.kernels import pdl


def test_never_on_cpu_and_off_inside_disabled_blocks():
    assert not pdl.enabled(torch.device("cpu"))
    assert pdl.launch_options(False) == {"USE_PDL": False}
    assert pdl.launch_options(True) == {"USE_PDL": True, "launch_pdl": True}
    with pdl.disabled():
        with pdl.disabled():
            assert pdl._forced_off == 2
        assert pdl._forced_off == 1
        assert not pdl.enabled(torch.device("cuda", 0))          # decided before any CUDA query
    assert pdl._forced_off == 0
