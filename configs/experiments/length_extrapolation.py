"""Length extrapolation at toy scale: train at length N, evaluate the loss at N, 2N, 4N and 8N
(experiments/length_extrapolation).

    python experiments/length_extrapolation/run.py --preset gpu   # one H100, <= 5 minutes with compiles
    python experiments/length_extrapolation/run.py --preset cpu   # a reduced run for a 2-core CPU
    python experiments/length_extrapolation/run.py --preset smoke # seconds; exercised by the tests

Data: a second-order Markov language over ``data.vocab`` tokens (each two-token context allows
``data.branching`` next tokens) in which, at any position, with probability ``data.copy_probability`` a
span of ``data.span`` tokens copied from a uniformly random earlier place begins; generated causally, so
the first L tokens of a long sequence are distributed as a sequence of length L.
"""

import ml_collections

# Read by experiments/length_extrapolation/run.py, not by `jaxlm train` (the sections are the experiment's
# own), so the check of shipped run configs skips this file.
RUN_CONFIG = False

# Variant name -> ModelConfig fields (a nested dict sets fields of an options section).
VARIANTS = {
    "rope": {"mixer": "attention"},
    "path": {"mixer": "path"},
    "fox": {"mixer": "fox"},
    "path_fox": {"mixer": "path", "path": {"forget_gate": True}},
    "mamba2": {"mixer": "mamba2"},
    "loglinear_mamba2": {"mixer": "loglinear_mamba2"},
    "gated_deltanet": {"mixer": "gated_deltanet"},
    "loglinear_gated_deltanet": {"mixer": "loglinear_gated_deltanet"},
}


def get_config(preset: str = "gpu") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.seeds = 1
    config.variants = list(VARIANTS)
    config.variant_fields = VARIANTS
    config.data = dict(vocab=64, branching=4, copy_probability=1 / 48, span=16, table_seed=1234)
    config.train = dict(seq_len=256, batch_size=32, steps=800, learning_rate=2e-3, warmup_steps=80, weight_decay=0.1)
    # Evaluation lengths are train.seq_len times each factor; all of them are read off one pass over
    # eval.sequences sequences of the longest length (causal models: position t sees only tokens <= t).
    config.eval = dict(factors=[1, 2, 4, 8], sequences=64, batch_size=16)
    # max_seq_len is the longest evaluation length (it sets the log-linear level count).
    config.model = dict(vocab_size=64, d_model=128, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=256,
                        max_seq_len=2048, compute_dtype="float32",
                        mamba2=dict(head_dim=64, state_dim=64), path=dict(low_rank=16))
    if preset == "cpu":
        config.train.update(seq_len=64, batch_size=16, steps=200, learning_rate=3e-3, warmup_steps=20)
        config.eval.update(sequences=32, batch_size=16)
        config.model.update(d_model=64, mlp_dim=128, max_seq_len=512, mamba2=dict(head_dim=32, state_dim=32))
    elif preset == "smoke":
        config.variants = ["rope", "fox"]
        config.data.update(span=4, copy_probability=1 / 8)
        config.train.update(seq_len=16, batch_size=4, steps=2, learning_rate=3e-3, warmup_steps=1)
        config.eval.update(sequences=4, batch_size=4)
        config.model.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, mlp_dim=64, max_seq_len=128,
                            mamba2=dict(head_dim=32, state_dim=16))
    elif preset != "gpu":
        raise ValueError(f"unknown preset {preset!r}; choose 'gpu', 'cpu' or 'smoke'")
    return config
