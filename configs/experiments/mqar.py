"""MQAR recall of linear vs log-linear mixers at matched parameter count (experiments/mqar).

    python experiments/mqar/run.py --preset gpu --output experiments/mqar/results_gpu.json

Presets: ``gpu`` (one H100, ≤ 5 minutes), ``cpu`` (a reduced run for a 2-core CPU) and ``smoke`` (seconds;
exercised by the tests). Every model trains on one mixture of pair counts at one sequence length and is
evaluated on held-out draws of each pair count.
"""

import ml_collections

# Read by experiments/mqar/run.py, not by `jaxlm train`: the check of shipped run configs skips this file.
RUN_CONFIG = False

# (linear mixer, its log-linear variant): each pair is compared at (near) equal parameter count.
MIXER_PAIRS = (("mamba2", "loglinear_mamba2"), ("gated_deltanet", "loglinear_gated_deltanet"))


def get_config(preset: str = "gpu") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seeds = 3
    config.mixer_pairs = MIXER_PAIRS
    # Task: seq_len tokens per example; training draws a pair count per example from train_pairs (uniformly);
    # every pair is queried once (num_queries = num_pairs), so 4 * num_pairs tokens must fit in seq_len + 1.
    config.task = dict(seq_len=256, train_pairs=(8, 16, 32, 64), eval_pairs=(8, 16, 32, 64), num_keys=512,
                       num_values=512, train_examples=16384, eval_examples=128, eval_batch_size=128)
    # Model: d_model takes each value of widths; mlp_dim = mlp_ratio * d_model for the log-linear model and
    # is raised for the linear one to match the parameter count. Heads: num_heads (attention-style heads for
    # Gated DeltaNet, head size d_model / num_heads); Mamba-2 heads are expand * d_model / mamba2_head_dim.
    config.model = dict(widths=(64, 128), num_layers=2, num_heads=2, mlp_ratio=2, chunk_size=64,
                        mamba2_state_dim=16, mamba2_head_dim=32, mamba2_expand=2)
    # seed_batching: "vmap" trains the seeds batched in each compiled call, "map" one after the other
    # (experiments/mqar/seeds.py); the CPU presets use "map" (XLA:CPU crashes on the vmapped chunked-SSD gradient).
    config.train = dict(steps=1000, steps_per_call=250, batch_size=64, learning_rate=2e-3, warmup_steps=100,
                        weight_decay=0.1, seed_batching="vmap")
    if preset == "cpu":
        config.task.update(seq_len=32, train_pairs=(1, 2, 4, 8), eval_pairs=(1, 2, 4, 8), num_keys=32,
                           num_values=32, train_examples=4096, eval_examples=64, eval_batch_size=128)
        config.model.update(widths=(16, 32), chunk_size=16, mamba2_state_dim=8, mamba2_head_dim=8)
        config.train.update(steps=300, steps_per_call=100, batch_size=32, warmup_steps=30, seed_batching="map")
    elif preset == "smoke":
        config.seeds = 2
        config.mixer_pairs = MIXER_PAIRS[:1]
        config.task.update(seq_len=16, train_pairs=(1, 2), eval_pairs=(1, 2, 4), num_keys=8, num_values=8,
                           train_examples=64, eval_examples=4, eval_batch_size=6)
        config.model.update(widths=(16,), num_layers=1, chunk_size=8, mamba2_state_dim=4, mamba2_head_dim=8)
        config.train.update(steps=4, steps_per_call=2, batch_size=4, warmup_steps=1, seed_batching="map")
    elif preset != "gpu":
        raise ValueError(f"unknown preset {preset!r}; choose 'gpu', 'cpu' or 'smoke'")
    return config
