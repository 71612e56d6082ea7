"""Expert distribution on the attention worker: heatmap aggregation, the heatmap env variable,
the metrics flag's config rule, and DumpExpertDistribution over real gRPC on a real engine."""

from __future__ import annotations

import json
import logging

import grpc
import pytest
import torch

from epserve.attention_worker.colocated import build_colocated_engine, generate_tokens
from epserve.attention_worker.config import AttentionWorkerConfig, heatmap_interval_from_env
from epserve.attention_worker.engine_loop import EngineLoop
from epserve.attention_worker.expert_heatmap import (HeatmapCollector, HeatmapInterval, HeatmapWriter, fold_to_workers,
                                             layer_balancedness)
from epserve.attention_worker.expert_recorder import RecorderMode
from epserve.sampling import SamplingParams
from epserve.attention_worker.service import AttentionWorkerService
from epserve.expert_map import ExpertMap
from epserve.grpc_server import serve_grpc, wait_for_channel
from epserve.model_config import load_model_spec
from epserve.protos import worker_pb2, worker_pb2_grpc

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9]]
MAX_NEW = 3


# -- the environment variable and the config ----------------------------------------------------
@pytest.mark.parametrize("environ, expected", [
    ({}, 0), ({"EPSERVE_EPLB_HEATMAP_COLLECTION_INTERVAL": "0"}, 0),
    ({"EPSERVE_EPLB_HEATMAP_COLLECTION_INTERVAL": " 50 "}, 50),
    ({"SGLANG_EPLB_HEATMAP_COLLECTION_INTERVAL": "7"}, 7),
    ({"EPSERVE_EPLB_HEATMAP_COLLECTION_INTERVAL": "3", "SGLANG_EPLB_HEATMAP_COLLECTION_INTERVAL": "7"}, 3),
    ({"EPSERVE_EPLB_HEATMAP_COLLECTION_INTERVAL": "", "SGLANG_EPLB_HEATMAP_COLLECTION_INTERVAL": "7"}, 7),
])
def test_heatmap_interval_from_env(environ, expected):
    assert heatmap_interval_from_env(environ) == expected


@pytest.mark.parametrize("name", ["EPSERVE_EPLB_HEATMAP_COLLECTION_INTERVAL", "SGLANG_EPLB_HEATMAP_COLLECTION_INTERVAL"])
@pytest.mark.parametrize("text", ["ten", "1.5", "-2"])
def test_bad_heatmap_interval_names_the_variable(name, text):
    with pytest.raises(ValueError, match=name):
        heatmap_interval_from_env({name: text})


def test_metrics_flag_needs_a_metrics_port():
    with pytest.raises(ValueError, match="add --metrics-port"):
        AttentionWorkerConfig(model_path="m", placement="h:1", enable_expert_distribution_metrics=True)
    on = AttentionWorkerConfig(model_path="m", placement="h:1", enable_expert_distribution_metrics=True, metrics_port=0)
    assert on.track_expert_passes
    assert not AttentionWorkerConfig(model_path="m", placement="h:1", metrics_port=0).track_expert_passes
    assert AttentionWorkerConfig(model_path="m", placement="h:1", eplb_heatmap_collection_interval=5).track_expert_passes


def test_worker_main_refuses_the_flag_without_metrics_port_and_a_bad_env(capsys, monkeypatch):
    from epserve.attention_worker.__main__ import main

    assert main(["--model-path", "m", "--placement", "h:1", "--enable-expert-distribution-metrics"]) == 2
    assert "add --metrics-port" in capsys.readouterr().err
    monkeypatch.setenv("EPSERVE_EPLB_HEATMAP_COLLECTION_INTERVAL", "often")
    assert main(["--model-path", "m", "--placement", "h:1"]) == 2
    assert "EPSERVE_EPLB_HEATMAP_COLLECTION_INTERVAL='often'" in capsys.readouterr().err


# -- aggregation ---------------------------------------------------------------------------------
def _map(version: int, owners=("expert-0", "expert-1")) -> ExpertMap:
    return ExpertMap(torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]]), 4, version, owners)


def test_fold_and_balancedness():
    counts = torch.tensor([[1, 2, 3, 4], [0, 0, 5, 5], [0, 0, 0, 0]])     # [L=3, P=4]
    heat = fold_to_workers(counts, 2)
    assert heat.tolist() == [[3, 7], [0, 10], [0, 0]]
    assert layer_balancedness(heat).tolist() == pytest.approx([5 / 7, 0.5, 1.0])


def test_collector_emits_every_n_passes_over_map_versions():
    emitted: list[HeatmapInterval] = []
    collector = HeatmapCollector("attention-0", interval=3, emit=emitted.append)
    passes = [torch.tensor([[1, 0, 0, 1], [0, 2, 0, 0]]), torch.tensor([[0, 0, 4, 0], [1, 1, 1, 1]]),
              torch.tensor([[2, 0, 0, 0], [0, 0, 0, 3]]), torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])]
    versions = [1, 1, 2, 2]                 # a new map (same workers) in the middle: one interval
    for counts, version in zip(passes, versions):
        collector.add_pass(counts, _map(version))
    assert len(emitted) == 1
    first = emitted[0]
    assert (first.first_pass, first.last_pass, first.num_passes) == (0, 2, 3)
    assert first.map_versions == (1, 2) and first.expert_workers == ("expert-0", "expert-1")
    assert first.tokens.tolist() == [[3, 5], [4, 5]]        # [L, W]: slots 0-1 → expert-0, 2-3 → expert-1
    record = first.to_json()
    assert record["tokens"] == [[3, 5], [4, 5]] and record["map_version"] == 2 and record["num_passes"] == 3
    assert record["layer_balancedness"] == [round(4 / 5, 4), round(4.5 / 5, 4)]
    summary = first.summary()
    assert "passes 0-2" in summary and "min 0.800 (MoE layer 0)" in summary and "hottest expert-1" in summary


def test_collector_closes_early_when_the_expert_workers_change():
    emitted: list[HeatmapInterval] = []
    collector = HeatmapCollector("attention-0", interval=10, emit=emitted.append)
    collector.add_pass(torch.ones(2, 4, dtype=torch.int64), _map(1))
    collector.add_pass(torch.ones(2, 4, dtype=torch.int64), _map(2, owners=("expert-0", "expert-2")))
    assert len(emitted) == 1 and emitted[0].num_passes == 1 and emitted[0].expert_workers == ("expert-0", "expert-1")


def test_writer_appends_json_lines_and_logs_a_summary(tmp_path, caplog):
    writer = HeatmapWriter(tmp_path / "heat", "attention-0")
    writer.check_writable()
    interval = HeatmapInterval("attention-0", 0, 9, (3,), ("expert-0", "expert-1"), torch.tensor([[6, 2]]))
    with caplog.at_level(logging.INFO, logger="epserve.attention_worker.expert_heatmap"):
        writer.write(interval)
        writer.write(interval)
    lines = (tmp_path / "heat" / "expert_heatmap_attention-0.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["expert_workers"] == ["expert-0", "expert-1"]
    assert "hottest expert-0 75% of 8 choices" in caplog.text
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(ValueError, match="--expert-distribution-dir: cannot write"):
        HeatmapWriter(blocked / "sub", "attention-0").check_writable()


def test_real_engine_heatmap_counts_every_routed_choice(tiny_model):
    """Every token of every pass, K choices, every MoE layer: the intervals add up to exactly that."""
    spec = load_model_spec(tiny_model)
    emitted: list[HeatmapInterval] = []
    engine = build_colocated_engine(str(tiny_model), torch.float32, recorder_mode=RecorderMode.STAT,
                                    heatmap=HeatmapCollector("local-0", interval=1, emit=emitted.append))
    generate_tokens(engine, PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW, ignore_eos=True))
    tokens = sum(len(p) + MAX_NEW - 1 for p in PROMPTS)   # the last sampled token is never fed back
    assert engine.num_steps >= 3 and [(i.first_pass, i.last_pass) for i in emitted] == [
        (n, n) for n in range(engine.num_steps)]
    assert all(i.tokens.shape == (spec.num_moe_layers, 1) and i.expert_workers == ("local",) for i in emitted)
    assert sum(int(i.tokens.sum()) for i in emitted) == tokens * spec.num_experts_per_tok * spec.num_moe_layers


# -- DumpExpertDistribution over gRPC --------------------------------------------------------------
@pytest.fixture(scope="module")
def dump_stubs(tiny_model):
    """Two real attention-worker services over real engines that served two prompts: per_token and stat."""
    servers, channels, stubs = [], [], {}
    for mode in (RecorderMode.PER_TOKEN, RecorderMode.STAT):
        engine = build_colocated_engine(str(tiny_model), torch.float32, recorder_mode=mode)
        generate_tokens(engine, PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW, ignore_eos=True))
        loop = EngineLoop(engine)
        service = AttentionWorkerService(f"attention-{mode.value}", 1000, lambda loop=loop: loop)
        server = serve_grpc([(worker_pb2_grpc.add_AttentionWorkerServicer_to_server, service,
                              "epserve.v1.AttentionWorker")], "127.0.0.1", 0)
        channel = wait_for_channel(f"127.0.0.1:{server.port}", timeout_s=10)
        servers.append(server)
        channels.append(channel)
        stubs[mode.value] = worker_pb2_grpc.AttentionWorkerStub(channel)
    yield stubs
    for channel in channels:
        channel.close()
    for server in servers:
        server.stop(0.5)


def _dump(stub, directory: str):
    return stub.DumpExpertDistribution(worker_pb2.DumpExpertDistributionRequest(directory=directory), timeout=10)


def test_dump_writes_the_per_token_choices(dump_stubs, tiny_model, tmp_path):
    spec = load_model_spec(tiny_model)
    response = _dump(dump_stubs["per_token"], str(tmp_path / "new" / "dir"))
    assert response.worker_id == "attention-per_token" and response.mode == "per_token"
    assert response.path.startswith(str(tmp_path / "new" / "dir" / "expert_distribution_attention-per_token_"))
    dumped = torch.load(response.path)
    assert response.num_token_records == dumped["num_token_records"] == len(dumped["per_token"]) > 0
    assert response.num_passes == dumped["num_passes"] >= 3
    tokens = sum(len(p) + MAX_NEW - 1 for p in PROMPTS)
    assert sum(physical.numel() for _, physical in dumped["per_token"]) == \
        tokens * spec.num_experts_per_tok * spec.num_moe_layers
    assert {layer for layer, _ in dumped["per_token"]} == set(range(spec.num_moe_layers))
    assert dumped["physical_to_logical_map"].shape == (spec.num_moe_layers, spec.num_experts)
    assert dumped["worker_id"] == "attention-per_token" and dumped["slot_owners"] == ["local"]
    again = _dump(dump_stubs["per_token"], str(tmp_path))
    assert again.path != response.path and again.num_token_records == 0   # each dump starts where the last ended


@pytest.mark.parametrize("directory, code, words", [
    ("", grpc.StatusCode.INVALID_ARGUMENT, "directory is empty"),
    ("relative/dir", grpc.StatusCode.INVALID_ARGUMENT, "directory 'relative/dir' is relative"),
])
def test_dump_refuses_a_bad_directory(dump_stubs, directory, code, words):
    with pytest.raises(grpc.RpcError) as failed:
        _dump(dump_stubs["per_token"], directory)
    assert failed.value.code() == code and words in failed.value.details()


def test_dump_in_stat_mode_says_how_to_start_the_worker(dump_stubs, tmp_path):
    with pytest.raises(grpc.RpcError) as failed:
        _dump(dump_stubs["stat"], str(tmp_path))
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--expert-distribution-recorder-mode per_pass|per_token" in failed.value.details()


def test_dump_to_an_unwritable_directory_names_the_path(dump_stubs, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(grpc.RpcError) as failed:
        _dump(dump_stubs["per_token"], str(blocker / "sub"))
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"cannot write {blocker / 'sub'}" in failed.value.details()
