"""Test-time training for ARC (Akyürek et al. 2024): a fresh LoRA per task on leave-one-out augmented
copies of its demos, then augmented greedy inference and voting for two attempts.

Per task with demos ``d_1 … d_K``:

1. Leave-one-out tasks ``T_i = (d_{≠i} as demos, d_i as the query)``, each through invertible augmentations
   (a grid transform, a colour permutation fixing 0, a demo order; ``jaxlm.tasks.arc_augment``), at most
   ``max_items``; loss only on the outputs of demos 2…K and of the query (``jaxlm.tasks.arc.training_example``).
2. A fresh adapter (``jaxlm.train.lora``) trained for ``steps`` AdamW updates on batches of those items. The
   step is compiled once per padded length ``seq_len`` and reused by every task.
3. Prompts = inference transforms × demo orders; greedy decoding; each decoded grid mapped back by the
   inverse transform; ``jaxlm.tasks.arc_voting`` picks 2 attempts (pass@2).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxlm.errors import is_int, require
from jaxlm.generate import generate
from jaxlm.tasks.arc import END, MAX_GRID_SIDE, PAD, ArcTask, Grid, decode_grid, prompt_tokens, training_example
from jaxlm.tasks.arc_augment import (ALL_TRANSFORMS, INFERENCE_TRANSFORMS, augment_task, grid_transform,
                                     random_colour_permutation, transform_pairs)
from jaxlm.tasks.arc_voting import is_solved, vote
from jaxlm.train.config import OptimizerConfig
from jaxlm.train.lora import AdapterTrainer, LoraConfig, init_adapter
from jaxlm.train.sft import Example, sft_batch

TTT_MODES = ("ft", "ttt", "shared")


@dataclasses.dataclass(frozen=True)
class TTTConfig:
    """Fields:
        lora: adapter rank, α and target projections.
        optimizer: AdamW for the adapter (the paper: lr 1e-4, weight decay 0.01, for 1B models); its
            warmup_steps is replaced by ``warmup_fraction`` of the updates (the paper: 10%).
        steps: adapter updates per task; batch_size: items per update.
        seq_len: padded training length (an item longer than seq_len + 1 tokens is dropped).
        max_items: at most this many augmented leave-one-out items per task (the paper: 250).
        augment: False trains on the plain leave-one-out tasks only (the "no augmentation" ablation).
        train_transforms: grid transforms for the training items; each is used ``copies_per_transform``
            times per leave-one-out task, every copy with its own random colour map and demo order.
        inference_transforms: one voting group each; demo_orders prompts per transform (1: as given,
            2: also reversed).
        max_new_tokens: generation budget (the longest answer: H (W + 1) + 1 tokens).
    """

    lora: LoraConfig = LoraConfig()
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-3, weight_decay=0.01, b2=0.999)
    warmup_fraction: float = 0.1
    steps: int = 40
    batch_size: int = 2
    seq_len: int = 255
    max_items: int = 250
    augment: bool = True
    train_transforms: tuple[str, ...] = ALL_TRANSFORMS
    copies_per_transform: int = 1
    inference_transforms: tuple[str, ...] = INFERENCE_TRANSFORMS
    demo_orders: int = 2
    max_new_tokens: int = 64
    seed: int = 0

    def validate(self) -> "TTTConfig":
        for name in ("steps", "batch_size", "seq_len", "max_items", "max_new_tokens", "copies_per_transform"):
            value = getattr(self, name)
            require(is_int(value) and value > 0, f"ttt.{name}", value, "a positive integer")
        require(self.demo_orders in (1, 2), "ttt.demo_orders", self.demo_orders, "1 or 2")
        for name in self.train_transforms + self.inference_transforms:
            grid_transform(name)
        require(0.0 <= self.warmup_fraction < 1.0, "ttt.warmup_fraction", self.warmup_fraction, "a number in [0, 1)")
        self.lora.validate()
        return self

    def adapter_trainer(self, model: nnx.Module, steps: int) -> AdapterTrainer:
        """An ``AdapterTrainer`` of ``model`` for ``steps`` updates, warming up over ``warmup_fraction`` of them."""
        optimizer = dataclasses.replace(self.optimizer, warmup_steps=int(self.warmup_fraction * steps), decay_steps=0)
        return AdapterTrainer(model, self.lora, optimizer, steps)


def leave_one_out(task: ArcTask) -> list[ArcTask]:
    """``T_i``: demo ``i`` becomes the single test, the other demos (in order) the context; i = 1 … K."""
    require(len(task.demos) >= 2, f"task {task.name!r}", f"{len(task.demos)} demos", "at least 2 demos")
    return [ArcTask(name=f"{task.name}/loo{i}", demos=task.demos[:i] + task.demos[i + 1:], tests=(task.demos[i],))
            for i in range(len(task.demos))]


def ttt_examples(task: ArcTask, config: TTTConfig, rng: np.random.Generator) -> list[Example]:
    """The TTT items of ``task``: leave-one-out tasks × train transforms × copies (each with a random colour
    map and demo order when ``config.augment``; else the plain leave-one-out tasks), deduplicated, those
    fitting ``seq_len + 1`` tokens, at most ``max_items`` (a random subset)."""
    transforms = config.train_transforms * config.copies_per_transform if config.augment else ("identity",)
    items, seen = [], set()
    for loo_task in leave_one_out(task):
        for name in transforms:
            colours = random_colour_permutation(rng) if config.augment else None
            order = rng.permutation(len(loo_task.demos)).tolist() if config.augment else None
            augmented = augment_task(loo_task, grid_transform(name), colours, order)
            if augmented is None:
                continue
            tokens, learn = training_example(augmented.demos, augmented.tests[0])
            if len(tokens) <= config.seq_len + 1 and tokens.tobytes() not in seen:
                seen.add(tokens.tobytes())
                items.append((tokens, learn))
    if len(items) > config.max_items:
        items = [items[i] for i in sorted(rng.choice(len(items), config.max_items, replace=False))]
    return items


def example_batches(examples: Sequence[Example], batch_size: int, seq_len: int,
                    rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
    """Endless ``sft_batch``es of ``batch_size`` items: shuffled epochs over ``examples``, cycled."""
    require(len(examples) > 0, "examples", "[]", "at least one TTT item (does the task fit ttt.seq_len?)")
    while True:
        order = np.concatenate([rng.permutation(len(examples)) for _ in range(-(-batch_size // len(examples)) + 1)])
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield sft_batch([examples[i] for i in order[start:start + batch_size]], seq_len, PAD)


@dataclasses.dataclass(frozen=True)
class InferencePrompt:
    """One augmented prompt: its voting ``group`` (the transform name) and the tokens."""

    group: str
    tokens: np.ndarray


def inference_prompts(task: ArcTask, test_input: Grid, config: TTTConfig, max_seq_len: int) -> list[InferencePrompt]:
    """Prompts for ``test_input``: each inference transform × ``demo_orders`` (given, reversed), those
    leaving ``max_new_tokens`` room within ``max_seq_len``."""
    prompts = []
    for name in config.inference_transforms:
        transform = grid_transform(name)
        demos = transform_pairs(task.demos, transform)
        query = transform.forward(test_input)
        if demos is None or max(query.shape) > MAX_GRID_SIDE:
            continue
        orders = [demos, demos[::-1]][: config.demo_orders]
        for ordered in orders:
            tokens = prompt_tokens(ordered, query)
            if len(tokens) + config.max_new_tokens <= max_seq_len:
                prompts.append(InferencePrompt(name, tokens))
    return prompts


def predict_groups(model: nnx.Module, prompts: Sequence[InferencePrompt],
                   config: TTTConfig) -> dict[str, list[Grid]]:
    """Greedy continuations of all prompts (one batch), decoded to grids and mapped back by the inverse of
    their group's transform; undecodable outputs are dropped."""
    groups: dict[str, list[Grid]] = {prompt.group: [] for prompt in prompts}
    if not prompts:
        return groups
    outputs = generate(model, [p.tokens.tolist() for p in prompts], max_new_tokens=config.max_new_tokens,
                       stop_tokens=(END,), pad_id=PAD)
    for prompt, output in zip(prompts, outputs):
        grid = decode_grid(output) if output and output[-1] == END else None
        if grid is not None:
            groups[prompt.group].append(grid_transform(prompt.group).inverse(grid))
    return groups


@dataclasses.dataclass
class TaskOutcome:
    """Per task: the fraction of its tests solved at pass@2 under each voting rule, and its TTT item count."""

    name: str
    scores: dict[str, float]
    num_items: int

    @property
    def score(self) -> float:
        return self.scores["hierarchical"]


def solve_task(model: nnx.Module, task: ArcTask, config: TTTConfig) -> dict[str, float]:
    """Per voting rule (``"hierarchical"``, ``"flat"``), the fraction of ``task``'s tests whose two voted
    attempts include the target (pass@2); both rules vote on the same predictions."""
    solved = {"hierarchical": 0, "flat": 0}
    for test_input, test_output in task.tests:
        prompts = inference_prompts(task, test_input, config, model.config.max_seq_len)
        groups = predict_groups(model, prompts, config)
        for method in solved:
            solved[method] += is_solved(vote(groups, method), test_output)
    return {method: count / len(task.tests) for method, count in solved.items()}


def evaluate(model: nnx.Module, tasks: Sequence[ArcTask], config: TTTConfig, mode: str = "ttt",
             progress: bool = False) -> list[TaskOutcome]:
    """Score ``tasks`` with the base model (``"ft"``), a fresh adapter per task (``"ttt"``), or one adapter
    trained on all tasks' TTT items (``"shared"``, ``steps × len(tasks)`` updates: the same compute);
    ``progress`` shows a bar over the tasks."""
    config.validate()
    require(mode in TTT_MODES, "mode", mode, f"one of {TTT_MODES}")
    rng = np.random.default_rng(config.seed)
    require(config.seq_len < model.config.max_seq_len, "ttt.seq_len", config.seq_len,
            f"less than model.max_seq_len={model.config.max_seq_len}")
    items = [ttt_examples(task, config, rng) if mode != "ft" else [] for task in tasks]
    if mode == "ft":
        return [TaskOutcome(task.name, solve_task(model, task, config), 0)
                for task in tqdm(tasks, desc="ft", disable=not progress)]
    if mode == "shared":
        pooled = [item for task_items in items for item in task_items]
        trainer = config.adapter_trainer(model, config.steps * len(tasks))
        adapter = init_adapter(trainer.base_params, config.lora, config.seed)
        adapter, _ = trainer.train(adapter, example_batches(pooled, config.batch_size, config.seq_len, rng))
        adapted = trainer.model_with(adapter)
        return [TaskOutcome(task.name, solve_task(adapted, task, config), len(task_items))
                for task, task_items in tqdm(list(zip(tasks, items)), desc="shared", disable=not progress)]
    trainer = config.adapter_trainer(model, config.steps)
    outcomes = []
    for index, (task, task_items) in enumerate(tqdm(list(zip(tasks, items)), desc=mode, disable=not progress)):
        if not task_items:  # nothing fits the training length: the base model answers
            outcomes.append(TaskOutcome(task.name, solve_task(model, task, config), 0))
            continue
        adapter = init_adapter(trainer.base_params, config.lora, config.seed + index)
        adapter, _ = trainer.train(adapter, example_batches(task_items, config.batch_size, config.seq_len, rng))
        outcomes.append(TaskOutcome(task.name, solve_task(trainer.model_with(adapter), task, config),
                                    len(task_items)))
    return outcomes
