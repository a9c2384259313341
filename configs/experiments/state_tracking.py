"""A5 word problems: accuracy vs number of layers for PaTH and RoPE attention (experiments/state_tracking).

    python experiments/state_tracking/run.py --preset gpu --output experiments/state_tracking/results_gpu.json

Presets: ``gpu`` (one H100, ≤ 5 minutes), ``cpu`` (a reduced run for a 2-core CPU) and ``smoke`` (seconds;
exercised by the tests).
"""

import ml_collections

# Read by experiments/state_tracking/run.py, not by `jaxlm train`: the check of shipped run configs skips this file.
RUN_CONFIG = False


def get_config(preset: str = "gpu") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seeds = 3
    config.mixers = ("attention", "path")  # "attention" is softmax attention with RoPE
    config.layers = (1, 2, 3, 4)
    # Words of seq_len uniform elements of the group; fresh words every step; a fixed held-out set.
    config.task = dict(group="a5", seq_len=32, eval_examples=1024, eval_batch_size=256)
    config.model = dict(d_model=128, num_heads=4, mlp_ratio=4, path_block_size=64)
    # seed_batching: "vmap" trains the seeds batched in each compiled call, "map" one after the other
    # (experiments/mqar/seeds.py); the CPU presets use "map" (XLA:CPU crashes on the vmapped chunked-SSD gradient).
    config.train = dict(steps=1500, steps_per_call=250, batch_size=128, learning_rate=1e-3, warmup_steps=150,
                        weight_decay=0.1, seed_batching="vmap")
    if preset == "cpu":
        config.task.update(seq_len=16, eval_examples=512, eval_batch_size=256)
        config.model.update(d_model=64, num_heads=2, mlp_ratio=2, path_block_size=16)
        config.train.update(steps=400, steps_per_call=100, batch_size=32, warmup_steps=40, seed_batching="map")
    elif preset == "smoke":
        config.seeds = 2
        config.layers = (1,)
        config.task.update(seq_len=6, eval_examples=8, eval_batch_size=4)
        config.model.update(d_model=16, num_heads=2, mlp_ratio=2, path_block_size=8)
        config.train.update(steps=4, steps_per_call=2, batch_size=4, warmup_steps=1, seed_batching="map")
    elif preset != "gpu":
        raise ValueError(f"unknown preset {preset!r}; choose 'gpu', 'cpu' or 'smoke'")
    return config
