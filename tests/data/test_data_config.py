"""Every DataConfig / pipeline error path names the bad field."""

import dataclasses
import json

import pytest

from jaxlm.data import DataConfig, make_eval_batches, make_train_iterator, required_vocab_size
from jaxlm.errors import ConfigError


def _error_field(config_or_call):
    with pytest.raises(ConfigError) as info:
        config_or_call()
    return info.value.field


@pytest.mark.parametrize("overrides, field", [
    ({"source": "wikipedia"}, "data.source"),
    ({"seq_len": 0}, "data.seq_len"),
    ({"batch_size": -4}, "data.batch_size"),
    ({"seed": -1}, "data.seed"),
    ({"seq_len": 30}, "data.seq_len"),  # 8 pairs + 8 queries need 32 tokens = seq_len + 1
    ({"mqar_num_pairs": 70}, "data.mqar_num_pairs"),
    ({"mqar_num_queries": 9}, "data.mqar_num_queries"),
    ({"mqar_num_values": 0}, "data.mqar_num_values"),
    ({"source": "copy", "copy_length": 70}, "data.seq_len"),
    ({"source": "copy", "copy_num_symbols": 0}, "data.copy_num_symbols"),
    ({"source": "flipflop", "flipflop_p_read": 0.3}, "data.flipflop_p_ignore"),
    ({"source": "flipflop", "flipflop_p_write": -0.1, "flipflop_p_ignore": 1.0}, "data.flipflop_p_write"),
    ({"source": "flipflop", "seq_len": 2}, "data.seq_len"),
    ({"source": "text"}, "data.path"),
    ({"source": "text", "path": "no/such/folder"}, "data.path"),
])
def test_bad_fields_are_named(overrides, field):
    assert _error_field(dataclasses.replace(DataConfig(), **overrides).validate) == field


def test_mqar_fit_message_names_the_task_fields():
    with pytest.raises(ConfigError, match="mqar_num_pairs.*mqar_num_queries.*31"):
        DataConfig(seq_len=30).validate()


def test_text_specific_errors(tmp_path):
    (tmp_path / "a.txt").write_text("one document")
    text = DataConfig(source="text", path=str(tmp_path), text_eval_fraction=0.5, batch_size=2, seq_len=8)
    assert _error_field(dataclasses.replace(text, tokenizer="missing/tokenizer.json").validate) == "data.tokenizer"
    assert _error_field(dataclasses.replace(text, text_eval_fraction=0.0).validate) == "data.text_eval_fraction"
    assert _error_field(dataclasses.replace(text, eval_path="missing").validate) == "data.eval_path"
    # one document cannot be split into train and held-out parts
    assert _error_field(lambda: make_train_iterator(text, process_index=0, process_count=1)) == "data.path"


def test_file_type_and_content_errors(tmp_path):
    (tmp_path / "notes.md").write_text("not data")
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    base = DataConfig(source="text", batch_size=2, seq_len=8)
    for path, field in [("notes.md", "data.path"), ("empty.txt", "data.path"), ("bad.jsonl", "data.text_field")]:
        config = dataclasses.replace(base, path=str(tmp_path / path))
        assert _error_field(lambda: make_train_iterator(config, process_index=0, process_count=1)) == field
    (tmp_path / "only_md").mkdir()
    (tmp_path / "only_md" / "README.md").write_text("no data here")
    config = dataclasses.replace(base, path=str(tmp_path / "only_md"))
    assert _error_field(lambda: make_train_iterator(config, process_index=0, process_count=1)) == "data.path"


def test_process_errors():
    config = DataConfig(batch_size=6)
    assert _error_field(lambda: make_train_iterator(config, process_index=0, process_count=4)) == "data.batch_size"
    assert _error_field(lambda: make_train_iterator(config, process_index=2, process_count=2)) == "process_index"
    assert _error_field(lambda: make_eval_batches(config, 0, process_index=0, process_count=1)) == "num_batches"


def test_required_vocab_size_covers_every_task():
    assert required_vocab_size(DataConfig(mqar_num_keys=10, mqar_num_values=7)) == 3 + 10 + 7
    assert required_vocab_size(DataConfig(source="copy", copy_num_symbols=5)) == 3 + 5 + 1
    assert required_vocab_size(DataConfig(source="flipflop")) == 3 + 5
    assert required_vocab_size(DataConfig(source="text", path=".")) == 259
