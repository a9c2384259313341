"""Helpers shared by the scripts in ``experiments/``: config files by path and model variants.

An experiment keeps its presets in ``configs/experiments/<name>.py`` as ``get_config(preset)`` (an
ml_collections ConfigDict); its variants are a base model dict plus a few changed fields.
"""

from __future__ import annotations

import argparse
import json
import importlib.util
import pathlib
import sys
import time
from types import ModuleType
from typing import Any, Callable, Mapping

from jaxlm.models.config import ModelConfig


def load_file_module(path: str | pathlib.Path, name: str) -> ModuleType:
    """Import the Python file at ``path`` as module ``name``, once (registered in ``sys.modules``, so its
    dataclasses resolve their annotations)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise FileNotFoundError(f"cannot import {path}: not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def preset_config(path: str | pathlib.Path, preset: str) -> Any:
    """``get_config(preset)`` of the experiment config file at ``path``."""
    path = pathlib.Path(path)
    return load_file_module(path, f"experiment_config_{path.stem}").get_config(preset)


def model_config_with(base: Mapping[str, Any], fields: Mapping[str, Any]) -> ModelConfig:
    """``ModelConfig`` from ``base`` with a variant's ``fields`` on top; a dict value sets fields of that
    options section (``{"path": {"forget_gate": True}}``), merged over the base's own. Validated."""
    merged = dict(base)
    for name, value in fields.items():
        merged[name] = {**base.get(name, {}), **value} if isinstance(value, dict) else value
    defaults = ModelConfig()
    values = {name: type(getattr(defaults, name))(**value) if isinstance(value, dict) else value
              for name, value in merged.items()}
    return ModelConfig(**values).validate()


PRESETS = ("gpu", "cpu", "smoke")


def experiment_parser(description: str, default_config: str | pathlib.Path, output_help: str) -> argparse.ArgumentParser:
    """The flags every experiment script shares: ``--preset``, ``--config``, ``--output``, ``--steps`` and
    ``--seeds`` (0: the preset's); scripts add their own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", default="gpu", choices=PRESETS)
    parser.add_argument("--config", default=str(default_config), help="config file with get_config(preset)")
    parser.add_argument("--output", default="", help=output_help)
    parser.add_argument("--steps", type=int, default=0, help="training steps (0: the preset's)")
    parser.add_argument("--seeds", type=int, default=0, help="seeds per configuration (0: the preset's)")
    return parser


def config_from_args(args: argparse.Namespace) -> Any:
    """The preset's config with ``--steps`` (``train.steps``) and ``--seeds`` (``seeds``) applied."""
    config = preset_config(args.config, args.preset)
    if args.steps:
        config.train.steps = args.steps
    if args.seeds:
        config.seeds = args.seeds
    return config


def with_progress(chunks, label: str, steps: int, chunk_steps: int):
    """Yield ``chunks`` unchanged, printing the steps done and the elapsed minutes before each new chunk.

    ``train_seeds`` asks for chunk ``k + 1`` only after the results of chunk ``k`` are back on the host, so
    each line marks finished work (the first call's time includes compilation).
    """
    start = time.perf_counter()
    for call, chunk in enumerate(chunks):
        if call:
            print(f"  {label}: step {call * chunk_steps}/{steps}, {(time.perf_counter() - start) / 60:.2f} min",
                  flush=True)
        yield chunk


def write_results(results: dict, output: str | None, plot: Callable[[pathlib.Path], None]) -> None:
    """Write ``results`` as JSON to ``output`` (parents created) and ``plot(path)`` the figure next to it as
    ``.png``; nothing when ``output`` is empty or None."""
    if not output:
        return
    path = pathlib.Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    plot(path.with_suffix(".png"))
