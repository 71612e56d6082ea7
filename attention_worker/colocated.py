"""Colocated mode (``--moe-a2a-backend local``): attention and all experts in one process.

Used by ``epserve generate --model-path`` on a single device, by attention workers of a
colocated deployment (``epserve up --moe-a2a-backend local``: no expert workers), and as the
parity reference for every disaggregated path. Both build their experts with ``ColocatedExperts``:
the trivial expert map with no redundancy (slot p holds expert p), owned by this process, and
an ``InProcessExperts`` executor whose router never changes maps.
"""

from __future__ import annotations

import torch

from epserve.attention_worker.engine import Engine, EngineLimits
from epserve.attention_worker.expert_heatmap import HeatmapCollector
from epserve.attention_worker.expert_recorder import ExpertLoadRecorder, RecorderMode
from epserve.attention_worker.expert_routing import DispatchAlgorithm, ExpertRouter
from epserve.attention_worker.moe_executor import InProcessExperts, LoadSink
from epserve.dummy_weights import DummyReader, open_weights
from epserve.expert_map import ExpertMap
from epserve.model_config import ModelSpec, load_model_spec
from epserve.models.expert_side import check_moe_runner, load_expert_slots
from epserve.models.ops import layer_ops_for
from epserve.attention_worker.model_family import model_family
from epserve.models.qwen3_moe import Qwen3MoeAttentionSide
from epserve.moe_runner import make_moe_runner
from epserve.weights import CheckpointReader

LOCAL_OWNER = "local"      # the one slot owner of a colocated map: this process


class ColocatedExperts:
    """Every routed expert of the model, resident in this process.

    ``expert_map``: the trivial map (version 0, no redundancy, one owner ``LOCAL_OWNER``); it
    never changes. ``executor(record_load)`` makes the engine's ``InProcessExperts``."""

    def __init__(self, spec: ModelSpec, reader: CheckpointReader | DummyReader, dtype: torch.dtype,
                 device: str = "cpu", moe_runner_backend: str = "auto") -> None:
        self.runner = make_moe_runner(moe_runner_backend, device, dtype=dtype)     # a bad backend fails before loading
        check_moe_runner(spec, self.runner)
        self.expert_map = ExpertMap.trivial(spec.num_moe_layers, spec.num_experts, 0, (LOCAL_OWNER,))
        self.slots = load_expert_slots(spec, reader, self.expert_map.phy2log, dtype, device)

    def executor(self, record_load: LoadSink | None = None) -> InProcessExperts:
        """``record_load``: the expert-load recorder's ``record`` (None: nothing recorded)."""
        return InProcessExperts(self.slots, self.runner,
                                ExpertRouter(DispatchAlgorithm.STATIC, rank=0, map_is_fixed=True),
                                record_load=record_load)


def load_attention_model(spec: ModelSpec, reader: CheckpointReader | DummyReader, dtype: torch.dtype,
                         device: str = "cpu") -> Qwen3MoeAttentionSide:
    """The attention side with the layer operations for ``device`` (fused kernels on CUDA)."""
    return model_family(spec).load_attention_side(spec, reader, dtype, device, layer_ops_for(device))


def build_colocated_engine(model_path: str, dtype: torch.dtype, device: str = "cpu",
                           moe_runner_backend: str = "auto", limits: EngineLimits = EngineLimits(),
                           max_context: int | None = None, recorder_mode: RecorderMode | None = None,
                           heatmap: HeatmapCollector | None = None, load_format: str = "auto") -> Engine:
    """``recorder_mode``: record expert load (``engine.recorder``) as an attention worker does;
    ``heatmap``: also feed it every pass (the recorder then tracks passes); ``load_format``:
    ``--load-format`` (dummy: random weights, only config.json is read); ``max_context``: None or
    0 = the model's ``max_position_embeddings``."""
    spec = load_model_spec(model_path)
    reader = open_weights(model_path, load_format, spec)
    model = load_attention_model(spec, reader, dtype, device)
    experts = ColocatedExperts(spec, reader, dtype, device, moe_runner_backend)
    recorder = None
    if recorder_mode is not None or heatmap is not None:
        recorder = ExpertLoadRecorder(recorder_mode or RecorderMode.STAT, experts.expert_map.num_layers,
                                      experts.expert_map.num_physical_slots, track_passes=heatmap is not None)
    executor = experts.executor(recorder.record if recorder is not None else None)
    return Engine(model, executor, experts.expert_map, limits, max_context or spec.max_position_embeddings,
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
