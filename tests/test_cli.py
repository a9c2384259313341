"""The `jaxlm` command: train from a config with overrides, clear config errors, generate from a checkpoint."""

import os

from jaxlm.cli import main

QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.py")


def test_train_then_generate(tmp_path, capsys):
    output_dir = tmp_path / "run"
    code = main(["train", "--config", QUICKSTART, "--config.train.steps=12", "--config.optimizer.warmup_steps=2", "--config.train.log_every=4",
                 "--config.train.eval_every=6", f"--config.train.output_dir={output_dir}",
                 "--config.checkpoint.save_every=6"])
    assert code == 0
    assert (output_dir / "metrics.jsonl").exists()
    assert sorted(os.listdir(output_dir / "checkpoints")) == ["12", "6"]
    printed = capsys.readouterr().out
    assert "finished step 12" in printed and "eval_loss" in printed

    code = main(["generate", "--checkpoint", str(output_dir / "checkpoints"), "--prompt", "w 1 i 0 r",
                 "--max-new-tokens", "2"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("w 1 i 0 r ")
    assert set(lines[-1].split()[5:]) <= {"w", "r", "i", "0", "1"}


def test_config_error_exits_with_the_field_named(tmp_path, capsys):
    code = main(["train", "--config", QUICKSTART, "--config.model.mixer=lstm",
                 f"--config.train.output_dir={tmp_path}"])
    assert code == 2
    assert "model.mixer" in capsys.readouterr().err
    code = main(["train", "--config", QUICKSTART, "--config.model.no_such_field=1"])
    assert code == 2
    assert "no_such_field" in capsys.readouterr().err
    code = main(["train", "--config", str(tmp_path / "missing.py")])
    assert code == 2
    assert "missing.py" in capsys.readouterr().err
    assert not os.listdir(tmp_path)  # nothing was written for a bad config


def test_generate_from_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    code = main(["generate", "--checkpoint", str(tmp_path / "nowhere"), "--prompt", "x"])
    assert code == 2
    assert "nowhere" in capsys.readouterr().err
