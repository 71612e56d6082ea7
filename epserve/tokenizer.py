"""The model's tokenizer, read from ``tokenizer.json`` with the ``tokenizers`` library.

No transformers import: processes that only tokenize stay light. Encoding applies the
tokenizer's own post-processor (special tokens as the model expects); decoding skips special
tokens, as ``transformers``' ``decode(..., skip_special_tokens=True)`` does.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from epserve.model_config import ModelConfigError


class TextTokenizer:
    def __init__(self, model_path: str | Path) -> None:
        path = Path(model_path) / "tokenizer.json"
        if not path.is_file():
            raise ModelConfigError(f"{model_path} has no tokenizer.json")
        self._tokenizer = Tokenizer.from_file(str(path))

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)
