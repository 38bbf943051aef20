"""The LightningModule: one GatoModel, AdamW with linear warm-up and cosine decay, per-task
validation losses, and an export of the model in the checkpoint format of ``gato_like.checkpoint``."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch

from gato_like.config import Config
from gato_like.model import GatoModel


@dataclass
class OptimConfig:
    """Optimizer and schedule."""

    lr: float = 3e-4
    """Peak learning rate."""
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    """Linear warm-up from 0 to ``lr``."""
    max_steps: int = 1000
    """Cosine decay to ``min_lr_ratio * lr`` at this step."""
    min_lr_ratio: float = 0.1
    max_seconds: float | None = None
    """Also a wall-time budget (the run's ``max_minutes``): the cosine's progress is the larger of
    the step fraction and the time fraction, so a time-capped run anneals on any machine instead of
    stopping at a high learning rate. None: by steps only (reproducible)."""
    goal_every: int = 4
    """Every this many steps, add the goal-conditioned head's loss on the batch's hindsight goals (0: never)."""


class GatoLightning(L.LightningModule):
    """Trains the policy and dynamics heads on every batch, the goal head every ``goal_every`` steps."""

    def __init__(
        self,
        config: Config,
        optim: OptimConfig | None = None,
        task_names: list[str] | None = None,
        model: GatoModel | None = None,
    ) -> None:
        """``model``: start from these weights (a loaded checkpoint) instead of a fresh ``GatoModel(config)``."""
        super().__init__()
        self.config = config
        self.optim = optim or OptimConfig()
        self.task_names = task_names or []
        self.save_hyperparameters(
            {"config": config.to_dict(), "optim": asdict(self.optim), "task_names": self.task_names}
        )
        self.model = model if model is not None else GatoModel(config)
        self._seconds_before = 0.0  # training seconds of earlier runs this one resumes
        self._started: float | None = None
        self._clock = 0.0  # the schedule's training seconds, the same on every rank

    def train_seconds(self) -> float:
        """Wall seconds spent in ``fit`` so far, resumed runs included."""
        return self._seconds_before + (0.0 if self._started is None else time.monotonic() - self._started)

    def on_train_start(self) -> None:
        self._started = time.monotonic()
        self._clock = self._seconds_before

    def on_train_batch_start(self, batch: Any, batch_index: int) -> None:
        if self.optim.max_seconds:  # rank 0's clock, so every rank anneals alike (replicas agree)
            seconds = self.train_seconds()
            if self.trainer.world_size > 1:
                seconds = float(self.trainer.strategy.broadcast(seconds, src=0))
            self._clock = seconds

    def training_step(self, batch: dict[str, Any], batch_index: int) -> torch.Tensor:
        out = self.model(batch)
        loss = out["loss"]
        use_goal = (
            self.optim.goal_every > 0
            and "goal_ids" in batch
            and self.global_step % self.optim.goal_every == 0
        )
        if use_goal:
            goal = self.model(batch, goal=True)
            loss = loss + goal["loss"]
            self.log("train/goal_loss", goal["goal_loss"], batch_size=len(batch["ids"]))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {float(loss)} at step {self.global_step}")
        size = len(batch["ids"])
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/policy_loss", out["policy_loss"], batch_size=size)
        self.log("train/dynamics_loss", out["dynamics_loss"], batch_size=size)
        self.log("train/tokens", batch["attention_mask"].sum().float(), reduce_fx="sum", batch_size=size)
        return loss

    def on_validation_epoch_start(self) -> None:
        count = max(len(self.task_names), 1)
        self._val_sums = torch.zeros(count, dtype=torch.float64, device=self.device)
        self._val_rows = torch.zeros(count, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict[str, Any], batch_index: int) -> None:
        """Policy loss per task, accumulated as (loss x rows) sums; summed over ranks at epoch end."""
        for task_id in batch["task"].unique().tolist():
            rows = batch["task"] == task_id
            part = {
                k: v[rows] if torch.is_tensor(v) and v.shape[:1] == rows.shape else v
                for k, v in batch.items()
            }
            slot = task_id if task_id < len(self._val_sums) else 0
            self._val_sums[slot] += self.model(part)["policy_loss"].double() * rows.sum()
            self._val_rows[slot] += rows.sum()
        self.log(
            "val/loss", self.model(batch)["loss"], prog_bar=True, batch_size=len(batch["ids"]), sync_dist=True
        )

    def on_validation_epoch_end(self) -> None:
        # every rank takes part in the reduction, whatever tasks its own batches held
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        rows = self.trainer.strategy.reduce(self._val_rows, reduce_op="sum")
        for slot, name in enumerate(self.task_names):
            if rows[slot] > 0:
                self.log(f"val/{name}/policy_loss", (sums[slot] / rows[slot]).float())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the RNG streams (dropout) continue where they were, so a resumed run repeats the losses
        checkpoint["rng"] = {"torch": torch.get_rng_state()}
        checkpoint["train_seconds"] = self.train_seconds()
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._seconds_before = float(checkpoint.get("train_seconds", 0.0))
        state = checkpoint.get("rng") or {}
        if "torch" in state:
            torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by norm under FSDP too. Lightning's FSDP precision plugin refuses clipping by norm
        (``MisconfigurationException``, Lightning issue #19235; seen on an H200 with
        ``--strategy fsdp``): the norm of sharded gradients needs the FSDP module's own
        ``clip_grad_norm_``, which reduces across ranks. Every other strategy clips as Lightning does."""
        from lightning.pytorch.strategies import FSDPStrategy

        if (
            gradient_clip_val
            and gradient_clip_algorithm in (None, "norm")
            and isinstance(self.trainer.strategy, FSDPStrategy)
        ):
            self.trainer.model.clip_grad_norm_(gradient_clip_val)  # type: ignore[union-attr,operator]
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> Any:
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for name, parameter in self.model.named_parameters():
            (
                decay if parameter.ndim >= 2 and "tokens" not in name and "local" not in name else no_decay
            ).append(parameter)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.optim.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.optim.lr,
            betas=self.optim.betas,
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, self.optim, self._clock)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def lr_factor(step: int, optim: OptimConfig, seconds: float = 0.0) -> float:
    """Multiplier of the peak learning rate at ``step`` (``seconds`` into training): linear warm-up,
    then cosine to ``min_lr_ratio`` by ``max_steps`` or, with ``max_seconds``, by then if sooner."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    progress = min(1.0, (step - optim.warmup_steps) / max(1, optim.max_steps - optim.warmup_steps))
    if optim.max_seconds:
        progress = max(progress, min(1.0, seconds / optim.max_seconds))
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
