"""Byte-level BPE tokenizers for tiny test models, in the layout of Qwen's tokenizers.

The tokenizer is trained with the ``tokenizers`` library on ``epserve/data/tiny_corpus.txt``
(shipped as package data, so no network is needed). The pipeline is the one
``transformers.Qwen2Tokenizer`` builds (NFC normalizer, Qwen's pre-tokenizer regex, byte-level
pre-tokenizer and decoder), so ``tokenizers.Tokenizer.from_file`` and
``transformers.AutoTokenizer`` encode identically. As in Qwen's vocabularies the special tokens
come after the regular tokens: ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``.

Training is deterministic (same corpus and size → byte-identical files) and takes tens of
milliseconds; trained tokenizers are cached per vocabulary size for the life of the process.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5-style ChatML template without a default system prompt and without tool calling.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens


def read_corpus() -> str:
    """The training corpus shipped in ``epserve/data/tiny_corpus.txt``."""
    return importlib.resources.files("epserve").joinpath("data/tiny_corpus.txt").read_text(encoding="utf-8")


def corpus_lines() -> list[str]:
    """Non-empty corpus lines, each with its trailing newline (the unit the trainer sees)."""
    return [line + "\n" for line in read_corpus().split("\n") if line.strip()]


@functools.lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int) -> str:
    tokenizer = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                                     fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(corpus_lines(), trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer.to_str()


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer with at most ``vocab_size`` tokens, specials included.

    It has fewer tokens when the corpus runs out of pairs seen twice (a few thousand tokens);
    the model's embedding is then larger than the tokenizer, as in Qwen's published models.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs >= {MIN_VOCAB_SIZE}")
    return Tokenizer.from_str(_trained_tokenizer_json(vocab_size))


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    return {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}


def save_tokenizer(tokenizer: Tokenizer, out_dir: Path, *, model_max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json, vocab.json and merges.txt as Qwen's repos have them."""
    out_dir = Path(out_dir)
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=True)
    tokenizer.model.save(str(out_dir), None)  # vocab.json, merges.txt (for tools that want the slow format)
    ids = special_token_ids(tokenizer)
    added_tokens_decoder = {
        str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
