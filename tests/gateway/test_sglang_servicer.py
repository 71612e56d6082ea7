"""The gateway's SglangScheduler service (what SMG calls) as a real process in front of a scripted
attention worker, through SGLang's generated stub: streaming and not, n > 1 with per-sample seeds,
logprobs, abort, refusals naming what epserve lacks, model info, loads, the tokenizer archive."""

from __future__ import annotations

import hashlib
import io
import threading
import zipfile

import grpc
import pytest
from gateway_testlib import FakeWorker, GatewayProcess
from google.protobuf.struct_pb2 import Struct

from epserve.gateway import client
from epserve.sampling import FinishReason, TokenLogprob
from epserve.gateway.sglang_convert import complete_response, request_from_proto
from epserve.gateway.errors import ValidationError
from epserve.protos import sglang_scheduler_pb2 as pb, sglang_scheduler_pb2_grpc, smg_common_pb2

SCRIPT = [40, 41, 42, 43, 44, 45]
DEFAULT_SEED = 100
SLOW_SEED = 1000            # the fake worker streams requests of this seed slower
PROMPT = [5, 6, 7]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, gateway_model_dir):
    tmp = tmp_path_factory.mktemp("sglang")
    worker = FakeWorker(tmp, "w0", SCRIPT, 0.02, -1, "--slow-seed", str(SLOW_SEED))
    gateway = GatewayProcess(tmp, gateway_model_dir, [worker.address], "--sglang-default-seed", str(DEFAULT_SEED))
    try:
        client.wait_until_serving(gateway.address, 15)
        yield gateway, worker
    finally:
        for process in (gateway, worker):
            process.stop()


@pytest.fixture()
def stub(deployment):
    with grpc.insecure_channel(deployment[0].address) as channel:
        yield sglang_scheduler_pb2_grpc.SglangSchedulerStub(channel)


def request(request_id: str, max_new_tokens: int = 4, n: int = 1, stream: bool = False, **fields) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(temperature=0.7, top_p=1.0, top_k=-1, repetition_penalty=1.0,
                                 max_new_tokens=max_new_tokens, n=n)
    fields.setdefault("logprob_start_len", -1)
    return pb.GenerateRequest(request_id=request_id, tokenized=pb.TokenizedInput(input_ids=PROMPT),
                              sampling_params=sampling, stream=stream, **fields)


def test_health_and_model_info(stub, gateway_model_dir):
    assert stub.HealthCheck(pb.HealthCheckRequest(), timeout=5).healthy
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert info.served_model_name == gateway_model_dir.name
    assert info.tokenizer_path == info.model_path == str(gateway_model_dir)
    assert info.is_generation and info.max_context_length == 512 and info.max_req_input_len == 511
    assert info.architectures == ["Qwen3MoeForCausalLM"] and info.model_type == "qwen3_moe"
    assert len(info.eos_token_ids) == 2 and info.vocab_size > max(SCRIPT)


def test_non_streaming_answers_one_complete_with_every_token(stub, deployment):
    _, worker = deployment
    responses = list(stub.Generate(request("plain-1"), timeout=30))
    assert [r.WhichOneof("response") for r in responses] == ["complete"]
    done = responses[0].complete
    assert list(done.output_ids) == SCRIPT[:4] and done.finish_reason == "length"
    assert (done.prompt_tokens, done.completion_tokens, done.index) == (3, 4, 0)
    seen = worker.events("plain-1")[0]
    assert seen["seed"] == DEFAULT_SEED and seen["prompt_ids"] == PROMPT and not seen["return_logprob"]


def test_streaming_sends_chunks_then_a_complete_with_logprobs(stub):
    responses = list(stub.Generate(request("stream-1", stream=True, return_logprob=True, top_logprobs_num=2),
                                   timeout=30))
    chunks = [r.chunk for r in responses if r.HasField("chunk")]
    assert [list(c.token_ids) for c in chunks] == [[t] for t in SCRIPT[:4]]
    assert [c.completion_tokens for c in chunks] == [1, 2, 3, 4] and all(c.prompt_tokens == 3 for c in chunks)
    assert [lp for c in chunks for lp in c.output_logprobs.token_logprobs] == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    assert [list(c.output_logprobs.top_logprobs[0].token_ids) for c in chunks] == [[t, t + 1] for t in SCRIPT[:4]]
    assert responses[-1].HasField("complete")
    done = responses[-1].complete
    assert list(done.output_ids) == [] and done.finish_reason == "length" and done.completion_tokens == 4


def test_n_samples_run_with_consecutive_seeds(stub, deployment):
    _, worker = deployment
    custom = Struct()
    custom.update({"seed": 7})
    req = request("many", n=3, return_logprob=True)
    req.sampling_params.custom_params.CopyFrom(custom)
    completes = [r.complete for r in stub.Generate(req, timeout=30)]
    assert sorted(c.index for c in completes) == [0, 1, 2]
    assert all(list(c.output_ids) == SCRIPT[:4] for c in completes)
    assert all(list(c.output_logprobs.token_logprobs) == pytest.approx([-0.1, -0.2, -0.3, -0.4]) for c in completes)
    assert [worker.events(f"many/{i}")[0]["seed"] for i in range(3)] == [7, 8, 9]


def test_non_streamed_samples_complete_in_index_order(stub, deployment):
    """Sample 0 (seed SLOW_SEED) finishes after sample 1; without streaming the completions still come in
    index order (SMG numbers an OpenAI response's choices by arrival)."""
    _, worker = deployment
    custom = Struct()
    custom.update({"seed": SLOW_SEED})
    req = request("ordered", n=2)
    req.sampling_params.custom_params.CopyFrom(custom)
    completes = [r.complete for r in stub.Generate(req, timeout=30)]
    assert [c.index for c in completes] == [0, 1]
    assert [worker.events(f"ordered/{i}")[0]["seed"] for i in range(2)] == [SLOW_SEED, SLOW_SEED + 1]
    worker.wait_for(lambda e: e["event"] == "finished" and e["request_id"] == "ordered/0")
    done = [e["request_id"] for e in worker.events() if e["event"] == "finished"
            and e["request_id"].startswith("ordered/")]
    assert done == ["ordered/1", "ordered/0"]                  # the worker did end sample 1 first


def test_abort_ends_every_sample_with_finish_reason_abort(stub, deployment):
    _, worker = deployment
    stream = stub.Generate(request("long", max_new_tokens=400, n=2, stream=True), timeout=30)
    first = next(stream)
    assert first.HasField("chunk")
    assert stub.Abort(pb.AbortRequest(request_id="long"), timeout=5).success
    completes = [r.complete for r in stream if r.HasField("complete")]
    assert sorted(c.index for c in completes) == [0, 1] and {c.finish_reason for c in completes} == {"abort"}
    for i in range(2):
        worker.wait_for(lambda e, i=i: e["request_id"] == f"long/{i}" and e["event"] == "finished")
    assert not stub.Abort(pb.AbortRequest(request_id="long"), timeout=5).success


def test_client_cancel_stops_the_request_at_the_worker(stub, deployment):
    _, worker = deployment
    stream = stub.Generate(request("gone", max_new_tokens=400, stream=True), timeout=30)
    next(stream)
    stream.cancel()
    worker.wait_for(lambda e: e["request_id"] == "gone" and e["event"] in ("abort", "cancelled"))


@pytest.mark.parametrize("fields,named", [
    (dict(lora_id="adapter-1"), "lora_id"),
    (dict(mm_inputs=pb.MultimodalInputs(image_urls=["http://x/cat.png"])), "mm_inputs"),
    (dict(return_logprob=True, logprob_start_len=0), "logprob_start_len"),
    (dict(input_embeds=[0.5]), "input_embeds"),
    (dict(return_hidden_states=True), "return_hidden_states"),
    (dict(data_parallel_rank=0), "data_parallel_rank"),
])
def test_features_epserve_lacks_are_refused_by_name(stub, fields, named):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request("refused", **fields), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and named in info.value.details()


@pytest.mark.parametrize("sampling,named", [
    (dict(json_schema="{}"), "json_schema"),
    (dict(frequency_penalty=0.5), "frequency_penalty"),
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(min_new_tokens=3), "min_new_tokens"),
    (dict(logit_bias={"5": 1.0}), "logit_bias"),
    (dict(n=65), "sampling_params.n"),
    (dict(top_p=1.5), "top_p"),
])
def test_sampling_fields_epserve_lacks_or_rejects_are_named(stub, sampling, named):
    req = request("refused")
    for name, value in sampling.items():
        if name == "logit_bias":
            req.sampling_params.logit_bias.update(value)
        else:
            setattr(req.sampling_params, name, value)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(req, timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and named in info.value.details()


def test_embed_and_lora_loading_are_unimplemented(stub):
    for call, message in ((stub.Embed, pb.EmbedRequest()), (stub.LoadLoRAAdapter, pb.LoadLoRAAdapterRequest())):
        with pytest.raises(grpc.RpcError) as info:
            call(message, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert list(stub.ListLoadedLoRAAdapters(pb.ListLoadedLoRAAdaptersRequest(), timeout=5).loaded_adapters) == []


def test_loads_and_server_info_count_running_requests(stub):
    stream = stub.Generate(request("busy", max_new_tokens=400, stream=True), timeout=30)
    next(stream)
    try:
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
        assert info.active_requests == 1 and info.server_type == "grpc"
        assert "api_token" not in info.server_args.fields
        for _ in range(50):                        # the gateway probes its worker every 0.2 s
            loads = stub.GetLoads(pb.GetLoadsRequest(), timeout=5)
            if loads.loads[0].num_running_reqs == 1:
                break
            threading.Event().wait(0.1)
        assert loads.dp_rank_count == 1 and loads.loads[0].num_running_reqs == 1
        assert loads.aggregate.total_running_reqs == 1
    finally:
        stream.cancel()


def test_tokenizer_archive_streams_the_model_files(stub, gateway_model_dir):
    chunks = list(stub.GetTokenizer(smg_common_pb2.GetTokenizerRequest(), timeout=10))
    data = b"".join(c.data for c in chunks)
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(names)
    assert zipfile.ZipFile(io.BytesIO(data)).read("tokenizer.json") == (gateway_model_dir / "tokenizer.json").read_bytes()


# -- conversion, without a server --------------------------------------------------------------------

def test_request_conversion_maps_sglang_conventions():
    req = request("conv", max_new_tokens=9, n=2, return_logprob=True, top_logprobs_num=3)
    req.sampling_params.top_k = -1
    req.sampling_params.stop.append("END")
    converted = request_from_proto(req)
    assert converted.sampling.top_k == 0 and converted.sampling.max_new_tokens == 9
    assert converted.sampling.stop == ("END",) and converted.sampling.top_logprobs_num == 3
    inputs = converted.sample_inputs(default_seed=None)
    assert [i.request_id for i in inputs] == ["conv/0", "conv/1"] and all(i.sampling.seed is None for i in inputs)
    assert [i.sampling.seed for i in converted.sample_inputs(default_seed=2 ** 63 - 1)] == [2 ** 63 - 1, 0]
    req.sampling_params.ClearField("max_new_tokens")
    assert request_from_proto(req).sampling.max_new_tokens is None
    with pytest.raises(ValidationError, match="tokenized.input_ids"):
        request_from_proto(pb.GenerateRequest(request_id="empty"))


def test_complete_names_the_matched_stop():
    logprobs = [TokenLogprob(-0.5, (9, 3), (-0.5, -0.7))]
    by_token = complete_response("r", 1, [9], logprobs, FinishReason.STOP, "", 9, (), 3, 1).complete
    assert by_token.matched_token_id == 9 and by_token.index == 1 and by_token.finish_reason == "stop"
    assert list(by_token.output_logprobs.top_logprobs[0].token_ids) == [9, 3]
    by_string = complete_response("r", 0, [9], [], FinishReason.STOP, "42", None, ("42",), 3, 1).complete
    assert by_string.matched_stop_str == "42" and not by_string.HasField("output_logprobs")
    by_length = complete_response("r", 0, [], [], FinishReason.LENGTH, "", None, (), 3, 0).complete
    assert by_length.WhichOneof("matched_stop") is None
