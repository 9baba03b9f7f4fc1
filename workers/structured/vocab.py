"""A model's vocabulary as the grammar machinery needs it: the llguidance tokenizer (token bytes
and the trie its masks walk), the engine's vocab size (the mask width) and the stop token ids.
Built from tokenizer.json / tokenizer_config.json / generation_config.json with `tokenizers`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from llguidance import LLTokenizer
from tokenizers import AddedToken, Tokenizer

from dynamo.errors import DynamoError


@dataclass(frozen=True, slots=True)
class GrammarVocab:
    """Loaded once per model; shared by every grammar compiled for it.

    `vocab_size` is the engine's (the logits' width). It may exceed the tokenizer's: padded
    embedding rows have no bytes, so every mask bans them. `stop_token_ids` are allowed by a
    mask exactly when the grammar can end there."""

    ll_tokenizer: LLTokenizer
    tokenizer: Tokenizer
    vocab_size: int
    stop_token_ids: tuple[int, ...]
    mask_words: int = field(init=False)  # int32 words per bitmask row
    stop_row: np.ndarray = field(init=False, repr=False)  # a bitmask row allowing only the stops
    # byte_token_ids[b]: the id of the token that is exactly the byte b, or -1 (byte-level BPE
    # has all 256; the mocker's chooser searches over them).
    byte_token_ids: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        words = (self.vocab_size + 31) // 32
        bits = np.zeros(words * 32, dtype=np.uint8)
        bits[list(self.stop_token_ids)] = 1
        row = np.packbits(bits, bitorder="little").view(np.int32)
        row.flags.writeable = False
        object.__setattr__(self, "mask_words", words)
        object.__setattr__(self, "stop_row", row)
        byte_ids = []
        for b in range(256):
            ids = self.ll_tokenizer.tokenize_bytes(bytes([b]))
            ok = len(ids) == 1 and self.ll_tokenizer.decode_bytes(ids) == bytes([b])
            byte_ids.append(ids[0] if ok else -1)
        object.__setattr__(self, "byte_token_ids", tuple(byte_ids))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode_bytes(self, token_ids: list[int]) -> bytes:
        return self.ll_tokenizer.decode_bytes(token_ids)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    value = json.loads(path.read_text())
    return value if isinstance(value, dict) else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _stop_ids(tokenizer: Tokenizer, config: dict[str, Any], generation: dict[str, Any]) -> list[int]:
    """generation_config's eos_token_id (one or several), then tokenizer_config's eos_token."""
    ids: list[int] = []
    gen_eos = generation.get("eos_token_id")
    for value in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    eos = _token_text(config.get("eos_token"))
    eos_id = tokenizer.token_to_id(eos) if eos else None
    if eos_id is not None and eos_id not in ids:
        ids.append(eos_id)
    return ids


def load_vocab(model_path: str | Path, vocab_size: int | None = None, stop_token_ids: list[int] | None = None) -> GrammarVocab:
    """The vocabulary of the model directory `model_path`.

    vocab_size: the engine's logits width (config.json's vocab_size); default the tokenizer's.
    stop_token_ids: the ids that end generation; default the model's EOS ids."""
    root = Path(model_path)
    tokenizer_file = root / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise DynamoError(f"no tokenizer.json in model directory {str(model_path)!r}")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    config = _read_json(root / "tokenizer_config.json")
    # Added tokens that only tokenizer_config.json lists (transformers merges them the same way).
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for token_id, spec in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            content = _token_text(spec)
            if content is not None and tokenizer.token_to_id(content) is None:
                special = bool(spec.get("special", True)) if isinstance(spec, dict) else True
                tokenizer.add_tokens([AddedToken(content, special=special, normalized=False)])
    stops = list(stop_token_ids) if stop_token_ids else _stop_ids(tokenizer, config, _read_json(root / "generation_config.json"))
    return vocab_from_tokenizer(tokenizer, vocab_size, stops)


def vocab_from_tokenizer(tokenizer: Tokenizer, vocab_size: int | None, stop_token_ids: list[int]) -> GrammarVocab:
    tokenizer_size = tokenizer.get_vocab_size(with_added_tokens=True)
    size = tokenizer_size if vocab_size is None else vocab_size
    if size < tokenizer_size:
        # Ids the model cannot produce would still be in the tokenizer's trie; llguidance needs
        # the whole tokenizer, and an engine this small is not a configuration we serve.
        raise DynamoError(f"engine vocab size {size} is smaller than the tokenizer's ({tokenizer_size})")
    if not stop_token_ids:
        raise DynamoError("structured output needs at least one stop token id (no EOS id found)")
    if any(not 0 <= t < tokenizer_size for t in stop_token_ids):
        raise DynamoError(f"stop token ids {stop_token_ids} outside the tokenizer's {tokenizer_size} ids")
    copy = Tokenizer.from_str(tokenizer.to_str())  # llguidance must not see padding/truncation
    copy.no_padding()
    copy.no_truncation()
    ll = LLTokenizer(copy.to_str(), n_vocab=size, eos_token=list(stop_token_ids))
    return GrammarVocab(ll_tokenizer=ll, tokenizer=tokenizer, vocab_size=size, stop_token_ids=tuple(stop_token_ids))
