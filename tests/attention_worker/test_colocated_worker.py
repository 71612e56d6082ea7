"""The attention worker of a colocated deployment (``--moe-a2a-backend local``) and the engine flags
(``--attention-backend``, ``--cuda-graph-max-bs``, ``--disable-cuda-graph``, ``--disable-overlap-schedule``,
sizes) of the attention worker and ``epserve generate``: each reaches ``EngineLimits``, bad values are refused
naming the flag."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
import torch

from epserve.attention_worker.__main__ import build_parser, config_from_args, main
from epserve.attention_worker.colocated import build_colocated_engine, generate_tokens
from epserve.attention_worker.config import AttentionWorkerConfig
from epserve.attention_worker.engine import EngineLimits
from epserve.sampling import SamplingParams
from epserve.protos import generation_pb2, worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.timeout(120)

WORKER = ["--model-path", "m", "--placement", "h:1"]
ENGINE_FLAGS = ["--attention-backend", "torch_native", "--cuda-graph-max-bs", "8", "--disable-cuda-graph",
                "--disable-overlap-schedule", "--max-running-requests", "5", "--num-kv-blocks", "40",
                "--max-num-batched-tokens", "96", "--context-length", "128"]
ENGINE_LIMITS = EngineLimits(num_kv_blocks=40, max_num_batched_tokens=96, max_num_seqs=5, cuda_graph_max_bs=8,
                             disable_cuda_graph=True, disable_overlap_schedule=True, attention_backend="torch_native")


# -- flags → EngineLimits -----------------------------------------------------------------------
def test_worker_flags_reach_engine_limits():
    config = config_from_args(build_parser().parse_args(WORKER + ENGINE_FLAGS + ["--moe-a2a-backend", "local",
                                                                                "--moe-runner-backend", "torch"]), {})
    assert config.limits == ENGINE_LIMITS and config.max_context == 128
    assert config.colocated and config.moe_runner_backend == "torch"
    defaults = config_from_args(build_parser().parse_args(WORKER), {})
    assert defaults.limits == EngineLimits() and not defaults.colocated and defaults.max_context == 0


def test_generate_flags_reach_engine_limits_with_the_engines_defaults():
    from epserve.cli import build_parser as cli_parser
    from epserve.commands.generate import engine_limits

    args = cli_parser().parse_args(["generate", "--model-path", "m", "--prompt", "p"] + ENGINE_FLAGS)
    assert engine_limits(args) == ENGINE_LIMITS and args.context_length == 128
    defaults = cli_parser().parse_args(["generate", "--model-path", "m", "--prompt", "p"])
    assert engine_limits(defaults) == EngineLimits() and defaults.context_length == 0


@pytest.mark.parametrize("flags,message", [
    (["--cuda-graph-max-bs", "-1"], "--cuda-graph-max-bs must be >= 0"),
    (["--max-running-requests", "0"], "--max-running-requests must be >= 1"),
    (["--num-kv-blocks", "0"], "--num-kv-blocks must be >= 1"),
    (["--max-num-batched-tokens", "0"], "--max-num-batched-tokens must be >= 1"),
    (["--context-length", "-5"], "--context-length must be >= 0"),
])
def test_bad_engine_flags_are_refused_naming_the_flag(flags, message, capsys, tiny_model):
    from epserve.cli import main as cli_main

    assert main(WORKER + flags) == 2
    assert message in capsys.readouterr().err
    assert cli_main(["generate", "--model-path", str(tiny_model), "--prompt", "hi"] + flags) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_unknown_attention_backend_is_refused_by_every_parser(capsys):
    from epserve.cli import build_parser as cli_parser

    for parse in (lambda: build_parser().parse_args(WORKER + ["--attention-backend", "flashinfer"]),
                  lambda: cli_parser().parse_args(["generate", "--model-path", "m", "--prompt", "p",
                                                   "--attention-backend", "flashinfer"]),
                  lambda: cli_parser().parse_args(["up", "--attention-backend", "flashinfer"])):
        with pytest.raises(SystemExit):
            parse()
        assert "--attention-backend" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--moe-a2a-backend must be one of"):
        AttentionWorkerConfig(model_path="m", placement="h:1", moe_a2a_backend="nccl")


# -- a colocated attention worker ---------------------------------------------------------------
@pytest.fixture
def placement(tiny_model):
    """start(backend, dp_size) → a running in-process placement service for the tiny model."""
    from epserve.placement_service.config import PlacementConfig
    from epserve.placement_service.server import start_placement_server

    servers = []

    def start(backend: str = "local", dp_size: int = 1):
        server = start_placement_server(PlacementConfig(str(tiny_model), dp_size=dp_size,
                                                        ep_size=0 if backend == "local" else 1,
                                                        moe_a2a_backend=backend, shutdown_grace_s=0.2))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def workers():
    from epserve.attention_worker.worker import AttentionWorker

    made = []

    def make(config: AttentionWorkerConfig) -> AttentionWorker:
        worker = AttentionWorker(config)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.stop()


def worker_config(tiny_model, placement_server, **fields) -> AttentionWorkerConfig:
    return AttentionWorkerConfig(model_path=str(tiny_model), placement=placement_server.address, dtype="float32",
                                 **fields)


def test_serves_every_expert_itself_without_a_map_from_placement(tiny_model, placement, workers):
    server = placement("local")
    limits = dataclasses.replace(ENGINE_LIMITS, disable_cuda_graph=False)
    worker = workers(worker_config(tiny_model, server, moe_a2a_backend="local", moe_runner_backend="torch",
                                   limits=limits, max_context=256))
    worker.start(register_deadline_s=10)
    assert worker.ready.is_set()                     # serving right after registering: no map was pushed
    assert worker.loop.engine.limits == limits and worker.loop.engine.max_context == 256

    prompt = list(range(5, 17))
    with grpc.insecure_channel(worker.address) as channel:
        stream = worker_pb2_grpc.AttentionWorkerStub(channel).Generate(worker_pb2.WorkerGenerateRequest(
            request_id="r", prompt_ids=prompt,
            sampling=generation_pb2.SamplingParams(temperature=0.0, max_new_tokens=12)), timeout=60)
        served = [token for response in stream for token in response.token_ids]
    reference = build_colocated_engine(str(tiny_model), torch.float32, max_context=256)
    assert served == generate_tokens(reference, [prompt], SamplingParams(temperature=0.0, max_new_tokens=12))[0]

    listed = server.controller.list_workers()
    assert [(w.worker_id, w.role.name) for w in listed] == [(worker.config.worker_id, "ATTENTION")]
    assert worker.recorder.take_window()[1] > 0      # expert load is recorded (dumps, metrics), not reported


@pytest.mark.parametrize("placement_backend,worker_backend,message", [
    ("local", "torch", "start the worker with --moe-a2a-backend local"),
    ("torch", "local", "start the worker with --moe-a2a-backend torch"),
])
def test_a_worker_of_the_other_kind_refuses_to_join(tiny_model, placement, workers, placement_backend,
                                                    worker_backend, message):
    worker = workers(worker_config(tiny_model, placement(placement_backend), moe_a2a_backend=worker_backend))
    with pytest.raises(RuntimeError, match=message):
        worker.start(register_deadline_s=10)
    assert not worker.ready.is_set()


def test_a_stop_token_is_named_and_a_running_id_is_already_exists(tiny_model, placement, workers):
    server = placement("local")
    worker = workers(worker_config(tiny_model, server, moe_a2a_backend="local", moe_runner_backend="torch",
                                   limits=ENGINE_LIMITS, max_context=256))
    worker.start(register_deadline_s=10)
    prompt = list(range(5, 17))
    reference = build_colocated_engine(str(tiny_model), torch.float32, max_context=256)
    greedy = generate_tokens(reference, [prompt], SamplingParams(temperature=0.0, max_new_tokens=12,
                                                                  ignore_eos=True))[0]
    at = next(i for i, token in enumerate(greedy) if token not in greedy[:i] and i > 0)
    with grpc.insecure_channel(worker.address) as channel:
        stub = worker_pb2_grpc.AttentionWorkerStub(channel)
        responses = list(stub.Generate(worker_pb2.WorkerGenerateRequest(
            request_id="stop", prompt_ids=prompt, sampling=generation_pb2.SamplingParams(
                temperature=0.0, max_new_tokens=12, ignore_eos=True, stop_token_ids=[greedy[at]])), timeout=60))
        final = responses[-1]
        assert [t for r in responses for t in r.token_ids] == greedy[:at + 1]
        assert final.finish_reason == generation_pb2.FINISH_REASON_STOP and final.matched_stop_token == greedy[at]
        assert not any(r.HasField("matched_stop_token") for r in responses[:-1])

        running = stub.Generate(worker_pb2.WorkerGenerateRequest(
            request_id="dup", prompt_ids=prompt, sampling=generation_pb2.SamplingParams(
                temperature=0.0, max_new_tokens=200, ignore_eos=True)), timeout=60)
        next(running)                                # "dup" is running here
        with pytest.raises(grpc.RpcError) as again:
            list(stub.Generate(worker_pb2.WorkerGenerateRequest(
                request_id="dup", prompt_ids=prompt, sampling=generation_pb2.SamplingParams(max_new_tokens=2)),
                timeout=60))
        assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS
        running.cancel()
