"""Tokenizers: the byte-level default, tokenizer.json files, and each synthetic task's symbols.

All of them follow one small protocol (``Tokenizer``); ids 0 / 1 / 2 are pad / bos / eos for the
byte and task tokenizers. A tokenizer.json keeps its own special-token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from jaxlm.data.config import BYTE_TOKENIZER, DataConfig
from jaxlm.errors import ConfigError

EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]")
PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>")


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes: id 0 pad, 1 bos, 2 eos, then byte ``b`` is id ``b + 3`` (vocabulary of 259)."""

    pad_id, bos_id, eos_id = 0, 1, 2
    num_special = 3
    vocab_size = 256 + num_special

    def encode(self, text: str) -> list[int]:
        """Token ids of the UTF-8 bytes of ``text``: ``id = byte + 3``."""
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` as an int32 array (fast path for the data pipeline)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + self.num_special

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``: special ids are skipped, invalid UTF-8 becomes U+FFFD."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"byte token ids must be in [0, {self.vocab_size}); got min {ids.min()}, max {ids.max()}")
        data = (ids[ids >= self.num_special] - self.num_special).astype(np.uint8)
        return data.tobytes().decode("utf-8", errors="replace")


def _first_present(tokenizer, names: Sequence[str]) -> int | None:
    for name in names:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


class HFTokenizer:
    """A ``tokenizers`` tokenizer.json file.

    Special tokens are looked up by their usual names: eos from ``EOS_NAMES`` (required: every
    document ends with it), bos from ``BOS_NAMES`` (else the eos token), pad from ``PAD_NAMES``
    (else id 0; padded positions are never scored, so the pad id only matters for display).
    ``encode`` adds no special tokens; ``decode`` drops them.
    """

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _Tokenizer

        try:
            self._tokenizer = _Tokenizer.from_file(path)
        except Exception as error:  # tokenizers raises a plain Exception for unreadable files
            raise ConfigError("data.tokenizer", path, f"a readable tokenizer.json file ({error})") from error
        eos_id = _first_present(self._tokenizer, EOS_NAMES)
        if eos_id is None:
            raise ConfigError("data.tokenizer", path, f"a tokenizer.json with an end-of-text token, one of {EOS_NAMES}")
        self.eos_id = eos_id
        bos_id = _first_present(self._tokenizer, BOS_NAMES)
        self.bos_id = eos_id if bos_id is None else bos_id
        pad_id = _first_present(self._tokenizer, PAD_NAMES)
        self.pad_id = 0 if pad_id is None else pad_id
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` as an int32 array."""
        return np.asarray(self.encode(text), dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens skipped."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def tokenizer_for(config: DataConfig) -> Tokenizer:
    """The tokenizer of ``config``: the task's symbols for synthetic sources, else ``config.tokenizer``."""
    if config.is_synthetic:
        from jaxlm.tasks import task_from_config

        return task_from_config(config).tokenizer
    if config.tokenizer == BYTE_TOKENIZER:
        return ByteTokenizer()
    return HFTokenizer(config.tokenizer)


def encode_document(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Token ids of one document followed by EOS, int32 ``[len + 1]``."""
    encode = getattr(tokenizer, "encode_array", None)
    ids = encode(text) if encode is not None else np.asarray(tokenizer.encode(text), dtype=np.int32)
    return np.append(ids, np.int32(tokenizer.eos_id)).astype(np.int32)
