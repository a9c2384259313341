"""Teaching dialogues for the flight task and the LM's recommendations in them (Qiu et al. 2025, Sec. 3).

A dialogue is ``<bos>`` and R rounds in a compact symbolic format; round t reads

    |  A v.. v..  B v.. v..  C v.. v..  >  X  =  Y

with one value token ``v{20·φ_k}`` per feature of each option (shared by all tasks, so a model trained
on flights can be run on hotels or on other feature counts), ``X`` the assistant's recommendation
(the only learned token) and ``Y`` the user's true choice. **Bayesian teaching** puts the Bayesian
assistant's recommendation in X (wrong ones included), **oracle teaching** the user's choice; all
else is equal. The model recommends by the argmax of its logits over ``A B C`` at X's position.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.errors import is_int, require
from jaxlm.tasks.flights import (GRID, NUM_OPTIONS, NUM_ROUNDS, PreferenceTask, bayesian_recommendations,
                                 enumerate_users, grid_values, sample_option_levels, user_choices)
from jaxlm.tasks.symbols import SymbolTokenizer
from jaxlm.train.sft import Example, sft_batch

ROUND, RECOMMEND, CHOSEN = "|", ">", "="
OPTION_NAMES = ("A", "B", "C")
DIALOGUE_TOKENIZER = SymbolTokenizer([ROUND, RECOMMEND, CHOSEN, *OPTION_NAMES] + [f"v{i}" for i in range(GRID + 1)])
TEACHINGS = ("bayesian", "oracle")
EVAL_BATCH = 256  # dialogues per forward pass when scoring a model


@dataclasses.dataclass(frozen=True)
class Dialogues:
    """N dialogues of R rounds: ``users [N, F]`` half-step weights, ``levels [N, R, 3, F]``, the user's
    ``choices [N, R]`` and the Bayesian assistant's in-dialogue ``recommendations [N, R]`` (int32)."""

    task: PreferenceTask
    users: np.ndarray
    levels: np.ndarray
    choices: np.ndarray
    recommendations: np.ndarray


def sample_dialogues(task: PreferenceTask, num_dialogues: int, seed: int, rounds: int = NUM_ROUNDS) -> Dialogues:
    """``num_dialogues`` dialogues with users uniform over all hypotheses and uniform option levels."""
    require(is_int(num_dialogues) and num_dialogues > 0, "num_dialogues", num_dialogues, "a positive integer")
    require(is_int(rounds) and rounds > 0, "rounds", rounds, "a positive integer")
    rng = np.random.default_rng(seed)
    all_users = enumerate_users(task.num_features)
    users = all_users[rng.integers(0, len(all_users), size=num_dialogues)]  # [N, F]
    levels = sample_option_levels(task, rng, (num_dialogues, rounds))  # [N, R, 3, F]
    choices = user_choices(task, users, levels)  # [N, R]
    recommendations = bayesian_recommendations(task, levels, choices, levels)  # [N, R]
    return Dialogues(task, users, levels, choices, recommendations)


def round_length(num_features: int) -> int:
    """Tokens per round: ``|``, 3 options of (marker + F values), ``>``, X, ``=``, Y."""
    return 1 + NUM_OPTIONS * (1 + num_features) + 4


def recommendation_positions(num_rounds: int, num_features: int) -> np.ndarray:
    """Index of each round's assistant token X in a rendered dialogue (after ``<bos>``): int [R]."""
    return 1 + np.arange(num_rounds) * round_length(num_features) + round_length(num_features) - 3


def render_dialogues(task: PreferenceTask, levels: np.ndarray, assistant: np.ndarray,
                     choices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and learn flags of dialogues: int32 [N, 1 + R·round_length], bool [same].

    levels: int [N, R, 3, F]; assistant, choices: int [N, R] option indices for X and Y. Only the
    X tokens are learned.
    """
    levels, assistant, choices = np.asarray(levels), np.asarray(assistant), np.asarray(choices)
    num_dialogues, num_rounds = levels.shape[:2]
    require(assistant.shape == choices.shape == (num_dialogues, num_rounds), "assistant/choices",
            f"{assistant.shape}/{choices.shape}", f"option indices of shape {(num_dialogues, num_rounds)}")
    token = DIALOGUE_TOKENIZER.id_of
    value_ids = token("v0") + grid_values(task, levels)  # [N, R, 3, F]
    option_ids = np.broadcast_to(DIALOGUE_TOKENIZER.ids_of(OPTION_NAMES)[:, None],
                                 (num_dialogues, num_rounds, NUM_OPTIONS, 1))  # [N, R, 3, 1]
    options = np.concatenate([option_ids, value_ids], axis=-1).reshape(num_dialogues, num_rounds, -1)  # [N, R, 3(1+F)]
    option_token = token(OPTION_NAMES[0])

    def column(symbol_or_ids):  # [N, R, 1]
        if isinstance(symbol_or_ids, str):
            return np.full((num_dialogues, num_rounds, 1), token(symbol_or_ids))
        return symbol_or_ids[..., None]

    rounds = np.concatenate([column(ROUND), options, column(RECOMMEND), column(option_token + assistant),
                             column(CHOSEN), column(option_token + choices)], axis=-1)  # [N, R, round_length]
    tokens = np.concatenate([np.full((num_dialogues, 1), DIALOGUE_TOKENIZER.bos_id),
                             rounds.reshape(num_dialogues, -1)], axis=1).astype(np.int32)  # [N, L]
    learn = np.zeros(tokens.shape, bool)
    learn[:, recommendation_positions(num_rounds, task.num_features)] = True
    return tokens, learn


def teaching_examples(dialogues: Dialogues, teaching: str) -> list[Example]:
    """SFT ``(tokens, learn)`` pairs; X is the assistant's recommendation ("bayesian") or the user's choice
    ("oracle")."""
    require(teaching in TEACHINGS, "teaching", teaching, f"one of {TEACHINGS}")
    assistant = dialogues.recommendations if teaching == "bayesian" else dialogues.choices
    tokens, learn = render_dialogues(dialogues.task, dialogues.levels, assistant, dialogues.choices)
    return list(zip(tokens, learn))


def teaching_batches(examples: list[Example], batch_size: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
    """Endless ``sft_batch`` batches of ``batch_size`` examples, reshuffled every epoch (with wrap-around)."""
    require(is_int(batch_size) and batch_size > 0, "batch_size", batch_size, "a positive integer")
    seq_len = max(len(tokens) for tokens, _ in examples) - 1
    rng = np.random.default_rng(seed)
    order = np.empty(0, np.int64)
    while True:
        while len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(len(examples))])
        chosen, order = order[:batch_size], order[batch_size:]
        yield sft_batch([examples[i] for i in chosen], seq_len, DIALOGUE_TOKENIZER.pad_id)


@nnx.jit
def _option_logits(model: nnx.Module, tokens: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
    """Logits of ``A B C`` predicting the token at ``positions``: [N, P, 3] (read at positions − 1)."""
    logits = model(tokens)  # [N, L, V]
    before = jnp.take_along_axis(logits, (positions - 1)[..., None], axis=1)  # [N, P, V]
    option_ids = jnp.asarray(DIALOGUE_TOKENIZER.ids_of(OPTION_NAMES))
    return before[..., option_ids]


def model_choices(model: nnx.Module, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The model's option (argmax over ``A B C``) for the token at each of ``positions [P]``: int32 [N, P].

    Rows are scored up to ``EVAL_BATCH`` at a time, right-padded (which a causal model never reads) to
    a power-of-two length and a full batch, so dialogues of different lengths share one compiled shape.
    """
    tokens = np.asarray(tokens, np.int32)
    num_rows = len(tokens)
    batch_size = min(EVAL_BATCH, len(tokens))
    length = max(64, 1 << (tokens.shape[1] - 1).bit_length())
    tokens = np.pad(tokens, ((0, -len(tokens) % batch_size), (0, length - tokens.shape[1])),
                    constant_values=DIALOGUE_TOKENIZER.pad_id)  # [N', length]
    index = jnp.asarray(np.broadcast_to(np.asarray(positions, np.int32), (batch_size, len(positions))))
    picks = []
    for start in range(0, len(tokens), batch_size):
        padded = jnp.asarray(tokens[start:start + batch_size])
        picks.append(np.asarray(jnp.argmax(_option_logits(model, padded, index), -1)))
    return np.concatenate(picks)[:num_rows].astype(np.int32)


def interactive_recommendations(model: nnx.Module, dialogues: Dialogues) -> np.ndarray:
    """The model's recommendation in every round, seeing its own earlier recommendations and the user's
    true choices (the paper's round-by-round evaluation): int32 [N, R]. One forward pass per round."""
    num_rounds = dialogues.levels.shape[1]
    positions = recommendation_positions(num_rounds, dialogues.task.num_features)
    recommendations = np.zeros_like(dialogues.choices)
    for t in range(num_rounds):
        tokens, _ = render_dialogues(dialogues.task, dialogues.levels, recommendations, dialogues.choices)
        recommendations[:, t] = model_choices(model, tokens, positions[t:t + 1])[:, 0]
    return recommendations


def heldout_recommendations(model: nnx.Module, dialogues: Dialogues, model_recommendations: np.ndarray,
                            heldout_levels: np.ndarray) -> np.ndarray:
    """The model's pick on ``heldout_levels[:, r]`` after rounds ``0 … r−1`` of the dialogue: int32 [N, Q].

    The transcript of the first r rounds (with ``model_recommendations`` and the true choices) is
    followed by one round showing the held-out options; the model answers at its X.
    """
    num_dialogues, num_queries = heldout_levels.shape[:2]
    require(num_queries <= dialogues.levels.shape[1] + 1, "heldout_levels", heldout_levels.shape,
            f"at most R + 1 = {dialogues.levels.shape[1] + 1} query rounds")
    picks = np.zeros((num_dialogues, num_queries), np.int32)
    placeholder = np.zeros((num_dialogues, 1), np.int32)
    for r in range(num_queries):
        levels = np.concatenate([dialogues.levels[:, :r], heldout_levels[:, r:r + 1]], axis=1)  # [N, r+1, 3, F]
        assistant = np.concatenate([model_recommendations[:, :r], placeholder], axis=1)
        choices = np.concatenate([dialogues.choices[:, :r], placeholder], axis=1)
        tokens, _ = render_dialogues(dialogues.task, levels, assistant, choices)
        position = recommendation_positions(r + 1, dialogues.task.num_features)[r:]
        picks[:, r] = model_choices(model, tokens, position)[:, 0]
    return picks
