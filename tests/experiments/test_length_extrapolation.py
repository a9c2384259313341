"""The length-extrapolation experiment: its Markov-copy data is what it claims (copies equal their sources,
Markov tokens follow the table, prefixes do not depend on the total length), the per-length metrics equal a
brute-force count, prefix losses read off a long pass equal losses of short passes, and the smoke preset
runs end to end."""

import importlib.util
import json
import math
import pathlib
import sys

import numpy as np
from flax import nnx

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "length_extrapolation" / "run.py"


def load_script():
    spec = importlib.util.spec_from_file_location("length_extrapolation_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_markov_copy_language_sequences():
    run = load_script()
    language = run.MarkovCopyLanguage(vocab=16, branching=3, copy_probability=0.1, span=5, table_seed=7)
    next_tokens, _ = language.table
    tokens, sources = language.sample(np.random.default_rng(0), 6, 97)
    assert tokens.shape == sources.shape == (6, 97) and tokens.dtype == np.int32
    copied = sources >= 0
    assert 0.1 < copied.mean() < 0.6  # copies do happen, and Markov tokens remain
    for row, t in zip(*np.nonzero(copied)):
        source = sources[row, t]
        assert source < t and tokens[row, t] == tokens[row, source]
    for row, t in zip(*np.nonzero(~copied)):
        if t >= 2:
            assert tokens[row, t] in next_tokens[tokens[row, t - 2], tokens[row, t - 1]]
    # Generation is causal: the first L tokens are the same whatever the total length.
    longer, longer_sources = language.sample(np.random.default_rng(0), 6, 200)
    np.testing.assert_array_equal(longer[:, :97], tokens)
    np.testing.assert_array_equal(longer_sources[:, :97], sources)


def test_length_metrics_equal_brute_force():
    run = load_script()
    rng = np.random.default_rng(1)
    losses, copied = rng.uniform(0, 5, size=(3, 32)), rng.random((3, 32)) < 0.3
    copied[:, 5] = copied[:, 20] = True  # copies in the new half of both lengths
    metrics = run.length_metrics(losses, copied, [8, 32])
    for length in (8, 32):
        values = metrics[str(length)]
        assert math.isclose(values["loss"], sum(losses[n, t] for n in range(3) for t in range(length)) / (3 * length))
        new = [(n, t) for n in range(3) for t in range(length // 2, length)]
        assert math.isclose(values["loss_new_half"], sum(losses[i] for i in new) / len(new))
        copies = [losses[i] for i in new if copied[i]]
        assert math.isclose(values["copy_loss"], sum(copies) / len(copies))
    curve = run.loss_by_position(losses, bins=4)
    assert math.isclose(curve[1], losses[:, 8:16].mean())


def test_prefix_losses_of_a_long_pass_equal_short_passes():
    """What lets one evaluation pass at 8N give every length: a causal model's loss at position t is the
    same in a pass over the first L tokens and in a pass over the whole sequence."""
    run = load_script()
    config = run.model_config_with(dict(vocab_size=16, d_model=16, num_layers=1, num_heads=2, num_kv_heads=2,
                                   mlp_dim=32, max_seq_len=64), {"mixer": "fox", "path": {"block_size": 8}})
    model = run.DecoderLM(config, rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(2).integers(0, 16, size=(2, 41)).astype(np.int32)
    full = run.token_losses(model, tokens, batch_size=2)  # [2, 40]
    short = run.token_losses(model, tokens[:, :14], batch_size=2)  # [2, 13]
    np.testing.assert_allclose(full[:, :13], short, rtol=1e-5, atol=1e-5)
    assert full.std() > 1e-3  # the losses vary: the check is not on a constant


def test_smoke_run_writes_results(tmp_path):
    run = load_script()
    results = run.main(["--preset", "smoke", "--output", str(tmp_path)])
    for name in ("results.json", "results.md", "loss_by_position.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["lengths"] == [16, 32, 64, 128] == [16 * f for f in results["config"]["eval"]["factors"]]
    assert [entry["variant"] for entry in saved["runs"]] == ["rope", "fox"]
    table = (tmp_path / "results.md").read_text()
    for entry in saved["runs"]:
        assert list(entry["lengths"]) == ["16", "32", "64", "128"] and len(entry["loss_by_position"]) == run.PLOT_BINS
        for values in entry["lengths"].values():
            # Two training steps from a small init: close to the uniform loss ln 64 over the vocabulary.
            assert abs(values["loss"] - math.log(64)) < 0.3 and abs(values["loss_new_half"] - math.log(64)) < 0.3
        # The mean over all 128 positions is the mean of the equal-sized position bins.
        assert math.isclose(entry["lengths"]["128"]["loss"], np.mean(entry["loss_by_position"]), rel_tol=1e-9)
        assert f"| {entry['variant']} |" in table
