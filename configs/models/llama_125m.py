"""A 125M-parameter Llama-shaped model (12 layers, d 768, 12 heads) trained on text.

    jaxlm train --config configs/models/llama_125m.py --config.data.path=corpus/

The byte-level tokenizer is the default; set --config.data.tokenizer=tokenizer.json (and model.vocab_size to its
size) for a trained tokenizer.
"""

from jaxlm.config import default_config_dict


def get_config():
    config = default_config_dict()
    config.model.update(vocab_size=32000, d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, mlp_dim=2048,
                        max_seq_len=2048, compute_dtype="bfloat16", scan_layers=True, remat="dots")
    config.data.update(source="text", seq_len=1024, batch_size=64)
    config.optimizer.update(learning_rate=6e-4, warmup_steps=1000, weight_decay=0.1)
    config.train.update(steps=20000, log_every=50, eval_every=1000, output_dir="runs/llama_125m")
    config.checkpoint.update(save_every=1000, keep=3)
    return config
