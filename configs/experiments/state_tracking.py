"""A5 word problems: accuracy vs number of layers for PaTH and RoPE attention (experiments/state_tracking).

    python experiments/state_tracking/run.py --preset gpu --output experiments/state_tracking/results_gpu.json

Presets: ``gpu`` (one H100 shared with one other experiment, ≤ 12 minutes), ``cpu`` (a reduced run for a
2-core CPU) and ``smoke`` (seconds; exercised by the tests).
"""

import ml_collections

# Read by experiments/state_tracking/run.py, not by `jaxlm train`: the check of shipped run configs skips this file.
RUN_CONFIG = False


def get_config(preset: str = "gpu") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seeds = 3
    config.mixers = ("attention", "path")  # "attention" is softmax attention with RoPE
    config.layers = (1, 2, 3, 4)
    # Words of seq_len uniform elements of the group; fresh words every step; a fixed held-out set of full-length
    # words. curriculum: (scored prefix length, fraction of the steps) stages, short words first (a causal model
    # trained on the first n products of a word is trained on words of length n); the last stage is seq_len.
    config.task = dict(group="a5", seq_len=32, eval_examples=1024, eval_batch_size=256,
                       curriculum=((4, 0.2), (8, 0.2), (16, 0.2), (32, 0.4)))
    config.model = dict(d_model=128, num_heads=4, mlp_ratio=4, path_block_size=64)
    # seed_batching: "vmap" trains the seeds batched in each compiled call, "map" one after the other
    # (jaxlm.train.seeds); the CPU presets use "map" (XLA:CPU crashes on the vmapped chunked-SSD gradient).
    # GPU: the most steps that fit <= 12 minutes for the 8 configurations next to the MQAR experiment (README).
    config.train = dict(steps=3000, steps_per_call=100, batch_size=128, learning_rate=1e-3, warmup_steps=300,
                        weight_decay=0.1, seed_batching="vmap")
    if preset == "cpu":
        config.task.update(seq_len=16, eval_examples=512, eval_batch_size=256,
                           curriculum=((4, 0.2), (8, 0.3), (16, 0.5)))
        config.model.update(d_model=64, num_heads=2, mlp_ratio=2, path_block_size=16)
        config.train.update(steps=400, steps_per_call=100, batch_size=32, warmup_steps=40, seed_batching="map")
    elif preset == "smoke":
        config.seeds = 2
        config.layers = (1,)
        config.task.update(seq_len=6, eval_examples=8, eval_batch_size=4, curriculum=((2, 0.5), (6, 0.5)))
        config.model.update(d_model=16, num_heads=2, mlp_ratio=2, path_block_size=8)
        config.train.update(steps=4, steps_per_call=2, batch_size=4, warmup_steps=1, seed_batching="map")
    elif preset != "gpu":
        raise ValueError(f"unknown preset {preset!r}; choose 'gpu', 'cpu' or 'smoke'")
    return config
