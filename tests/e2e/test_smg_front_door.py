"""SGLang's model gateway (``smg``, a dev dependency) in front of a real ``epserve up``: the OpenAI API
served by SMG over the gateway's SglangScheduler service, checked against transformers (float64).

One deployment (1 attention worker, 2 expert workers, float64, torch data plane, the gateway with
``--sglang-default-seed``) and one ``smg launch --worker-urls grpc://GATEWAY`` (no --model-path: SMG
takes the tokenizer from the worker) serve every test of the module."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from epserve_up import epserve_up

from epserve.gateway.client import generate, stream_generate
from epserve.protos import placement_pb2, placement_pb2_grpc, worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")

SEED = 1234
PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Tell me about mixture of experts."}]
LOGPROB_TOLERANCE = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def deployment(tiny_model, tmp_path_factory):
    args = ["--model-path", str(tiny_model), "--dtype", "float64", "--attention-workers", "1", "--ep-size", "2",
            "--sglang-default-seed", str(SEED)]
    with epserve_up(args, tmp_path_factory.mktemp("up")) as endpoints:
        yield endpoints


@pytest.fixture(scope="module")
def smg(deployment, tmp_path_factory) -> str:
    """SMG's HTTP address, once it lists the model."""
    binary = shutil.which("smg") or str(Path(__import__("sys").executable).parent / "smg")
    if not Path(binary).exists():
        pytest.skip("smg is not installed (pip install -e '.[dev]')")
    port = free_port()
    log = tmp_path_factory.mktemp("smg") / "smg.log"
    with log.open("w") as out:
        proc = subprocess.Popen([binary, "launch", "--host", "127.0.0.1", "--port", str(port), "--prometheus-port",
                                 str(free_port()), "--worker-urls", f"grpc://{deployment['gateway']}",
                                 "--disable-retries", "--log-level", "warn"], stdout=out, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"smg exited:\n{log.read_text()[-3000:]}"
            try:
                if get_json(address, "/v1/models")["data"]:
                    break
            except (OSError, urllib.error.URLError, KeyError, ValueError):
                pass
            assert time.monotonic() < deadline, f"smg lists no model after 60 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.3)
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def model_id(tiny_model) -> str:
    """The name SMG serves the model under: GetModelInfo's served_model_name, the directory's name."""
    return Path(tiny_model).name


@pytest.fixture(scope="module")
def reference(tiny_model):
    """transformers in float64: greedy continuations and the log-softmax along a sequence."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64,
                                                              experts_implementation="eager").eval()
    return model, transformers.AutoTokenizer.from_pretrained(tiny_model)


def get_json(address: str, path: str) -> dict:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=30) as response:
        return json.load(response)


def post_json(address: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://{address}{path}", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def post_stream(address: str, path: str, body: dict) -> list[dict]:
    """The SSE events of a streamed answer, up to [DONE]."""
    conn = http.client.HTTPConnection(address, timeout=120)
    conn.request("POST", path, json.dumps({**body, "stream": True}), {"content-type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    events = []
    for line in response:
        line = line.strip()
        if line.startswith(b"data: "):
            data = line[len(b"data: "):]
            if data == b"[DONE]":
                break
            events.append(json.loads(data))
    conn.close()
    return events


def greedy_ids(reference, ids: list[int], max_new_tokens: int) -> list[int]:
    model, _ = reference
    return model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)[0, len(ids):].tolist()


def greedy(reference, ids: list[int], max_new_tokens: int) -> str:
    return reference[1].decode(greedy_ids(reference, ids, max_new_tokens), skip_special_tokens=True)


def chat_ids(reference) -> list[int]:
    _, tok = reference
    return tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def test_models_lists_the_served_model(smg, model_id):
    assert [m["id"] for m in get_json(smg, "/v1/models")["data"]] == [model_id]


def test_completions_greedy_text_equals_transformers(smg, model_id, reference):
    _, tok = reference
    ids = tok(PROMPT)["input_ids"]
    want = greedy(reference, ids, 16)
    body = {"model": model_id, "prompt": PROMPT, "max_tokens": 16, "temperature": 0}
    answer = post_json(smg, "/v1/completions", body)
    assert answer["choices"][0]["text"] == want
    assert answer["usage"]["prompt_tokens"] == len(ids)
    events = post_stream(smg, "/v1/completions", body)
    assert "".join(c["text"] for e in events for c in e["choices"]) == want
    assert events[-1]["choices"][-1]["finish_reason"] in ("length", "stop")


def test_chat_greedy_text_equals_transformers_through_the_chat_template(smg, model_id, reference):
    want = greedy(reference, chat_ids(reference), 12)
    body = {"model": model_id, "messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    answer = post_json(smg, "/v1/chat/completions", body)
    assert answer["choices"][0]["message"]["content"] == want
    assert answer["usage"]["prompt_tokens"] == len(chat_ids(reference))
    events = post_stream(smg, "/v1/chat/completions", body)
    assert "".join(c["delta"].get("content") or "" for e in events for c in e["choices"]) == want


def test_chat_logprobs_match_transformers(smg, model_id, reference):
    model, tok = reference
    prompt = chat_ids(reference)
    body = {"model": model_id, "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "logprobs": True,
            "top_logprobs": 3}
    content = post_json(smg, "/v1/chat/completions", body)["choices"][0]["logprobs"]["content"]
    assert len(content) == 6
    generated = greedy_ids(reference, prompt, 6)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + generated])).logits[0, len(prompt) - 1:-1]
    want = torch.log_softmax(logits, dim=-1)                                          # [6, V]
    for position, entry in enumerate(content):
        top = torch.topk(want[position], 3)
        assert entry["logprob"] == pytest.approx(float(top.values[0]), abs=LOGPROB_TOLERANCE)   # greedy: the top one
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(top.values.tolist(),
                                                                             abs=LOGPROB_TOLERANCE)
        assert [t["token"] for t in entry["top_logprobs"]] == [tok.decode([int(i)]) for i in top.indices]
    # Streamed, SMG sends the logprobs of each chunk it emits text for; a token whose bytes are not
    # valid UTF-8 alone is held back and merged into the next chunk, and its logprob is not sent.
    streamed = [(lp["token"], lp["logprob"]) for e in post_stream(smg, "/v1/chat/completions", body)
                for c in e["choices"] for lp in ((c.get("logprobs") or {}).get("content") or [])]
    remaining = iter((e["token"], e["logprob"]) for e in content)
    assert streamed and all(any(token == t and logprob == pytest.approx(lp, abs=1e-6) for t, lp in remaining)
                            for token, logprob in streamed), (streamed, content)


def test_epserve_v1_logprobs_match_transformers(deployment, reference):
    """The same logprobs through the gateway's own API (token ids in, ``return_logprob``)."""
    model, _ = reference
    prompt = chat_ids(reference)
    responses = list(stream_generate(deployment["gateway"], token_ids=prompt, max_new_tokens=4, temperature=0,
                                     return_logprob=True, top_logprobs_num=2, timeout_s=120))
    tokens = [t for r in responses for t in r.token_ids]
    logprobs = [lp for r in responses for lp in r.logprobs]
    assert tokens == greedy_ids(reference, prompt, 4) and len(logprobs) == 4
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1], dim=-1)
    assert [lp.logprob for lp in logprobs] == pytest.approx([float(want[i, t]) for i, t in enumerate(tokens)],
                                                            abs=LOGPROB_TOLERANCE)
    assert [list(lp.top_token_ids) for lp in logprobs] == [torch.topk(row, 2).indices.tolist() for row in want]


def test_n2_samples_are_reproducible_and_seeded_per_sample(smg, model_id, deployment):
    body = {"model": model_id, "prompt": PROMPT, "max_tokens": 8, "temperature": 0.9, "n": 2}
    first = post_json(smg, "/v1/completions", body)
    again = post_json(smg, "/v1/completions", body)
    texts = [c["text"] for c in sorted(first["choices"], key=lambda c: c["index"])]
    assert texts == [c["text"] for c in sorted(again["choices"], key=lambda c: c["index"])]
    # sample i samples with --sglang-default-seed + i: the epserve.v1 API gives the same with those seeds
    direct = [generate(deployment["gateway"], PROMPT, max_new_tokens=8, temperature=0.9, seed=SEED + i,
                       timeout_s=120).text for i in range(2)]
    assert texts == direct
    assert texts[0] != texts[1]


def test_client_disconnect_aborts_the_request_at_the_worker(smg, model_id, deployment):
    """The HTTP client goes away mid-stream: SMG cancels its gRPC stream (and sends Abort), the gateway
    aborts the request at its attention worker, whose KV blocks are freed long before the request could
    have finished (the time its remaining tokens take at the rate they were streamed)."""
    max_tokens, read = 1500, 40
    conn = http.client.HTTPConnection(smg, timeout=60)
    body = {"model": model_id, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    stamps = []
    for line in response:
        if line.startswith(b"data: "):
            stamps.append(time.monotonic())
            if len(stamps) == read:
                break
    seconds_per_token = (stamps[-1] - stamps[0]) / (read - 1)
    workers = attention_workers(deployment["placement"])
    assert any(load(w).num_running for w in workers), "the request should still run"
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    gone = time.monotonic()
    rest_s = (max_tokens - read) * seconds_per_token
    while any(load(w).num_running or load(w).kv_blocks_free != load(w).kv_blocks_total for w in workers):
        assert time.monotonic() - gone < min(rest_s / 2, 10.0), ([load(w) for w in workers], rest_s)
        time.sleep(0.05)


def attention_workers(placement: str) -> list[str]:
    with grpc.insecure_channel(placement) as channel:
        workers = placement_pb2_grpc.PlacementAdminStub(channel).ListWorkers(
            placement_pb2.ListWorkersRequest(), timeout=5).workers
    return [w.address for w in workers if w.role == placement_pb2.WORKER_ROLE_ATTENTION]


def load(address: str) -> worker_pb2.WorkerLoad:
    with grpc.insecure_channel(address) as channel:
        return worker_pb2_grpc.AttentionWorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
