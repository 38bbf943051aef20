"""The settings of ``gato-like train``, ``finetune`` and ``eval``, one dataclass each: the
library's :func:`~gato_like.training.train.train`, :func:`~gato_like.training.finetune.finetune`
and :func:`~gato_like.training.evaluate.evaluate` take them, and the command line reads their fields as its flags (with their docstrings as help),
so a setting is written once. Importing this module imports no torch."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from gato_like.envs.registry import split_names

Mode = Literal["lora", "head", "full"]


@dataclass
class TrainConfig:
    """How to train.

    Everything ``gato-like train`` takes besides ``--data`` and ``--out``, read by the command
    line as it is (``--lr 1e-3``, ``--model.n_layer 8``).

    ``recipe`` names settings (:mod:`gato_like.training.recipes`) that fill every field left
    ``None``; ``gato-like train`` uses ``cpu`` without a GPU and ``gato`` with one, the library the
    plain ``base`` settings. :meth:`resolved` fills them."""

    recipe: str | None = None
    """cpu (the default of `gato-like train` without a GPU: the suite in <= 60 min on 2 cores), cpu-demo, or gato (the default with a GPU)."""
    preset: str | None = None
    """debug, tiny, small, gato-79m, gato-364m or gato-1.18b (default: the recipe's)."""
    model: dict[str, int | float | str | bool] | None = None
    """Overrides of the preset's fields on top of the recipe's, e.g. --model.n_layer 8 --model.history_steps 0."""
    max_steps: int | None = None
    """Optimizer steps (default: the recipe's)."""
    max_minutes: float | None = None
    """Stop after this much wall time even before max_steps (default: the recipe's)."""
    batch_size: int | None = None
    """Sequences per step and device (default: the recipe's)."""
    batch_tokens: int | None = None
    """About this many tokens a batch at most, each batch one task (0: batch_size sequences; default: the recipe's)."""
    discrete_batch_tokens: int | None = None
    """batch_tokens for tasks with discrete actions, e.g. BabyAI (0: batch_tokens; default: the recipe's)."""
    mix_tasks: bool | None = None
    """A batch mixes every task whose actions are of its kind (continuous or discrete) instead of holding one task (default: the recipe's)."""
    context_length: int | None = None
    """Tokens per sequence (default: the preset's)."""
    lr: float | None = None
    """Peak learning rate (AdamW, linear warm-up, cosine decay; default: the recipe's)."""
    warmup_steps: int | None = None
    """Warm-up steps (default: the recipe's)."""
    accumulate: int = 1
    """Gradient accumulation steps."""
    clip: float = 1.0
    """Gradient norm clipping."""
    workers: int | None = None
    """Data-loader workers per device (default: the recipe's)."""
    threads: int | None = None
    """Torch intra-op threads (default: the cores left after the loader workers)."""
    devices: int | str = "auto"
    """Devices per node ("auto", a count, or a list)."""
    accelerator: str = "auto"
    """Lightning accelerator (auto, cpu, gpu)."""
    strategy: str = "auto"
    """auto, ddp or fsdp."""
    precision: str | None = None
    """Lightning precision (default: bf16-mixed where the GPU or CPU has bf16 units and is faster, else 32-true)."""
    val_every: int | None = None
    """Validate, roll out and export every this many steps (default: the recipe's)."""
    val_batches: int = 4
    """Validation batches per validation."""
    rollout_episodes: int | None = None
    """Closed-loop episodes per task at each validation (0: none; default: the recipe's)."""
    rollout_tasks: str | list[str] | None = None
    """Tasks to roll out, comma-separated or a list (default: every task with a simulator)."""
    tasks: str | list[str] | None = None
    """Tasks of the dataset to train on, comma-separated or a list (default: all)."""
    domain_weights: dict[str, float] | None = None
    """Each task's share of the optimizer steps, e.g. --domain_weights '{"dmc-reacher-easy": 2}' (default: the recipe's for the tasks it names, 1 for the rest)."""
    goal_every: int | None = None
    """Train the goal head every this many steps (0: never; default: the recipe's)."""
    ema_decay: float | None = None
    """Export and roll out an exponential moving average of the weights with this decay per step, e.g. 0.999 (0: the raw weights; default: the recipe's)."""
    seed: int = 0
    """Seed of the model, the data order and the sampler."""
    resume: bool = False
    """Continue from OUT/lightning/last.ckpt."""
    log_every: int = 10
    """Log the losses every this many steps."""

    @property
    def task_names(self) -> list[str] | None:
        return split_names(self.tasks)

    @property
    def rollout_task_names(self) -> list[str] | None:
        return split_names(self.rollout_tasks)

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` the recipe sets filled in (``recipe`` None: ``base``), and
        the recipe's model overrides under the given ones. Raises
        ``KeyError`` for an unknown recipe."""
        from gato_like.training.recipes import BASE, get_recipe

        chosen = BASE if self.recipe is None else get_recipe(self.recipe)
        filled = {
            name: getattr(chosen, name)
            for name in ("preset", "max_steps", "max_minutes", "batch_size", "batch_tokens", "discrete_batch_tokens", "lr", "warmup_steps",
                         "workers", "val_every", "rollout_episodes", "goal_every", "ema_decay", "mix_tasks")
            if getattr(self, name) is None
        }  # fmt: skip
        return replace(
            self,
            recipe=chosen.name,
            model=dict(chosen.model) | dict(self.model or {}),
            **filled,
        )


def check_threads(threads: object) -> None:
    """Refuse a torch thread count that is not None or an integer >= 1 (``train``, ``eval``),
    before any work."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads: expected a count of torch threads >= 1, got {threads!r}")


@dataclass
class FinetuneConfig:
    """How to adapt. Every default is meant for 5-50 demos without tuning."""

    mode: Mode = "lora"
    """lora, head or full."""
    lr: float | None = None
    """Peak learning rate (default per mode: lora and head 2e-3, full 5e-4)."""
    max_steps: int | None = None
    """Optimizer steps at most (default: about 30 passes over the training demos, 100 to 1500)."""
    batch_size: int = 8
    """Sequences per step."""
    val_every: int | None = None
    """Validate on the held-out demo(s) every this many steps (default: max_steps / 15, at least 10)."""
    patience: int = 4
    """Stop after this many validations without a better held-out loss."""
    holdout: int | None = None
    """Demos held out for early stopping (default: 10 %, at least 1)."""
    lora_rank: int = 8
    lora_alpha: float = 16.0
    prompt_probability: float = 0.25
    """Share of training sequences prompted with another demo (as in pretraining)."""
    weight_decay: float = 0.0
    goal_every: int = 4
    """Every this many steps, add the goal head's loss on hindsight goals of the demos (0: never;
    1: every step, for goal-reaching demos)."""
    monitor: Literal["policy", "goal"] = "policy"
    """What early stopping and the kept weights follow on the held-out demos: the policy loss, or
    (goal-reaching demos) the goal head's loss with each demo's last observation as its goal."""
    seed: int = 0
    max_minutes: float | None = None
    """Wall-time cap; the best weights so far are exported."""


@dataclass
class EvalConfig:
    """What to evaluate.

    The flags of ``gato-like eval`` besides ``--ckpt`` and ``--out``."""

    tasks: str | list[str] | None = None
    """Task names, comma-separated or a list (default: every task the checkpoint was trained on)."""
    episodes: int = 10
    """Episodes per task."""
    max_steps: int | None = None
    """Episode length cap (default: the training data's)."""
    seed: int = 0
    """Seed of the evaluation episodes (disjoint from the training seeds)."""
    prompt: Path | None = None
    """A demos folder: prompt every episode with the end of one of its demos of the task."""
    gym: str | None = None
    """A gymnasium environment id (e.g. InvertedPendulum-v5): roll the checkpoint's task with that
    environment's spaces out in it; mean return beside a uniform-random policy's."""
    threads: int | None = None
    """Torch intra-op threads for the policy (default: torch's, one per core). Give 1 to each of
    evaluations run side by side: two on 2 cores with torch's default took ~8x as long."""

    @property
    def task_names(self) -> list[str] | None:
        return split_names(self.tasks)
