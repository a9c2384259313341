"""The `jaxlm` command.

    jaxlm train --config configs/quickstart.py [--config.section.field=value ...] [--no-resume]
    jaxlm generate --checkpoint DIR --prompt "..." [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]

Config files define ``get_config()`` returning an ml_collections ConfigDict; ``--config.a.b=v`` overrides any
field (parsed by ml_collections' config_flags). The config is validated before anything is built: a bad field
stops the command with a message naming the field, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import sys

from jaxlm.errors import CheckpointError, ConfigError


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="jaxlm", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="train a model from a config file")
    train_parser.add_argument("--config", required=True, help="path to a configs/*.py file")
    train_parser.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    generate_parser = commands.add_parser("generate", help="sample from a trained checkpoint")
    generate_parser.add_argument("--checkpoint", required=True, help="a checkpoint directory written by train")
    generate_parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    generate_parser.add_argument("--max-new-tokens", type=int, default=32)
    generate_parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    generate_parser.add_argument("--top-k", type=int, default=0)
    generate_parser.add_argument("--top-p", type=float, default=1.0)
    generate_parser.add_argument("--seed", type=int, default=0)
    generate_parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "train":
            return _train(args, rest)
        if rest:
            parser.error(f"unrecognised arguments: {' '.join(rest)}")
        return _generate(args)
    except (ConfigError, CheckpointError) as error:
        print(f"jaxlm {args.command}: error: {error}", file=sys.stderr)
        return 2


def parse_config_flags(config_path: str, overrides: list[str]):
    """Load ``config_path`` with ml_collections' config_flags, applying ``--config.x=v`` overrides."""
    from absl import flags
    from ml_collections import config_flags

    for argument in overrides:
        if not argument.startswith("--config."):
            raise ConfigError(argument.split("=")[0], argument, "overrides of the form --config.section.field=value")
    argv = ["jaxlm", f"--config={config_path}", *overrides]
    flag_values = flags.FlagValues()
    # config_flags registers the --config.* override flags from sys.argv when the flag is defined, so the
    # arguments are put there for the duration of the parse (this also works when called from Python).
    saved_argv, sys.argv = sys.argv, argv
    try:
        config_flags.DEFINE_config_file("config", None, "run config file", flag_values=flag_values)
        flag_values(argv)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as error:
        raise ConfigError("--config", " ".join(overrides) or config_path,
                          f"a loadable config with valid overrides ({error})") from None
    finally:
        sys.argv = saved_argv
    return flag_values.config


def _train(args, overrides: list[str]) -> int:
    import os

    from jaxlm.config import run_config_from_dict

    if not os.path.isfile(args.config):
        raise ConfigError("--config", args.config, "a path to an existing configs/*.py file")
    config = run_config_from_dict(parse_config_flags(args.config, overrides))
    from jaxlm.train.loop import train

    result = train(config, resume=not args.no_resume)
    summary = ", ".join(f"{k}={v:.4g}" for k, v in {**result.train_metrics, **{f"eval_{k}": v for k, v in result.eval_metrics.items()}}.items())
    print(f"finished step {result.last_step}: {summary}")
    print(f"metrics: {os.path.join(result.output_dir, 'metrics.jsonl')}")
    return 0


def _generate(args) -> int:
    from jaxlm.generate import SamplingConfig, generate_text_from_checkpoint

    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    texts = generate_text_from_checkpoint(args.checkpoint, args.prompt, max_new_tokens=args.max_new_tokens,
                                          sampling=sampling, seed=args.seed, step=args.step)
    for text in texts:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
