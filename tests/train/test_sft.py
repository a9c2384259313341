"""SFT: batch construction from (tokens, learn) examples, and fit learning a masked mapping."""

import numpy as np
import pytest
from flax import nnx

from jaxlm.errors import ConfigError
from jaxlm.models.config import ModelConfig
from jaxlm.models.decoder import DecoderLM
from jaxlm.train.config import OptimizerConfig
from jaxlm.train.sft import fit, sft_batch


def test_sft_batch_shifts_tokens_and_masks_only_learned_targets():
    examples = [([5, 6, 7, 8], [False, False, True, True]), ([9, 3], [False, True])]
    batch = sft_batch(examples, seq_len=4, pad_id=0)
    np.testing.assert_array_equal(batch["tokens"], [[5, 6, 7, 0], [9, 0, 0, 0]])
    np.testing.assert_array_equal(batch["targets"], [[6, 7, 8, 0], [3, 0, 0, 0]])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 1, 1, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize("examples, match", [
    ([([1, 2, 3, 4, 5, 6], [True] * 6)], "never truncated"),
    ([([1], [True])], "2 to seq_len"),
    ([([1, 2, 3], [True, True])], "equal length"),
    ([], "at least one"),
])
def test_sft_batch_rejects_bad_examples(examples, match):
    with pytest.raises(ConfigError, match=match):
        sft_batch(examples, seq_len=4)


def test_fit_learns_the_masked_answer_and_ignores_unmasked_noise():
    """Sequences ``a, noise, f(a)`` with f a fixed permutation: the answer is learnable, the noise is not.

    Scoring only the answer drives its accuracy to 1; the unscored noise token must not matter.
    """
    rng = np.random.default_rng(0)
    permutation = rng.permutation(np.arange(10, 20))

    def batches():
        while True:
            keys = rng.integers(10, 20, size=16)
            noise = rng.integers(20, 30, size=16)
            yield sft_batch([([k, n, permutation[k - 10]], [False, False, True]) for k, n in zip(keys, noise)],
                            seq_len=2)

    config = ModelConfig(vocab_size=32, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
                         mlp_dim=64, max_seq_len=8)
    model = DecoderLM(config, rngs=nnx.Rngs(0))
    result = fit(model, batches(), steps=120, optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=10),
                 progress=False, log_every=20)
    assert [record["step"] for record in result.history] == [20, 40, 60, 80, 100, 120]
    assert result.history[-1]["accuracy"] == 1.0
    assert result.history[-1]["scored_tokens"] == 16.0
    # The model itself was updated in place: it now answers every key.
    keys = np.arange(10, 20)
    tokens = np.stack([keys, np.full(10, 25)], axis=1)  # [10, 2]
    predictions = np.asarray(model(tokens)[:, -1].argmax(-1))
    np.testing.assert_array_equal(predictions, permutation)
