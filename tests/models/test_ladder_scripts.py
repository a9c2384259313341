"""Smoke runs of the ladder decode benchmark (tensor-parallel on fake CPU devices) and the conversion experiment."""

import importlib.util
import math
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def load_script(relative_path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / relative_path)
    module = sys.modules.setdefault(name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module


def test_decode_benchmark_smoke_reports_every_point():
    bench = load_script("benchmarks/ladder_decode.py", "ladder_decode")
    rows = bench.main(["--preset", "toy", "--prompt", "8", "--new", "3", "--batches", "2", "--tp", "2",
                       "--modes", "ladder", "--repeats", "1"])
    assert [(row["tensor"], row["batch"], row["mode"]) for row in rows] == [(2, 2, "ladder")]
    assert rows[0]["decode_tokens_per_s"] > 0 and rows[0]["prefill_s"] > 0
    assert rows[0]["end_to_end_tokens_per_s"] < rows[0]["decode_tokens_per_s"] * 3 / 2  # includes the prefill


def test_conversion_experiment_smoke():
    experiment = load_script("experiments/ladder/run.py", "ladder_experiment")
    summary = experiment.main(["convert", "--smoke", "--steps", "2", "--finetune-steps", "2", "--ladder-layers", "1"])
    for key in ("original", "zero_shot_ladder", "finetuned_ladder"):
        assert math.isfinite(summary[key]) and abs(summary[key] - math.log(experiment.VOCAB)) < 0.5
    assert summary["zero_shot_ladder"] != summary["original"]  # the conversion changed the function


def test_compiler_options_parse_types_and_reject_missing_values():
    from jaxlm.models import ladder

    options = ladder.parse_compiler_options(["xla_gpu_allow_all_reduce_kernel=false", "threshold=0", "mode=ALLREDUCE",
                                             "flag=True", "offset=-3"])
    assert options == {"xla_gpu_allow_all_reduce_kernel": False, "threshold": 0, "mode": "ALLREDUCE", "flag": True,
                       "offset": -3}
    for bad in ("no_equals_sign", "=value"):
        with pytest.raises(ValueError, match="expected KEY=VALUE"):
            ladder.parse_compiler_options([bad])
