"""A 1.2B-parameter Llama-shaped transformer for the single-GPU throughput benchmark.

    python benchmarks/train_throughput.py --config configs/bench/transformer_1b.py

d_model 2048, 16 layers, 16 query / 8 KV heads of 128, SwiGLU 8192, vocab 32000, sequence 2048, bf16 compute
with float32 parameters and optimizer state, cuDNN flash attention, layers scanned.
"""

from jaxlm.config import default_config_dict


def get_config():
    config = default_config_dict()
    config.model.update(vocab_size=32000, d_model=2048, num_layers=16, num_heads=16, num_kv_heads=8, mlp_dim=8192,
                        max_seq_len=2048, compute_dtype="bfloat16", attention_impl="cudnn", scan_layers=True,
                        remat="dots", rope_theta=500000.0)
    config.data.update(source="copy", seq_len=2048, batch_size=16)
    config.optimizer.update(learning_rate=3e-4, warmup_steps=10)
    config.train.update(steps=40, log_every=10, eval_every=0, output_dir="runs/bench_1b")
    config.checkpoint.update(save_every=0)
    return config
