"""Data: configs, tokenizers, text reading/packing and grain pipelines of batches."""

from jaxlm.data.config import SOURCES, DataConfig, per_host_batch_size, required_vocab_size
from jaxlm.data.pipeline import BATCH_KEYS, make_eval_batches, make_train_iterator
from jaxlm.data.text import read_documents
from jaxlm.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, tokenizer_for

__all__ = [
    "BATCH_KEYS", "SOURCES", "ByteTokenizer", "DataConfig", "HFTokenizer", "Tokenizer", "make_eval_batches",
    "make_train_iterator", "per_host_batch_size", "read_documents", "required_vocab_size", "tokenizer_for",
]
