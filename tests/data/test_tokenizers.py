"""Tokenizers: byte ids and UTF-8, tokenizer.json files, task symbols."""

import pytest

from jaxlm.data import ByteTokenizer, DataConfig, HFTokenizer, required_vocab_size, tokenizer_for
from jaxlm.errors import ConfigError
from jaxlm.tasks import SymbolTokenizer


def test_byte_ids_are_utf8_bytes_plus_three():
    text = "héllo, wörld ✓ 🚀\n\tend"
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert ids == [b + 3 for b in text.encode("utf-8")]
    assert tokenizer.decode(ids) == text
    assert (tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (259, 0, 1, 2)


def test_byte_decode_skips_specials_and_replaces_bad_utf8():
    tokenizer = ByteTokenizer()
    ids = [1] + tokenizer.encode("ab") + [2, 0, 0xC3 + 3] + tokenizer.encode("z")  # 0xC3 starts a 2-byte char
    assert tokenizer.decode(ids) == "ab\ufffdz"
    with pytest.raises(ValueError, match="259"):
        tokenizer.decode([259])


def _write_tokenizer_json(path, specials):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", *specials])
    tokenizer.train_from_iterator(["the cat sat on the mat", "a dog ran far away"], trainer=trainer)
    tokenizer.save(str(path))
    return Tokenizer.from_file(str(path))


def test_hf_tokenizer_wraps_a_tokenizer_json(tmp_path):
    path = tmp_path / "tokenizer.json"
    reference = _write_tokenizer_json(path, ["<pad>", "<s>", "</s>"])
    tokenizer = HFTokenizer(str(path))
    text = "the dog sat far away"
    assert tokenizer.encode(text) == reference.encode(text).ids
    assert len(set(tokenizer.encode(text))) == 5
    assert tokenizer.decode(tokenizer.encode(text) + [tokenizer.eos_id]) == text
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == tuple(map(reference.token_to_id, ["<pad>", "<s>", "</s>"]))
    assert tokenizer.vocab_size == reference.get_vocab_size() == 3 + 1 + 10
    config = DataConfig(source="text", path=str(tmp_path), tokenizer=str(path))
    assert isinstance(tokenizer_for(config), HFTokenizer) and required_vocab_size(config) == 14


def test_hf_tokenizer_without_end_token_is_an_error(tmp_path):
    path = tmp_path / "tokenizer.json"
    _write_tokenizer_json(path, ["<pad>"])
    with pytest.raises(ConfigError, match="end-of-text"):
        HFTokenizer(str(path))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="data.tokenizer"):
        HFTokenizer(str(tmp_path / "broken.json"))


def test_symbol_tokenizer():
    tokenizer = SymbolTokenizer(["w", "r", "0", "1"])
    assert tokenizer.encode(" w 1  r\n1 ") == [3, 6, 4, 6]
    assert tokenizer.decode([1, 3, 6, 0, 2]) == "w 1"
    with pytest.raises(ValueError, match="'x'"):
        tokenizer.encode("w x")
    with pytest.raises(ValueError, match="distinct"):
        SymbolTokenizer(["a", "a"])
