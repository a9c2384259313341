"""Quickstart: a 2-layer attention LM learns flip-flop language modelling on a laptop CPU.

    jaxlm train --config configs/quickstart.py

Flip-flop sequences are instructions `w x` (write bit x), `i x` (ignore x) and `r` (read): after each `r`
the model must output the last written bit, possibly many tokens back. Accuracy on the read answers starts
at chance (50%) and should reach ~99% within a few hundred steps. Takes about a minute on 2 CPU cores;
prints loss and answer accuracy, evaluates on held-out sequences, and writes metrics.jsonl and checkpoints
under runs/quickstart. Then try:

    jaxlm generate --checkpoint runs/quickstart --prompt "w 1 i 0 i 1 r"
"""

from jaxlm.config import default_config_dict


def get_config():
    config = default_config_dict()
    config.model.update(vocab_size=8, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128,
                        max_seq_len=128)
    config.data.update(source="flipflop", seq_len=64, batch_size=32, seed=0)
    config.optimizer.update(learning_rate=3e-3, warmup_steps=50, weight_decay=0.01)
    config.train.update(steps=800, log_every=50, eval_every=200, eval_batches=8, output_dir="runs/quickstart")
    config.checkpoint.update(save_every=200, keep=2)
    return config
