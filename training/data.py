"""The LightningDataModule over streaming shards (``gato_like.data_pipelines.loader``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from gato_like.data_pipelines.loader import DatasetSource, LoaderConfig, make_dataloader


class GatoData(L.LightningDataModule):
    """Training batches from an endless resampled stream (each rank and worker its own shard
    order); validation from a fixed number of batches of a separate seeded stream."""

    def __init__(
        self,
        data: str | Path,
        batch_size: int = 8,
        context_length: int = 1024,
        workers: int = 1,
        tasks: list[str] | None = None,
        domain_weights: dict[str, float] | None = None,
        seed: int = 0,
        history_steps: int = 0,
        discrete_history_steps: int = 0,
        task_batches: bool = True,
        batch_tokens: int = 0,
        discrete_batch_tokens: int = 0,
        backbone: str = "decoder",
        perceiver_latents: int = 0,
        mix_tasks: bool = False,
    ) -> None:
        super().__init__()
        self.backbone, self.perceiver_latents = backbone, perceiver_latents
        self.task_batches, self.mix_tasks = task_batches, mix_tasks
        self.batch_tokens, self.discrete_batch_tokens = batch_tokens, discrete_batch_tokens
        self.history_steps, self.discrete_history_steps = history_steps, discrete_history_steps
        self.data = str(data)
        self.batch_size = batch_size
        self.context_length = context_length
        self.workers = workers
        self.tasks = tasks
        self.domain_weights = domain_weights
        self.seed = seed
        self.source = DatasetSource.open(self.data, tasks)

    @property
    def task_names(self) -> list[str]:
        return self.source.tasks

    def _loader(self, seed: int, skip_batches: int = 0, workers: int | None = None) -> Any:
        config = LoaderConfig(
            context_length=self.context_length,
            backbone=self.backbone,
            perceiver_latents=self.perceiver_latents,
            domain_weights=self.domain_weights,
            seed=seed,
            history_steps=self.history_steps,
            discrete_history_steps=self.discrete_history_steps,
            task_batches=self.task_batches,
            mix_tasks=self.mix_tasks,
            batch_tokens=self.batch_tokens,
            discrete_batch_tokens=self.discrete_batch_tokens,
        )
        return make_dataloader(
            self.data,
            self.batch_size,
            config,
            self.tasks,
            self.workers if workers is None else workers,
            skip_batches=skip_batches,
        )

    def train_dataloader(self) -> Any:
        # A resumed trainer has restored its step count before it asks for the loader: skip the
        # batches the interrupted run consumed, so the resumed run sees the same data.
        trainer = self.trainer
        done = trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else 0
        return self._loader(self.seed, skip_batches=done)

    def val_dataloader(self) -> Any:
        return self._loader(self.seed + 10_007)
