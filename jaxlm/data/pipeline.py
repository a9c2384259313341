"""grain pipelines: training iterators and fixed evaluation batches.

Every batch is a dict of numpy arrays with the PER-HOST batch ``b = batch_size // process_count``:

- ``tokens [b, T] int32``: inputs; ``targets [b, T] int32``: the next tokens;
- ``loss_mask [b, T] float32``: 1 where the target is scored (synthetic: the answers; text: every
  target that continues the same document);
- ``positions [b, T] int32``: restart at 0 in each packed segment;
- ``segment_ids [b, T] int32``: 1, 2, ... per packed document, 0 for padding.

Sharding: the pipeline defines one GLOBAL stream of batches of ``batch_size`` rows; host ``p``
takes rows ``[p b, (p + 1) b)`` of every global batch. The shards are disjoint, together they are
exactly the single-host stream, and the data seen does not depend on the number of hosts.
Synthetic examples are generated only for the host's own rows (random access); text hosts each
pack the whole (shuffled) document stream and keep their rows.
"""

from __future__ import annotations

import functools

import grain
import jax
import numpy as np

from jaxlm import tasks
from jaxlm.data.config import DataConfig, per_host_batch_size
from jaxlm.data.text import pack_windows, train_and_eval_documents
from jaxlm.data.tokenizers import encode_document, tokenizer_for
from jaxlm.errors import require

BATCH_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")
# Bounded read-ahead: the default (500 elements) would hold hundreds of long batches in memory.
READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=16)


def training_example(ids: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray,
                     scored: np.ndarray) -> dict[str, np.ndarray]:
    """A window of ``T + 1`` tokens -> one example of length ``T``.

    ``tokens = ids[:-1]``, ``targets = ids[1:]``, ``loss_mask = scored[1:]`` (``scored[t]``: token
    ``t`` of the window is a target that counts), segment ids and positions of the inputs.
    """
    return {
        "tokens": ids[:-1].astype(np.int32),  # [T]
        "targets": ids[1:].astype(np.int32),  # [T]
        "loss_mask": scored[1:].astype(np.float32),  # [T]
        "positions": positions[:-1].astype(np.int32),  # [T]
        "segment_ids": segment_ids[:-1].astype(np.int32),  # [T]
    }


def text_example(window: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Training example of a packed text window: a target counts when it continues its input's document."""
    segment_ids = window["segment_ids"]  # [T + 1]
    scored = np.zeros(len(segment_ids), dtype=bool)  # [T + 1]
    scored[1:] = (segment_ids[1:] == segment_ids[:-1]) & (segment_ids[1:] > 0)
    return training_example(window["ids"], segment_ids, window["positions"], scored)


def task_example(item: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """Training example of a synthetic task sequence: one segment (its non-pad tokens), the answers scored."""
    ids, answer_mask = item  # [T + 1], [T + 1]
    real = ids != tasks.symbols.PAD_ID  # [T + 1]; tasks only pad on the right
    positions = np.where(real, np.arange(len(ids)), 0)  # [T + 1]
    return training_example(ids, real.astype(np.int32), positions, answer_mask)


def global_example_index(local_index: int, *, process_index: int, host_batch: int, global_batch: int) -> int:
    """Index in the global stream of a host's ``local_index``: ``step * B + p * b + row``."""
    step, row = divmod(local_index, host_batch)
    return step * global_batch + process_index * host_batch + row


def host_rows(batch: dict[str, np.ndarray], *, process_index: int, host_batch: int) -> dict[str, np.ndarray]:
    """Rows ``[p b, (p + 1) b)`` of a global batch."""
    start = process_index * host_batch
    return {key: value[start : start + host_batch] for key, value in batch.items()}


def _resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    require(isinstance(process_count, int) and process_count > 0, "process_count", process_count, "a positive integer")
    require(isinstance(process_index, int) and 0 <= process_index < process_count, "process_index", process_index,
            f"an integer in [0, process_count={process_count})")
    return process_index, process_count


def synthetic_batches(config: DataConfig, stream: int, process_index: int, process_count: int) -> grain.MapDataset:
    """Random-access per-host batches of a synthetic task: element ``s`` is this host's rows of global batch ``s``."""
    host_batch = per_host_batch_size(config, process_count)
    task = tasks.task_from_config(config)
    source = tasks.TaskSource(task, config.seed, stream)
    to_global = functools.partial(global_example_index, process_index=process_index, host_batch=host_batch,
                                  global_batch=config.batch_size)
    num_examples = (len(source) // config.batch_size) * host_batch
    examples = grain.MapDataset.range(num_examples).map(lambda i: source[to_global(i)]).map(task_example)
    return examples.batch(host_batch, drop_remainder=True)


def text_windows(config: DataConfig, documents: list[str], *, shuffle_and_repeat: bool) -> grain.IterDataset:
    """Tokenized (EOS-terminated) documents packed into windows of ``seq_len + 1`` tokens."""
    tokenizer = tokenizer_for(config)
    dataset = grain.MapDataset.source(documents)
    if shuffle_and_repeat:
        dataset = dataset.shuffle(seed=config.seed).repeat(None)  # a fresh permutation every epoch
    token_documents = dataset.map(functools.partial(encode_document, tokenizer))
    return pack_windows(token_documents.to_iter_dataset(READ_OPTIONS), config.seq_len + 1, config.pack)


def make_train_iterator(config: DataConfig, *, process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
    """Infinite, deterministic iterator of this host's training batches.

    ``get_state()`` is JSON-serialisable and ``set_state(state)`` resumes the exact same sequence
    of batches. Defaults: ``jax.process_index()`` / ``jax.process_count()``.
    """
    config.validate()
    process_index, process_count = _resolve_processes(process_index, process_count)
    if config.is_synthetic:
        return iter(synthetic_batches(config, tasks.TRAIN_STREAM, process_index, process_count)
                    .to_iter_dataset(READ_OPTIONS))
    host_batch = per_host_batch_size(config, process_count)
    train_documents, _ = train_and_eval_documents(config)
    batches = (text_windows(config, train_documents, shuffle_and_repeat=True)
               .map(text_example)
               .batch(config.batch_size, drop_remainder=True)
               .map(functools.partial(host_rows, process_index=process_index, host_batch=host_batch)))
    return iter(batches)


def _pad_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Append all-zero rows (no tokens scored, segment id 0) up to ``rows``."""
    return {key: np.pad(value, [(0, rows - len(value))] + [(0, 0)] * (value.ndim - 1)) for key, value in batch.items()}


def make_eval_batches(config: DataConfig, num_batches: int, *, process_index: int | None = None,
                      process_count: int | None = None) -> list[dict[str, np.ndarray]]:
    """A fixed, deterministic held-out set of this host's batches.

    Synthetic: the first ``num_batches`` global batches of the evaluation stream (disjoint from
    training). Text: the evaluation documents packed once, in order; when they run out the list
    is shorter than ``num_batches`` and its last global batch is completed with all-padding rows.
    """
    require(isinstance(num_batches, int) and num_batches > 0, "num_batches", num_batches, "a positive integer")
    config.validate()
    process_index, process_count = _resolve_processes(process_index, process_count)
    host_batch = per_host_batch_size(config, process_count)
    if config.is_synthetic:
        batches = synthetic_batches(config, tasks.EVAL_STREAM, process_index, process_count)
        return [batches[step] for step in range(num_batches)]
    _, eval_documents = train_and_eval_documents(config)
    global_batches = (text_windows(config, eval_documents, shuffle_and_repeat=False)
                      .map(text_example)
                      .batch(config.batch_size, drop_remainder=False))
    result = []
    for batch in global_batches:
        full = _pad_rows(batch, config.batch_size)
        result.append(host_rows(full, process_index=process_index, host_batch=host_batch))
        if len(result) == num_batches:
            break
    return result
