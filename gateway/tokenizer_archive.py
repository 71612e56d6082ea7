"""The model's tokenizer files as one zip, for SMG's GetTokenizer (SMG builds its tokenizer from it
when it has no local copy of the model). Built once, in memory; files at the archive's root."""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
                   "generation_config.json", "config.json")
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class TokenizerArchive:
    data: bytes                      # the zip
    sha256: str                      # hex digest of ``data``
    names: tuple[str, ...]           # files in it

    def chunks(self) -> list[bytes]:
        return [self.data[i:i + CHUNK_BYTES] for i in range(0, len(self.data), CHUNK_BYTES)] or [b""]


def build_tokenizer_archive(model_path: str | Path) -> TokenizerArchive:
    """Raises ValueError when the directory has no tokenizer.json."""
    path = Path(model_path)
    names = tuple(name for name in TOKENIZER_FILES if (path / name).is_file())
    if "tokenizer.json" not in names:
        raise ValueError(f"{path}: no tokenizer.json to send")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in names:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))   # same bytes for the same files
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, (path / name).read_bytes())
    data = buffer.getvalue()
    return TokenizerArchive(data, hashlib.sha256(data).hexdigest(), names)
