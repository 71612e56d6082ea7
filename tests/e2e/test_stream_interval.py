"""``--stream-interval``: the attention worker streams at least N tokens per message, through the gateway
to the client, with the same tokens and text as one per message; a stop string inside a message ends
the request at the token that completed it."""

from __future__ import annotations

import pytest
import torch

from epserve.deployment import LocalDeployment

from epserve.deployment_config import DeploymentConfig
from epserve.gateway.client import stream_generate

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

PROMPT = "The colour of the sea is"
INTERVAL = 4


@pytest.fixture(scope="module")
def greedy_ids(tiny_model):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64,
                                                              experts_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=14, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist(), tok


@pytest.fixture(scope="module")
def gateway(tiny_model, tmp_path_factory):
    config = DeploymentConfig(model_path=str(tiny_model), num_attention_workers=1, num_expert_workers=1,
                              dtype="float64", log_dir=str(tmp_path_factory.mktemp("logs")),
                              extra_attention_args=["--stream-interval", str(INTERVAL)])
    with LocalDeployment(config) as running:
        yield f"127.0.0.1:{running.gateway_port}"


def collect(gateway, **sampling):
    messages = list(stream_generate(gateway, PROMPT, temperature=0.0, timeout_s=120, **sampling))
    assert messages[-1].finished
    return messages


def test_messages_carry_the_interval_and_the_same_tokens(gateway, greedy_ids):
    ids, tok = greedy_ids
    messages = collect(gateway, max_new_tokens=14, ignore_eos=True)
    sizes = [len(m.token_ids) for m in messages]
    assert all(size >= INTERVAL for size in sizes[:-1]) and sum(sizes) == 14, sizes
    assert [t for m in messages for t in m.token_ids] == ids
    assert "".join(m.text for m in messages) == tok.decode(ids, skip_special_tokens=True)


def test_a_stop_string_inside_a_message_ends_at_its_token(gateway, greedy_ids):
    ids, tok = greedy_ids
    text = tok.decode(ids, skip_special_tokens=True)
    at = next(i for i in range(len(text) // 2, len(text) - 2) if text.find(text[i:i + 2]) == i)
    stop = text[at:at + 2]
    upto = next(k for k in range(1, len(ids) + 1) if stop in tok.decode(ids[:k], skip_special_tokens=True))
    messages = collect(gateway, max_new_tokens=14, ignore_eos=True, stop=[stop])
    assert messages[-1].matched_stop == stop
    assert "".join(m.text for m in messages) == text[:at]
    assert [t for m in messages for t in m.token_ids] == ids[:upto]      # nothing past the stop's token
