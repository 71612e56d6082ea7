"""The model's tokenizer, from tokenizer.json through the ``tokenizers`` library (no transformers).

BOS: the text is encoded without the tokenizer's own special-token template, and the BOS token is
prepended only when tokenizer_config.json says ``add_bos_token: true`` (Llama-style); Qwen-style
configs leave it out. Decoding skips special tokens by default and ignores ids the tokenizer
does not know (the embedding may be padded past the tokenizer's vocabulary).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import tokenizers


class Tokenizer:
    def __init__(self, tokenizer: tokenizers.Tokenizer, bos_token_id: int | None = None) -> None:
        self._tokenizer = tokenizer
        self.bos_token_id = bos_token_id

    @classmethod
    def from_dir(cls, model_path: str | Path) -> Tokenizer:
        path = Path(model_path)
        tokenizer_path = path / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise ValueError(f"--model-path {path}: no tokenizer.json there")
        tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_path))
        config_path = path / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        bos_token_id = None
        if config.get("add_bos_token"):
            bos = config.get("bos_token")
            if isinstance(bos, dict):
                bos = bos.get("content")
            if not bos:
                raise ValueError(f"{config_path}: add_bos_token is true but bos_token is not set")
            bos_token_id = tokenizer.token_to_id(bos)
            if bos_token_id is None:
                raise ValueError(f"{config_path}: bos_token {bos!r} is not in tokenizer.json's vocabulary")
        return cls(tokenizer, bos_token_id)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if self.bos_token_id is not None else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
