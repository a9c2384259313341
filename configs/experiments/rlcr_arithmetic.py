"""RLCR vs RLVR vs RLVR + classifier on sums with hidden digits (experiments/rlcr).

    python experiments/rlcr/run.py --config configs/experiments/rlcr_arithmetic.py --preset full

Presets: ``full`` (one GPU, ≤ 20 minutes), ``cpu`` (a reduced run for a 2-core CPU, a few minutes) and
``smoke`` (seconds; exercised by the tests).
"""

import ml_collections

# Read by experiments/rlcr/run.py, not by `jaxlm train`: its sections (sft, grpo, classifier, eval) are the
# experiment's own, so the check of shipped run configs skips this file.
RUN_CONFIG = False


def get_config(preset: str = "full") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = dict(vocab_size=32, d_model=128, num_layers=4, num_heads=4, num_kv_heads=4, mlp_dim=512,
                        max_seq_len=48)
    config.sft = dict(steps=2000, batch_size=128, learning_rate=2e-3)
    config.grpo = dict(steps=300, prompts_per_step=16, group_size=32, temperature=0.7, max_new_tokens=24,
                       learning_rate=2e-4)
    config.classifier = dict(steps=1000, batch_size=128, learning_rate=2e-3, num_prompts=4096, samples_per_prompt=4)
    config.eval = dict(num_prompts=512, num_samples=32, vote_draws=8)
    if preset == "cpu":
        config.model.update(d_model=64, num_layers=2, mlp_dim=256)
        config.sft.update(steps=300, batch_size=64, learning_rate=3e-3)
        config.grpo.update(steps=80, prompts_per_step=16, group_size=8, learning_rate=3e-4)
        config.classifier.update(steps=200, batch_size=64, learning_rate=3e-3, num_prompts=512, samples_per_prompt=2)
        config.eval.update(num_prompts=128, num_samples=16, vote_draws=4)
    elif preset == "smoke":
        config.model.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, mlp_dim=64)
        config.sft.update(steps=4, batch_size=8, learning_rate=3e-3)
        config.grpo.update(steps=2, prompts_per_step=2, group_size=4, learning_rate=1e-3)
        config.classifier.update(steps=2, batch_size=8, learning_rate=3e-3, num_prompts=8, samples_per_prompt=1)
        config.eval.update(num_prompts=2, num_samples=4, vote_draws=1)  # 8 rows, like the rollouts: one compile
    elif preset != "full":
        raise ValueError(f"unknown preset {preset!r}; choose 'full', 'cpu' or 'smoke'")
    return config
