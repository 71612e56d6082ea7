"""The gateway on the model directory of `epserve make-tiny-model` (tests/conftest.py's
``tiny_model``): its tokenizer files, config and EOS ids, end to end with a scripted worker."""

from __future__ import annotations

from gateway_testlib import FakeWorker, GatewayProcess

from epserve.gateway import client
from epserve.gateway.detokenizer import IncrementalDetokenizer
from epserve.model_config import load_model_spec
from epserve.tokenizer import Tokenizer

TEXT = "The lighthouse keeper wrote: 日本語のテキスト 😀🎉 — café, naïve, 5 €."


def test_tiny_model_tokenizer_and_config(tiny_model) -> None:
    tokenizer = Tokenizer.from_dir(tiny_model)
    info = load_model_spec(tiny_model)
    assert info.architecture == "Qwen3MoeForCausalLM" and info.num_moe_layers >= 1
    assert info.eos_token_ids and all(0 <= e < info.vocab_size for e in info.eos_token_ids)
    assert tokenizer.bos_token_id is None          # Qwen-style: no BOS
    ids = tokenizer.encode(TEXT)
    assert any(tokenizer.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids)))
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add([t]) for t in ids] + [detokenizer.flush()]
    assert "".join(pieces) == TEXT and not any("\ufffd" in p for p in pieces)


def test_gateway_serves_tiny_model(tmp_path, tiny_model) -> None:
    tokenizer = Tokenizer.from_dir(tiny_model)
    eos = load_model_spec(tiny_model).eos_token_ids[0]
    script = [*tokenizer.encode(TEXT), eos]
    worker = FakeWorker(tmp_path, "tiny", script, 0.002, eos)
    gateway = GatewayProcess(tmp_path, tiny_model, [worker.address])
    try:
        client.wait_until_serving(gateway.address, 15)
        result = client.generate(gateway.address, "Hello", max_new_tokens=200, temperature=0.0)
        assert result.token_ids == script and result.text == TEXT
        assert result.final.finish_reason == 1 and result.final.usage.completion_tokens == len(script)  # STOP
        info = client.get_model_info(gateway.address)
        assert info.max_context_length == load_model_spec(tiny_model).max_position_embeddings
    finally:
        gateway.stop()
        worker.stop()
