"""Tests for jaxlm.train.logging: JSONL records, resume truncation, console output, main-process gating."""

import importlib.util
import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.train import logging as run_logging
from jaxlm.train.logging import MetricsLogger, format_console_line, read_metrics


def test_log_writes_one_valid_json_line_per_call_with_converted_values(tmp_path):
    rng = np.random.default_rng(7)
    losses = rng.uniform(0.5, 4.0, size=3)
    with MetricsLogger(tmp_path, total_steps=11, use_progress_bar=False) as logger:
        for step, loss in zip([1, 5, 9], losses):
            logger.log(step, {"loss": jnp.float32(loss), "tokens": np.int64(step * 37),
                              "grad_norm": jnp.asarray(loss / 3, jnp.bfloat16)})
        logger.log(9, {"accuracy": 0.625, "per_head": jnp.asarray([0.25, 1.5])}, prefix="eval")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses on its own
    assert [r["step"] for r in records] == [1, 5, 9, 9]
    assert all(records[i]["time"] <= records[i + 1]["time"] for i in range(3))
    for record, loss in zip(records[:3], losses):
        assert set(record) == {"step", "time", "train/loss", "train/tokens", "train/grad_norm"}
        assert record["train/loss"] == pytest.approx(loss, rel=1e-6)
        assert record["train/tokens"] == record["step"] * 37 and isinstance(record["train/tokens"], int)
        assert record["train/grad_norm"] == pytest.approx(loss / 3, rel=1e-2)
    assert records[3]["eval/accuracy"] == 0.625 and records[3]["eval/per_head"] == [0.25, 1.5]
    assert read_metrics(tmp_path) == records == read_metrics(tmp_path / "metrics.jsonl")


def test_non_finite_values_are_written_as_null(tmp_path):
    with MetricsLogger(tmp_path, total_steps=3, use_progress_bar=False) as logger:
        logger.log(2, {"loss": jnp.float32(np.nan), "scale": np.float32(np.inf), "ok": 1.25})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["train/loss"] is None and json.loads(text)["train/ok"] == 1.25


def test_truncate_after_drops_later_steps_so_a_resumed_log_has_no_duplicates(tmp_path):
    rng = np.random.default_rng(3)
    first_run = {step: float(rng.uniform(1, 3)) for step in range(3, 31, 3)}
    with MetricsLogger(tmp_path, total_steps=30, use_progress_bar=False) as logger:
        for step, loss in first_run.items():
            logger.log(step, {"loss": loss})
    # the run crashed after step 30 but its last checkpoint is step 13: resume from there
    with MetricsLogger(tmp_path, total_steps=30, use_progress_bar=False) as logger:
        assert logger.truncate_after(13) == 6  # steps 15, 18, ..., 30
        for step in range(15, 31, 3):
            logger.log(step, {"loss": -float(step)})
    records = read_metrics(tmp_path)
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)) == list(range(3, 31, 3))
    assert [r["train/loss"] for r in records[:4]] == [first_run[s] for s in (3, 6, 9, 12)]
    assert [r["train/loss"] for r in records[4:]] == [-float(s) for s in range(15, 31, 3)]


def test_partial_last_line_from_a_crash_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 4, "time": 1.0, "train/loss": 2.5}\n{"step": 8, "time": 2.0, "tra')
    assert read_metrics(path) == [{"step": 4, "time": 1.0, "train/loss": 2.5}]
    with MetricsLogger(tmp_path, total_steps=10, use_progress_bar=False) as logger:
        logger.log(8, {"loss": 1.75})
    assert [(r["step"], r["train/loss"]) for r in read_metrics(path)] == [(4, 2.5), (8, 1.75)]


def test_only_the_main_process_writes_or_prints(tmp_path, capsys):
    with MetricsLogger(tmp_path / "worker", total_steps=5, is_main_process=False) as logger:
        record = logger.log(3, {"loss": 0.75})
        assert logger.truncate_after(1) == 0
    assert record["train/loss"] == 0.75 and record["step"] == 3
    assert not (tmp_path / "worker").exists()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_console_line_and_progress_bar(tmp_path, capsys):
    with MetricsLogger(tmp_path / "plain", total_steps=40, use_progress_bar=False) as logger:
        logger.log(12, {"loss": 2.31, "lr": 3e-4, "tokens": 4096})
    assert capsys.readouterr().out.strip() == "step 12/40 | train/loss 2.3100 | train/lr 3.00e-04 | train/tokens 4096"
    with MetricsLogger(tmp_path / "bar", total_steps=40, use_progress_bar=True) as logger:
        logger.log(20, {"loss": 1.5})
        assert logger._bar.n == 20
        logger.truncate_after(10)
        assert logger._bar.n == 10
    err = capsys.readouterr().err
    assert "step 20/40 | train/loss 1.5000" in err and "loss=1.5000" in err


def test_format_console_line_formats_each_kind_of_value():
    line = format_console_line(7, 9, {"a": 123456.0, "b": -0.5, "c": True, "d": None, "e": 0.0})
    assert line == "step 7/9 | a 1.23e+05 | b -0.5000 | c True | d None | e 0.0000"


@pytest.mark.skipif(importlib.util.find_spec("tensorboardX") is not None
                    or importlib.util.find_spec("tensorflow") is not None,
                    reason="a TensorBoard backend is installed")
def test_tensorboard_without_a_backend_is_skipped_with_a_one_time_notice(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run_logging, "_tensorboard_notice_shown", False)
    for name in ("a", "b"):
        with MetricsLogger(tmp_path / name, total_steps=4, use_progress_bar=False, tensorboard=True) as logger:
            logger.log(1, {"loss": 0.5})
    err = capsys.readouterr().err
    assert err.count("tensorboard logging skipped") == 1
    assert read_metrics(tmp_path / "b")[0]["train/loss"] == 0.5
