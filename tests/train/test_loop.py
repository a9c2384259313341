"""The training loop end to end on tiny configs: learning, exact resume, crash recovery."""

import dataclasses
import os

import jax
import numpy as np
import pytest

from jaxlm.config import default_config_dict, run_config_from_dict
from jaxlm.train.loop import train
from jaxlm.train.logging import read_metrics


def tiny_config(output_dir, **train_overrides):
    config = default_config_dict()
    config.model.update(vocab_size=136, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                        max_seq_len=64)
    config.data.update(source="mqar", seq_len=32, batch_size=8, seed=3)
    config.optimizer.update(learning_rate=3e-3, warmup_steps=5)
    config.train.update(steps=20, log_every=1, eval_every=10, eval_batches=2, output_dir=str(output_dir))
    config.train.update(**train_overrides)
    config.checkpoint.update(save_every=5, keep=2, async_save=True)
    return run_config_from_dict(config)


def train_losses(output_dir):
    return {row["step"]: row["train/loss"] for row in read_metrics(os.path.join(output_dir, "metrics.jsonl"))
            if "train/loss" in row}


class SimulatedCrash(RuntimeError):
    pass


def test_loss_decreases(tmp_path):
    config = tiny_config(tmp_path, steps=60, eval_every=0)
    train(config)
    losses = train_losses(tmp_path)
    assert sorted(losses) == list(range(1, 61))
    first, last = np.mean([losses[s] for s in range(1, 11)]), np.mean([losses[s] for s in range(51, 61)])
    # From uniform over the vocabulary (ln 136 = 4.9) to at least the answer-value distribution (ln 64 = 4.2).
    assert first > 4.6 and last < first - 0.5, (first, last)


def test_crash_and_resume_continue_exactly(tmp_path):
    reference_dir, crashed_dir = tmp_path / "reference", tmp_path / "crashed"
    reference = train(tiny_config(reference_dir))

    def crash_at_13(step, metrics):
        if step == 13:
            raise SimulatedCrash("simulated crash")

    with pytest.raises(SimulatedCrash):
        train(tiny_config(crashed_dir), step_callback=crash_at_13)
    checkpoints = sorted(int(name) for name in os.listdir(crashed_dir / "checkpoints") if name.isdigit())
    assert checkpoints[-1] == 10  # the last committed save before the crash survives
    resumed = train(tiny_config(crashed_dir))

    expected, got = train_losses(reference_dir), train_losses(crashed_dir)
    assert sorted(got) == list(range(1, 21))  # the resumed log has no duplicated or missing step
    for step in range(11, 21):
        np.testing.assert_allclose(got[step], expected[step], rtol=1e-6, err_msg=f"step {step}")
    for a, b in zip(jax.tree.leaves(reference.state.params), jax.tree.leaves(resumed.state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert resumed.eval_metrics["loss"] == pytest.approx(reference.eval_metrics["loss"], rel=1e-6)


def test_resume_refuses_a_different_model(tmp_path):
    from jaxlm.errors import CheckpointError

    train(tiny_config(tmp_path, steps=8))
    config = tiny_config(tmp_path, steps=10)
    wider = dataclasses.replace(config, model=dataclasses.replace(config.model, d_model=64))
    with pytest.raises(CheckpointError, match="d_model"):
        train(wider)
