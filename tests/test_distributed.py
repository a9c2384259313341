"""A 2-process `jax.distributed` CPU run: both processes train together and match a single-process run."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from jaxlm.train.logging import read_metrics

QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.py")
ARGS = ["--config.train.steps=6", "--config.optimizer.warmup_steps=2", "--config.train.log_every=1", "--config.train.eval_every=0",
        "--config.data.batch_size=8", "--config.checkpoint.save_every=3"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)
    return env


def run_jaxlm(args, env):
    return subprocess.Popen([sys.executable, "-m", "jaxlm.cli", "train", "--config", QUICKSTART, *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses(output_dir):
    return [row["train/loss"] for row in read_metrics(os.path.join(output_dir, "metrics.jsonl")) if "train/loss" in row]


@pytest.mark.slow
def test_two_process_run_matches_single_process(tmp_path):
    single_dir, multi_dir = tmp_path / "single", tmp_path / "multi"
    single = run_jaxlm([*ARGS, f"--config.train.output_dir={single_dir}"], child_env())
    port = free_port()
    workers = [run_jaxlm([*ARGS, f"--config.train.output_dir={multi_dir}"],
                         child_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                   JAX_PROCESS_ID=str(rank)))
               for rank in range(2)]
    outputs = [process.communicate(timeout=600)[0] for process in [single, *workers]]
    for process, output in zip([single, *workers], outputs):
        assert process.returncode == 0, output[-3000:]
    assert "process_count=2" in outputs[1]
    np.testing.assert_allclose(losses(multi_dir), losses(single_dir), rtol=2e-5)
    assert sorted(os.listdir(multi_dir / "checkpoints")) == ["3", "6"]
