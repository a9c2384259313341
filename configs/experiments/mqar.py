"""MQAR recall of linear vs log-linear mixers at matched parameter count (experiments/mqar).

    python experiments/mqar/run.py --preset gpu --output experiments/mqar/results_gpu.json

Presets: ``gpu`` (one H100 shared with one other experiment, ≤ 12 minutes), ``cpu`` (a reduced run for a
2-core CPU) and ``smoke`` (seconds; exercised by the tests). Every model trains on one mixture of pair counts
at one sequence length and is evaluated on held-out draws of each pair count.
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
    # Controls: mixers known to solve MQAR at this size (2-layer softmax attention with RoPE; Zoology, Fig. 2),
    # trained first at model.control_width. They test the recipe, not the claim.
    config.controls = ("attention",)
    # Task: seq_len tokens per example; example i of a training set takes its pair count from train_pairs in turn
    # (a repeated count is drawn more often); every pair is queried once (num_queries = num_pairs), so
    # 4 * num_pairs tokens must fit in seq_len + 1. Chance is 1 / num_values.
    # GPU (chosen before any result; README "Why these presets"): T = 128 with up to 32 pairs (Zoology's T = 128
    # and T = 256 settings hold 8 to 64 pairs); 1024 keys and 1024 values (Zoology splits 8192 tokens; fewer
    # values keep the output layer small); a training mixture with 4-pair examples twice as often as each harder
    # count (Zoology trains on 100k 4-pair examples next to 20k of each harder setting), so the recall circuit
    # can form on easy examples first.
    config.task = dict(seq_len=128, train_pairs=(4, 4, 8, 16, 32), eval_pairs=(4, 8, 16, 32), num_keys=1024,
                       num_values=1024, train_examples=32768, eval_examples=128, eval_batch_size=128)
    # Model: d_model takes each value of widths; mlp_dim = mlp_ratio * d_model for the log-linear model and
    # is raised for the linear one to match the parameter count. Heads: num_heads (attention-style heads for
    # Gated DeltaNet and the control, head size d_model / num_heads); Mamba-2 heads are
    # expand * d_model / mamba2_head_dim.
    config.model = dict(widths=(64, 128), control_width=64, num_layers=2, num_heads=2, mlp_ratio=2, chunk_size=64,
                        mamba2_state_dim=16, mamba2_head_dim=32, mamba2_expand=2)
    # seed_batching: "vmap" trains the seeds batched in each compiled call, "map" one after the other
    # (jaxlm.train.seeds); the CPU presets use "map" (XLA:CPU crashes on the vmapped chunked-SSD gradient).
    # GPU: the most steps that fit the time budget (<= 12 minutes for the 9 configurations with the A5 experiment
    # on the same GPU; README), warmup 10 % of them; the learning rate is the earlier presets' 2e-3.
    config.train = dict(steps=2000, steps_per_call=100, batch_size=128, learning_rate=2e-3, warmup_steps=200,
                        weight_decay=0.1, seed_batching="vmap")
    if preset == "cpu":
        # The small setting in which the attention control learns on a CPU (README: "CPU check of the recipe").
        config.task.update(seq_len=64, train_pairs=(4, 8), eval_pairs=(4, 8), num_keys=64, num_values=64,
                           train_examples=8192, eval_examples=64, eval_batch_size=128)
        config.model.update(widths=(64,), chunk_size=64, mamba2_state_dim=8, mamba2_head_dim=16)
        config.train.update(steps=2000, steps_per_call=100, batch_size=64, warmup_steps=200, seed_batching="map")
    elif preset == "smoke":
        config.seeds = 2
        config.mixer_pairs = MIXER_PAIRS[:1]
        config.task.update(seq_len=16, train_pairs=(1, 2), eval_pairs=(1, 2, 4), num_keys=8, num_values=8,
                           train_examples=64, eval_examples=4, eval_batch_size=6)
        config.model.update(widths=(16,), control_width=16, num_layers=1, chunk_size=8, mamba2_state_dim=4,
                            mamba2_head_dim=8)
        config.train.update(steps=4, steps_per_call=2, batch_size=4, warmup_steps=1, seed_batching="map")
    elif preset != "gpu":
        raise ValueError(f"unknown preset {preset!r}; choose 'gpu', 'cpu' or 'smoke'")
    return config
