"""Flight recommendation with a Bayesian assistant (Qiu, Sha, Allen, Kim, Linzen, van Steenkiste 2025,
"Bayesian teaching enables probabilistic reasoning in large language models", Sec. 2).

A user has a linear reward over the normalised features ``φ(o) ∈ [0, 1]^F`` of an option:

    r_w(o) = w · φ(o),   w ∈ {−1, −0.5, 0, 0.5, 1}^F \\ {0}      (624 users for F = 4)

Each round shows 3 options; the user deterministically picks ``argmax_o r_w(o)``. The Bayesian
assistant keeps a uniform prior over all users, a 0/1 likelihood ("would user w have chosen what
was observed?") and recommends the argmax of the posterior predictive:

    p(w | rounds < t) ∝ Π_{s<t} 1[choice_w(options_s) = observed_s]
    recommend(options) = argmax_o Σ_w p(w | ·) · 1[choice_w(options) = o]

Deterministic rules (the ones that reproduce the paper's curve 40.6 / 57.7 / 66.9 / 73.2 / 78.0 /
81.5 % within about one point; see ``assistant_accuracy``):

- every feature level is drawn uniformly and independently; option sets with ties are kept;
- rewards are compared exactly (integer arithmetic on a grid of twentieths, see ``grid_values``) and
  a tie between options goes to the **lowest option index**, for the true user and for every
  hypothesis alike (so the likelihood is exactly "hypothesis w would have made this choice");
- a tie in the posterior predictive also goes to the lowest option index.

Tasks: ``FLIGHTS`` (departure time 11 levels, duration 11, stops 3, price 11), ``HOTELS`` (distance 11,
price 11, stars 5, amenities 5) and ``flights_with_features(n)`` for 2–8 features. Everything over
hypotheses is vectorised in ``jnp``; ``bayesian_recommendations`` maps over dialogues in chunks so
that 8 features (390 624 hypotheses) fit in memory.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.errors import is_int, require

NUM_OPTIONS = 3
NUM_ROUNDS = 5
WEIGHT_HALF_STEPS = (-2, -1, 0, 1, 2)  # a user stores 2·w, so w ∈ {−1, −0.5, 0, 0.5, 1}
GRID = 20  # feature values are stored exactly as multiples of 1/GRID
MIN_FEATURES, MAX_FEATURES = 2, 8
HYPOTHESIS_CHUNK = 2**22  # hypothesis·option-set pairs per vectorised chunk of bayesian_recommendations


@dataclasses.dataclass(frozen=True)
class PreferenceTask:
    """Options described by ``len(feature_levels)`` features; feature k takes ``feature_levels[k]`` levels.

    Level ``l`` of a feature with ``L`` levels is the normalised value ``l / (L − 1) ∈ [0, 1]``;
    ``L − 1`` must divide ``GRID`` = 20 so values are exact multiples of 1/20.
    """

    name: str
    feature_names: tuple[str, ...]
    feature_levels: tuple[int, ...]

    def __post_init__(self):
        require(len(self.feature_names) == len(self.feature_levels), f"{self.name}.feature_levels",
                self.feature_levels, f"one level count per feature name {self.feature_names}")
        require(MIN_FEATURES <= len(self.feature_levels) <= MAX_FEATURES, f"{self.name}.feature_levels",
                self.feature_levels, f"{MIN_FEATURES} to {MAX_FEATURES} features")
        for levels in self.feature_levels:
            require(is_int(levels) and levels >= 2 and GRID % (levels - 1) == 0, f"{self.name}.feature_levels",
                    self.feature_levels, f"level counts L >= 2 with (L - 1) dividing {GRID}: 2, 3, 5, 6, 11 or 21")

    @property
    def num_features(self) -> int:
        return len(self.feature_levels)

    @property
    def grid_steps(self) -> np.ndarray:
        """Grid units per level, ``GRID / (L_k − 1)``: int32 [F]."""
        return np.array([GRID // (levels - 1) for levels in self.feature_levels], np.int32)


FLIGHTS = PreferenceTask("flights", ("departure_time", "duration", "stops", "price"), (11, 11, 3, 11))
HOTELS = PreferenceTask("hotels", ("distance", "price", "stars", "amenities"), (11, 11, 5, 5))


def flights_with_features(num_features: int) -> PreferenceTask:
    """The flight task with ``num_features`` features: the flight levels (11, 11, 3, 11) repeated cyclically."""
    require(is_int(num_features) and MIN_FEATURES <= num_features <= MAX_FEATURES, "num_features", num_features,
            f"an integer from {MIN_FEATURES} to {MAX_FEATURES}")
    levels = tuple(FLIGHTS.feature_levels[k % FLIGHTS.num_features] for k in range(num_features))
    return PreferenceTask(f"flights{num_features}", tuple(f"feature{k}" for k in range(num_features)), levels)


@functools.lru_cache(maxsize=None)
def enumerate_users(num_features: int) -> np.ndarray:
    """All users as half-step weights ``2·w``: int32 [5^F − 1, F], in ``itertools.product`` order, zero removed."""
    require(is_int(num_features) and num_features >= 1, "num_features", num_features, "a positive integer")
    users = np.array(list(itertools.product(WEIGHT_HALF_STEPS, repeat=num_features)), np.int32)  # [5^F, F]
    users = users[np.any(users != 0, axis=1)]
    users.setflags(write=False)
    return users


def user_weights(users: np.ndarray) -> np.ndarray:
    """The real weights ``w = half_steps / 2`` of ``enumerate_users`` rows: float32 [..., F]."""
    return np.asarray(users, np.float32) / 2


def sample_option_levels(task: PreferenceTask, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Option sets with every feature level uniform on ``0 … L_k − 1``: int32 [*shape, 3, F]."""
    columns = [rng.integers(0, levels, size=(*shape, NUM_OPTIONS)) for levels in task.feature_levels]
    return np.stack(columns, axis=-1).astype(np.int32)


def grid_values(task: PreferenceTask, levels: np.ndarray) -> np.ndarray:
    """Normalised features in grid units, ``φ_k · GRID = level_k · GRID / (L_k − 1)``: int32 [..., 3, F]."""
    levels = np.asarray(levels, np.int32)
    require(levels.shape[-1] == task.num_features, "levels", levels.shape,
            f"[..., {task.num_features}] for {task.name}")
    require(bool(np.all((levels >= 0) & (levels < np.array(task.feature_levels)))), "levels", "out of range",
            f"feature levels below {task.feature_levels}")
    return levels * task.grid_steps


def option_features(task: PreferenceTask, levels: np.ndarray) -> np.ndarray:
    """Normalised features ``φ(o) = level / (L − 1) ∈ [0, 1]``: float32 [..., 3, F]."""
    return grid_values(task, levels).astype(np.float32) / GRID


def choices_of(users: jax.Array, values: jax.Array) -> jax.Array:
    """Each user's pick ``argmax_o Σ_k 2w_k · GRID φ_k(o)`` (exact integers; ties to the lowest index).

    users: int [H, F] half-step weights; values: int [..., 3, F] grid values. Returns int32 [..., H].
    """
    values, users = jnp.asarray(values, jnp.int32), jnp.asarray(users, jnp.int32)
    rewards = jnp.einsum("...of,hf->...ho", values, users)  # [..., H, 3]
    return jnp.argmax(rewards, axis=-1).astype(jnp.int32)  # jnp.argmax returns the first maximum


def user_choices(task: PreferenceTask, users: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """The choice of user ``users[n]`` on each of its option sets ``levels[n, ...]``: int32 [N, ...].

    users: int [N, F] half-step weights; levels: int [N, ..., 3, F].
    """
    values = jnp.asarray(grid_values(task, levels))  # [N, ..., 3, F]
    users = jnp.asarray(users, jnp.int32)
    per_user = jax.vmap(lambda user, user_values: choices_of(user[None], user_values)[..., 0])
    return np.asarray(per_user(users, values))


def consistency(hypothesis_choices: jax.Array, observed_choices: jax.Array) -> jax.Array:
    """The 0/1 likelihood ``1[choice_w(options_s) = observed_s]``: bool [..., R, H].

    hypothesis_choices: int [..., R, H]; observed_choices: int [..., R].
    """
    return hypothesis_choices == observed_choices[..., None]


def posteriors(consistent: jax.Array) -> jax.Array:
    """Uniform-prior posteriors after 0 … R rounds, ``p_t(w) ∝ Π_{s<t} consistent_s(w)``: float32 [..., R+1, H].

    A posterior with no consistent hypothesis (impossible when the user is one of the hypotheses) is all zero.
    """
    prior = jnp.ones((*consistent.shape[:-2], 1, consistent.shape[-1]), jnp.float32)  # [..., 1, H]
    survivors = jnp.cumprod(consistent.astype(jnp.float32), axis=-2)  # [..., R, H]
    alive = jnp.concatenate([prior, survivors], axis=-2)  # [..., R+1, H]
    return alive / jnp.maximum(alive.sum(axis=-1, keepdims=True), 1.0)


def posterior_predictive(posterior: jax.Array, query_choices: jax.Array) -> jax.Array:
    """``P(o) = Σ_w p(w) · 1[choice_w(query) = o]``: float32 [..., 3]; posterior, query_choices: [..., H]."""
    return jnp.einsum("...h,...ho->...o", posterior, jax.nn.one_hot(query_choices, NUM_OPTIONS, dtype=jnp.float32))


def recommend(predictive: jax.Array) -> jax.Array:
    """The posterior-predictive argmax, ties to the lowest option index: int32 [...]."""
    return jnp.argmax(predictive, axis=-1).astype(jnp.int32)


@jax.jit
def _recommendations_of_dialogue(users, observed_values, observed_choices, query_values):
    """One dialogue: observed_values [R, 3, F], observed_choices [R], query_values [Q, 3, F], Q <= R + 1."""
    consistent = consistency(choices_of(users, observed_values), observed_choices)  # [R, H]
    posterior = posteriors(consistent)[: query_values.shape[0]]  # [Q, H]
    return recommend(posterior_predictive(posterior, choices_of(users, query_values)))  # [Q]


def bayesian_recommendations(task: PreferenceTask, observed_levels: np.ndarray, observed_choices: np.ndarray,
                             query_levels: np.ndarray) -> np.ndarray:
    """The assistant's recommendation on ``query_levels[n, q]`` after seeing rounds ``0 … q−1``: int32 [N, Q].

    observed_levels: int [N, R, 3, F]; observed_choices: int [N, R] (the user's picks);
    query_levels: int [N, Q, 3, F] with Q <= R + 1. Pass ``query_levels = observed_levels`` for the
    recommendation made in each round of a dialogue before the user's choice is revealed.
    """
    observed_levels, query_levels = np.asarray(observed_levels), np.asarray(query_levels)
    num_rounds, num_queries = observed_levels.shape[1], query_levels.shape[1]
    require(num_queries <= num_rounds + 1, "query_levels", query_levels.shape,
            f"at most R + 1 = {num_rounds + 1} query rounds (query q uses the rounds before q)")
    users = jnp.asarray(enumerate_users(task.num_features))  # [H, F]
    inputs = (jnp.asarray(grid_values(task, observed_levels)), jnp.asarray(observed_choices, jnp.int32),
              jnp.asarray(grid_values(task, query_levels)))
    batch_size = max(1, HYPOTHESIS_CHUNK // (len(users) * (num_rounds + num_queries)))
    dialogue = functools.partial(_recommendations_of_dialogue, users)
    batch_size = min(batch_size, len(observed_levels))
    return np.asarray(jax.lax.map(lambda args: dialogue(*args), inputs, batch_size=batch_size))


def assistant_accuracy(rounds: int = NUM_ROUNDS, seed: int = 0, sets_per_user: int = 100,
                       task: PreferenceTask = FLIGHTS) -> np.ndarray:
    """Accuracy of the Bayesian assistant after 0 … ``rounds`` observed rounds: float [rounds + 1] in [0, 1].

    For every user and each of ``sets_per_user`` trials: ``rounds`` observed option sets with the
    user's choices, and ``rounds + 1`` fresh held-out sets; entry r is the fraction of trials where
    the recommendation on held-out set r after observing rounds 0 … r−1 equals the user's choice.
    """
    require(is_int(rounds) and rounds >= 0, "rounds", rounds, "a non-negative integer")
    require(is_int(sets_per_user) and sets_per_user > 0, "sets_per_user", sets_per_user, "a positive integer")
    rng = np.random.default_rng(seed)
    users = np.repeat(enumerate_users(task.num_features), sets_per_user, axis=0)  # [N, F]
    observed = sample_option_levels(task, rng, (len(users), rounds))  # [N, R, 3, F]
    held_out = sample_option_levels(task, rng, (len(users), rounds + 1))  # [N, R+1, 3, F]
    recommendations = bayesian_recommendations(task, observed, user_choices(task, users, observed), held_out)
    return (recommendations == user_choices(task, users, held_out)).mean(axis=0)
