"""Helpers for the gateway tests: a tiny byte-level BPE model directory (tokenizer + config,
no weights) and real processes (the gateway, scripted attention workers) on free ports."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

REPO_ROOT = Path(__file__).resolve().parents[2]
FAKE_WORKER = Path(__file__).resolve().parent / "fake_worker.py"
CONTEXT_LENGTH = 512
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Multi-byte text: 2-byte (é, ö), 3-byte (日本語, €) and 4-byte (😀, 🎉) UTF-8 characters.
CORPUS = [
    "Hello world, héllo wörld! The café serves crème brûlée for 5 €.",
    "日本語のテキストです。東京は大きい。",
    "Emoji time 😀🎉 and more text with naïve words.",
    "The quick brown fox jumps over the lazy dog.",
]
CHAT_TEMPLATE = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] "
                 "+ '<|im_end|>' + '\\n' }}{%- endfor %}"
                 "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def build_tokenizer(vocab_size: int = 320) -> Tokenizer:
    """A byte-level BPE (Qwen's layout: special tokens after the regular ones). The vocabulary is
    small, so most multi-byte characters span several tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def write_model_dir(path: Path, tokenizer: Tokenizer, *, add_bos: bool = False) -> Path:
    """tokenizer.json, tokenizer_config.json, config.json (Qwen3-MoE shaped), generation_config.json."""
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    eos = tokenizer.token_to_id("<|endoftext|>")
    im_end = tokenizer.token_to_id("<|im_end|>")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": add_bos, "bos_token": "<|im_start|>" if add_bos else None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "model_max_length": CONTEXT_LENGTH, "chat_template": CHAT_TEMPLATE}))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "vocab_size": tokenizer.get_vocab_size(), "max_position_embeddings": CONTEXT_LENGTH,
        "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "eos_token_id": eos, "bos_token_id": None}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, im_end]}))
    return path


def _read_port(proc: subprocess.Popen, prefix: str, timeout_s: float, log: Path) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            if line.startswith(prefix):
                return int(line.strip().split("=", 1)[1])
            if not line and proc.poll() is not None:
                break
    proc.kill()
    raise RuntimeError(f"no {prefix} line within {timeout_s} s; log:\n{log.read_text()[-3000:]}")


class Process:
    def __init__(self, args: list[str], prefix: str, log: Path) -> None:
        self.log = log
        with log.open("w") as stderr:
            self.proc = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                         stderr=stderr, text=True)
        self.port = _read_port(self.proc, prefix, 30.0, log)
        self.address = f"127.0.0.1:{self.port}"

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()


class FakeWorker(Process):
    def __init__(self, tmp: Path, name: str, script: list[int], token_delay_s: float, eos_id: int,
                 *extra: str) -> None:
        self.events_path = tmp / f"{name}.events.jsonl"
        self.events_path.touch()
        super().__init__([str(FAKE_WORKER), "--worker-id", name, "--script-ids", ",".join(map(str, script)),
                          "--token-delay-s", str(token_delay_s), "--eos-id", str(eos_id),
                          "--events", str(self.events_path), *extra], "WORKER_PORT=", tmp / f"{name}.log")

    def events(self, request_id: str | None = None) -> list[dict]:
        lines = self.events_path.read_text().splitlines()
        events = [json.loads(line) for line in lines if line.strip()]
        return [e for e in events if request_id is None or e["request_id"] == request_id]

    def wait_for(self, predicate: Callable[[dict], bool], timeout_s: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for event in self.events():
                if predicate(event):
                    return event
            time.sleep(0.02)
        raise AssertionError(f"no matching event within {timeout_s} s; events: {self.events()}")

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


class GatewayProcess(Process):
    def __init__(self, tmp: Path, model_dir: Path, workers: list[str], *extra: str) -> None:
        static = ["--attention-workers", ",".join(workers)] if workers else []
        super().__init__(["-m", "epserve.gateway", "--model-path", str(model_dir), "--host", "127.0.0.1", "--port", "0",
                          *static, "--refresh-interval-s", "0.2", "--rpc-timeout-s", "2", *extra],
                         "GATEWAY_PORT=", tmp / "gateway.log")
