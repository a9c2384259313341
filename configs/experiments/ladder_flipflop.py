"""A Ladder-residual LM on flip-flop language modelling (the quickstart task and shape, ladder wiring).

    jaxlm train --config configs/experiments/ladder_flipflop.py
    jaxlm train --config configs/experiments/ladder_flipflop.py --config.model.residual_mode=standard

``model.residual_mode`` is one of standard / parallel / ladder / upper_bound (``jaxlm.models.ladder``).
With a mesh whose tensor axis is larger than 1 (``--config.mesh.tensor=2``) the blocks run as
tensor-parallel ``shard_map`` code when the training loop runs its steps under ``jax.set_mesh``.
"""

from jaxlm.config import default_config_dict


def get_config():
    config = default_config_dict()
    config.model.update(vocab_size=8, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128,
                        max_seq_len=128, residual_mode="ladder")
    config.data.update(source="flipflop", seq_len=64, batch_size=32, seed=0)
    config.optimizer.update(learning_rate=3e-3, warmup_steps=50, weight_decay=0.01)
    config.train.update(steps=800, log_every=50, eval_every=200, eval_batches=8, output_dir="runs/ladder_flipflop")
    config.checkpoint.update(save_every=200, keep=2)
    return config
