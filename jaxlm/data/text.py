"""Text documents: reading files, the held-out split, and packing token streams into windows.

Supported files (a single file, or a folder searched recursively in sorted path order):

- ``.txt``: documents are separated by blank lines (one or more empty lines); a file without blank
  lines is one document. Leading/trailing whitespace of each document is stripped.
- ``.jsonl``: one JSON object per line; the document is the string under ``text_field``.
- ``.parquet``: the string column ``text_field`` (read with pyarrow), one document per row.

Empty documents are skipped. In a folder, files of other types (READMEs, tokenizer.json, ...) are
ignored; a folder without any supported file is an error, as is a file of an unsupported type.
"""

from __future__ import annotations

import json
import os
import re

import grain
import grain.experimental as grain_experimental
import numpy as np

from jaxlm.data.config import DataConfig
from jaxlm.errors import ConfigError, require

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")
PAD_ID = 0


def list_text_files(path: str, field: str = "data.path") -> list[str]:
    """The supported files under ``path`` (itself if a file), in sorted order."""
    require(bool(path) and os.path.exists(path), field, path, "an existing file or folder")
    if os.path.isfile(path):
        require(path.endswith(TEXT_SUFFIXES), field, path, f"a file ending in one of {TEXT_SUFFIXES}")
        return [path]
    files = sorted(
        os.path.join(folder, name)
        for folder, _, names in os.walk(path)
        for name in names
        if name.endswith(TEXT_SUFFIXES) and not name.startswith(".")
    )
    require(bool(files), field, path, f"a folder holding at least one file ending in one of {TEXT_SUFFIXES}")
    return files


def read_txt_documents(file: str) -> list[str]:
    """Documents of a .txt file: the blank-line-separated blocks, stripped, empty ones dropped."""
    with open(file, encoding="utf-8", errors="replace") as handle:
        blocks = BLANK_LINES.split(handle.read())
    return [block.strip() for block in blocks if block.strip()]


def read_jsonl_documents(file: str, text_field: str) -> list[str]:
    """Documents of a .jsonl file: ``record[text_field]`` of every non-empty line."""
    documents = []
    with open(file, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError("data.path", file, f"valid JSON on every line (line {line_number}: {error})") from error
            text = record.get(text_field) if isinstance(record, dict) else None
            require(isinstance(text, str), "data.text_field", text_field,
                    f"a string field present in every line of the .jsonl files (missing in {file}, line {line_number})")
            if text:
                documents.append(text)
    return documents


def read_parquet_documents(file: str, text_field: str) -> list[str]:
    """Documents of a .parquet file: the non-empty strings of column ``text_field``."""
    import pyarrow.parquet as parquet

    columns = parquet.read_schema(file).names
    require(text_field in columns, "data.text_field", text_field, f"a column of {file}; it has {columns}")
    values = parquet.read_table(file, columns=[text_field]).column(text_field).to_pylist()
    return [text for text in values if isinstance(text, str) and text]


def read_documents(path: str, text_field: str = "text", field: str = "data.path") -> list[str]:
    """All documents under ``path`` (a file or folder), in sorted file order; an error when there are none."""
    documents = []
    for file in list_text_files(path, field):
        if file.endswith(".txt"):
            documents += read_txt_documents(file)
        elif file.endswith(".jsonl"):
            documents += read_jsonl_documents(file, text_field)
        else:
            documents += read_parquet_documents(file, text_field)
    require(bool(documents), field, path, "files holding at least one non-empty document")
    return documents


def held_out_stride(fraction: float) -> int:
    """Every ``k``-th document is held out, ``k = max(2, round(1 / fraction))``."""
    return max(2, round(1.0 / fraction))


def split_held_out(documents: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(train, eval): documents ``k-1, 2k-1, ...`` (``k = held_out_stride(fraction)``) go to eval."""
    stride = held_out_stride(fraction)
    if len(documents) < stride:
        raise ConfigError("data.path", f"{len(documents)} documents", f"at least {stride} documents to hold out "
                          f"1 in {stride} for evaluation (data.text_eval_fraction={fraction}), or set data.eval_path")
    train = [doc for i, doc in enumerate(documents) if i % stride != stride - 1]
    held_out = documents[stride - 1 :: stride]
    return train, held_out


def train_and_eval_documents(config: DataConfig) -> tuple[list[str], list[str]]:
    """The training and evaluation documents of a text config (``eval_path`` or the held-out split)."""
    documents = read_documents(config.path, config.text_field)
    if config.eval_path:
        return documents, read_documents(config.eval_path, config.text_field, field="data.eval_path")
    return split_held_out(documents, config.text_eval_fraction)


def _window(ids: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
    return {"ids": ids.astype(np.int32), "segment_ids": segment_ids.astype(np.int32),
            "positions": positions.astype(np.int32)}


class SplitAndPad(grain_experimental.FlatMapTransform):
    """One document -> windows of ``length`` tokens: consecutive pieces, the last one right-padded.

    Each window holds a single segment (id 1, positions from 0); padding has segment id 0.
    """

    max_fan_out = 2**31  # documents may be arbitrarily long; the iterator does not enforce it

    def __init__(self, length: int):
        self.length = length

    def flat_map(self, ids: np.ndarray) -> list[dict[str, np.ndarray]]:
        windows = []
        for start in range(0, len(ids), self.length):
            piece = ids[start : start + self.length]  # [n <= length]
            padding = self.length - len(piece)
            real = np.arange(self.length) < len(piece)  # [length]
            windows.append(_window(np.pad(piece, (0, padding), constant_values=PAD_ID), real,
                                   np.where(real, np.arange(self.length), 0)))
        return windows


def _rename_packed(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return _window(packed["ids"], packed["ids_segment_ids"], packed["ids_positions"])


def pack_windows(documents: grain.IterDataset, length: int, pack: bool) -> grain.IterDataset:
    """Token documents (int32 arrays) -> windows ``{"ids", "segment_ids", "positions"}`` of ``length``.

    ``pack=True``: concatenate-then-split (grain's ``ConcatThenSplitIterDataset``): documents are
    laid end to end, a document crossing a window boundary continues in the next window as a new
    segment (positions restart at 0); no token is dropped; only the very end of a finite stream is
    padded. ``pack=False``: every document gets windows of its own (``SplitAndPad``).
    Segment ids count 1, 2, ... within a window; 0 marks padding.
    """
    if not pack:
        return grain_experimental.FlatMapIterDataset(documents, SplitAndPad(length))
    packed = grain_experimental.ConcatThenSplitIterDataset(
        documents.map(lambda ids: {"ids": ids}), length_struct={"ids": length})
    return packed.map(_rename_packed)
