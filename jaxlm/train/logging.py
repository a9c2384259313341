"""Run logging: one JSON line per logged step, a progress bar, console lines, optional TensorBoard.

``<output_dir>/metrics.jsonl`` holds records ``{"step": 120, "time": 1716.2, "train/loss": 2.31, ...}``,
one per ``MetricsLogger.log`` call, flushed at once so a crashed run keeps everything it logged. Only the
main process (``jax.process_index() == 0`` by default) writes, draws or prints anything.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"
_POSTFIX_METRICS = 4
_tensorboard_notice_shown = False


def to_json_value(value: Any) -> Any:
    """A jax/numpy scalar or array as a plain JSON value (numbers, lists); non-finite floats become None."""
    if isinstance(value, (str, bool, type(None))):
        return value
    array = np.asarray(jax.device_get(value))
    if array.dtype == np.bool_:
        return array.tolist()
    if array.ndim == 0:
        number = array.item()
        return None if isinstance(number, float) and not math.isfinite(number) else number
    return [to_json_value(element) for element in array]


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics JSONL file (a directory means its ``metrics.jsonl``), in file order.

    A last line without its newline (the run died while writing it) is ignored.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    with open(path, encoding="utf-8") as file:
        text = file.read()
    return [json.loads(line) for line in _complete_lines(text) if line.strip()]


def _complete_lines(text: str) -> list[str]:
    """Lines of ``text`` that end with a newline (a trailing partial line is dropped)."""
    return text.split("\n")[:-1]


class MetricsLogger:
    """Append metrics to ``<output_dir>/metrics.jsonl``; show progress and console lines on the main process.

    Args:
        output_dir: run directory (created if missing).
        total_steps: length of the progress bar.
        use_progress_bar: draw a tqdm bar whose postfix shows the first few metrics.
        tensorboard: also write scalars with ``tensorboardX`` or ``tf.summary`` when one is importable
            (a one-time notice is printed otherwise).
        is_main_process: defaults to ``jax.process_index() == 0``; other processes log nothing.
    """

    def __init__(self, output_dir: str | os.PathLike, *, total_steps: int, use_progress_bar: bool = True,
                 tensorboard: bool = False, is_main_process: bool | None = None):
        self.output_dir = os.fspath(output_dir)
        self.path = os.path.join(self.output_dir, METRICS_FILE)
        self.total_steps = total_steps
        self.is_main_process = jax.process_index() == 0 if is_main_process is None else is_main_process
        self._file = None
        self._bar = None
        self._tensorboard = None
        if not self.is_main_process:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        _drop_partial_last_line(self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        if use_progress_bar:
            self._bar = tqdm(total=total_steps, dynamic_ncols=True, file=sys.stderr)
        if tensorboard:
            self._tensorboard = _open_tensorboard(os.path.join(self.output_dir, "tensorboard"))

    def log(self, step: int, metrics: dict, prefix: str = "train") -> dict:
        """Record ``metrics`` at ``step`` as ``{"step", "time", "<prefix>/<name>": value}``; return the record."""
        record = {"step": int(step), "time": time.time()}
        record.update({f"{prefix}/{name}": to_json_value(value) for name, value in metrics.items()})
        if not self.is_main_process:
            return record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._show(record)
        if self._tensorboard is not None:
            self._tensorboard.write(record)
        return record

    def advance(self, step: int) -> None:
        """Move the progress bar to ``step`` without logging anything (steps between log lines)."""
        if self._bar is not None:
            self._bar.update(max(0, min(step, self.total_steps) - self._bar.n))

    def truncate_after(self, step: int) -> int:
        """Drop records with ``"step" > step`` (a resumed run re-logs them); return how many were dropped."""
        if not self.is_main_process:
            return 0
        self._file.close()
        with open(self.path, encoding="utf-8") as file:
            lines = [line for line in _complete_lines(file.read()) if line.strip()]
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        temporary = self.path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as file:
            file.writelines(line + "\n" for line in kept)
        os.replace(temporary, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        if self._bar is not None:
            self._bar.n = min(step, self.total_steps)
            self._bar.refresh()
        return len(lines) - len(kept)

    def close(self) -> None:
        """Close the file, the progress bar and the TensorBoard writer."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _show(self, record: dict) -> None:
        """Advance the bar to the record's step, set its postfix, and print one compact console line."""
        metrics = {key: value for key, value in record.items() if key not in ("step", "time")}
        line = format_console_line(record["step"], self.total_steps, metrics)
        if self._bar is None:
            print(line, flush=True)
            return
        self._bar.update(max(0, min(record["step"], self.total_steps) - self._bar.n))
        postfix = dict(list(metrics.items())[:_POSTFIX_METRICS])
        self._bar.set_postfix({key: _format_number(value) for key, value in postfix.items()}, refresh=False)
        tqdm.write(line, file=sys.stderr)


def format_console_line(step: int, total_steps: int, metrics: dict) -> str:
    """``step 120/1000 | train/loss 2.3100 | train/lr 3.00e-04``."""
    parts = [f"step {step}/{total_steps}"]
    parts += [f"{name} {_format_number(value)}" for name, value in metrics.items()]
    return " | ".join(parts)


def _format_number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.2e}"
    return f"{value:.4f}"


def _drop_partial_last_line(path: str) -> None:
    """Cut a trailing line left without its newline by a crash, so new records start on a fresh line."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as file:
        data = file.read()
        if data and not data.endswith(b"\n"):
            file.truncate(data.rfind(b"\n") + 1)


class _TensorBoardWriter:
    """Numeric scalars of a record written through tensorboardX or tf.summary."""

    def __init__(self, backend: str, writer: Any):
        self.backend, self.writer = backend, writer

    def write(self, record: dict) -> None:
        step = record["step"]
        for name, value in record.items():
            if name in ("step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if self.backend == "tensorboardX":
                self.writer.add_scalar(name, value, step)
            else:
                import tensorflow as tf  # noqa: PLC0415 (optional dependency)

                with self.writer.as_default():
                    tf.summary.scalar(name, value, step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _open_tensorboard(log_dir: str) -> _TensorBoardWriter | None:
    """A writer from tensorboardX, else tf.summary; None (with a one-time notice) if neither imports."""
    try:
        from tensorboardX import SummaryWriter  # noqa: PLC0415 (optional dependency)

        return _TensorBoardWriter("tensorboardX", SummaryWriter(log_dir))
    except ImportError:
        pass
    try:
        import tensorflow as tf  # noqa: PLC0415 (optional dependency)

        return _TensorBoardWriter("tf.summary", tf.summary.create_file_writer(log_dir))
    except ImportError:
        pass
    global _tensorboard_notice_shown
    if not _tensorboard_notice_shown:
        _tensorboard_notice_shown = True
        print("note: tensorboard logging skipped (neither tensorboardX nor tensorflow is installed); "
              "metrics are still written to metrics.jsonl", file=sys.stderr)
    return None
