"""Flip-flop language modelling: RoPE attention vs PaTH vs FoX vs PaTH-FoX (experiments/flipflop).

    python experiments/flipflop/run.py --preset gpu   # one H100, <= 5 minutes with compiles
    python experiments/flipflop/run.py --preset cpu   # a reduced run for a 2-core CPU
    python experiments/flipflop/run.py --preset smoke # seconds; exercised by the tests

Every variant is trained on FFL(0.8) (``jaxlm.tasks.flipflop`` preset "train") and evaluated on held-out
sequences of the same length from FFL(0.8), FFL(0.98) ("sparse") and FFL(0.1) ("dense").
"""

import ml_collections

# Read by experiments/flipflop/run.py, not by `jaxlm train`: the sections are the experiment's own, so the
# check of shipped run configs skips this file.
RUN_CONFIG = False

# Variant name -> ModelConfig fields (a nested dict sets fields of an options section).
VARIANTS = {
    "rope": {"mixer": "attention"},
    "path": {"mixer": "path"},
    "fox": {"mixer": "fox"},
    "path_fox": {"mixer": "path", "path": {"forget_gate": True}},
}


def get_config(preset: str = "gpu") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.seeds = 1
    config.variants = list(VARIANTS)
    config.variant_fields = VARIANTS
    config.model = dict(vocab_size=8, d_model=128, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=256,
                        max_seq_len=512, compute_dtype="float32")
    # loss_on: only the "answers" (the bits after each read, the only predictable tokens) or "all" tokens
    # (the plain language-modelling loss, whose other terms are irreducible coin flips).
    config.train = dict(seq_len=512, batch_size=32, steps=2000, learning_rate=1e-3, warmup_steps=100,
                        weight_decay=0.1, loss_on="answers", density="train")
    # Held-out sequences per evaluation density, scored in batches of eval.batch_size (one compiled shape).
    config.eval = dict(batch_size=128, sequences={"train": 512, "sparse": 4096, "dense": 256})
    if preset == "cpu":
        config.model.update(d_model=64, mlp_dim=128, max_seq_len=128)
        config.train.update(seq_len=128, batch_size=16, steps=300, learning_rate=3e-3, warmup_steps=30)
        config.eval.update(batch_size=64, sequences={"train": 128, "sparse": 512, "dense": 64})
    elif preset == "smoke":
        config.variants = ["rope", "fox"]
        config.model.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, mlp_dim=64, max_seq_len=32)
        config.train.update(seq_len=32, batch_size=8, steps=3, learning_rate=3e-3, warmup_steps=1)
        config.eval.update(batch_size=16, sequences={"train": 16, "sparse": 32, "dense": 16})
    elif preset != "gpu":
        raise ValueError(f"unknown preset {preset!r}; choose 'gpu', 'cpu' or 'smoke'")
    return config
