"""MoE runners: compute routed experts over the physical slots an expert side holds.

Legend: T tokens, D hidden size, I MoE intermediate size, S local slots, K top-k.

A runner is picked once at start-up by ``--moe-runner-backend`` (``make_moe_runner``, from the
backends ``registry.py`` lists by name).
Every backend implements ``MoERunner``; ``torch`` is the reference every other backend is
tested against.
"""

from epserve.moe_runner.base import MoERunner
from epserve.moe_runner.registry import available_backends, make_moe_runner

__all__ = ["MoERunner", "make_moe_runner", "available_backends"]
