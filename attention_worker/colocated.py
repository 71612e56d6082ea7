"""Colocated mode (``--moe-a2a-backend local``): attention and all experts in one process.

Used by ``epserve generate --model-path`` on a single device, and as the parity reference
for every disaggregated path. The expert map is the trivial one with no redundancy.
"""

from __future__ import annotations

import torch

from epserve.attention_worker.engine import Engine, EngineLimits
from epserve.attention_worker.expert_heatmap import HeatmapCollector
from epserve.attention_worker.expert_recorder import ExpertLoadRecorder, RecorderMode
from epserve.attention_worker.expert_routing import DispatchAlgorithm, ExpertRouter
from epserve.attention_worker.moe_executor import InProcessExperts
from epserve.dummy_weights import open_weights
from epserve.expert_map import ExpertMap
from epserve.model_config import load_model_spec
from epserve.models.expert_side import load_expert_slots
from epserve.models.ops import layer_ops_for
from epserve.models.qwen3_moe import load_attention_side
from epserve.moe_runner import make_moe_runner


def build_colocated_engine(model_path: str, dtype: torch.dtype, device: str = "cpu",
                           moe_runner_backend: str = "auto", limits: EngineLimits = EngineLimits(),
                           max_context: int | None = None, recorder_mode: RecorderMode | None = None,
                           heatmap: HeatmapCollector | None = None, load_format: str = "auto") -> Engine:
    """``recorder_mode``: record expert load (``engine.recorder``) as an attention worker does;
    ``heatmap``: also feed it every pass (the recorder then tracks passes); ``load_format``:
    ``--load-format`` (dummy: random weights, only config.json is read)."""
    spec = load_model_spec(model_path)
    reader = open_weights(model_path, load_format, spec)
    model = load_attention_side(spec, reader, dtype, device, layer_ops_for(device))
    expert_map = ExpertMap.trivial(spec.num_moe_layers, spec.num_experts, 0, ("local",))
    slots = load_expert_slots(spec, reader, expert_map.phy2log, dtype, device)
    recorder = None
    if recorder_mode is not None or heatmap is not None:
        recorder = ExpertLoadRecorder(recorder_mode or RecorderMode.STAT, expert_map.num_layers,
                                      expert_map.num_physical_slots, track_passes=heatmap is not None)
    executor = InProcessExperts(slots, make_moe_runner(moe_runner_backend, device),
                                ExpertRouter(DispatchAlgorithm.STATIC, rank=0, map_is_fixed=True),
                                record_load=recorder.record if recorder is not None else None)
    return Engine(model, executor, expert_map, limits, max_context or spec.max_position_embeddings,
                  recorder=recorder, heatmap=heatmap)


def generate_tokens(engine: Engine, prompts: list[list[int]], params) -> list[list[int]]:
    """Run prompts to completion on the calling thread; returns generated ids per prompt."""
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    while engine.has_work:
        for out in engine.step():
            outputs[out.request_id].extend(out.new_token_ids)
    return [outputs[str(i)] for i in range(len(prompts))]
