"""Plain progress lines for a run whose output is not a terminal (a file, a CI log, ``nohup``):
the progress bar draws only on a TTY, so without this a 60-minute run printed nothing between
its banner and its first rollout."""

from __future__ import annotations

import time
from typing import Any, TextIO

import lightning as L


class PlainProgress(L.Callback):
    """Every ``every_seconds`` (and at the first step and the last), one line::

        [train] step 1200/20000 (6%) | loss 2.314 | policy 1.902 | 6,210 tokens/s, 890 timesteps/s | score 0.43 @2500 | 9.8 min, ETA 46.2 min

    ``score`` is the last closed-loop mean score (``rollout/mean_score``) and the step it was taken
    at, once a validation has rolled out; ETA is the nearer of ``max_steps`` and the time budget.
    Tokens and timesteps are counted on this rank; a folding backbone (``pooled``) turns the same
    timesteps into fewer backbone inputs, so the two rates compare representations fairly."""

    def __init__(
        self, every_seconds: float = 60.0, stream: TextIO | None = None, label: str = "train"
    ) -> None:
        self.every_seconds = every_seconds
        self.label = label
        self.stream = stream
        self._started = 0.0
        self._last = 0.0
        self._tokens = 0.0
        self._timesteps = 0
        self._score: tuple[float, int] | None = None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._started = self._last = time.monotonic()
        self._tokens = 0.0
        self._timesteps = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        if mask is not None:
            self._tokens += float(mask.sum())
            self._timesteps += count_timesteps(batch)
        now = time.monotonic()
        if trainer.global_rank == 0 and (trainer.global_step == 1 or now - self._last >= self.every_seconds):
            self._last = now
            self.emit(trainer, now)

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        score = trainer.callback_metrics.get("rollout/mean_score")
        if score is not None:
            self._score = (float(score), trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.global_rank == 0:
            self.emit(trainer, time.monotonic(), final=True)

    def line(self, trainer: L.Trainer, now: float, final: bool = False) -> str:
        """The progress line at ``now`` (monotonic seconds); ``final``: "(done)" instead of an ETA."""
        step, total = trainer.global_step, trainer.max_steps
        elapsed = max(now - self._started, 1e-9)
        parts = [
            f"step {step}/{total} ({100.0 * step / total:.0f}%)" if total and total > 0 else f"step {step}"
        ]
        metrics = trainer.callback_metrics
        for key, name in (
            ("train/loss", "loss"),
            ("train/policy_loss", "policy"),
            ("val/policy_loss", "held-out policy"),
        ):
            if key in metrics:
                parts.append(f"{name} {float(metrics[key]):.3f}")
        parts.append(f"{self._tokens / elapsed:,.0f} tokens/s, {self._timesteps / elapsed:,.0f} timesteps/s")
        if self._score is not None:
            parts.append(f"score {self._score[0]:.2f} @{self._score[1]}")
        remaining = []
        if total and total > 0 and step > 0:
            remaining.append((total - step) * elapsed / step)
        left = _time_remaining(trainer)
        if left is not None:
            remaining.append(left)
        clock = f"{elapsed / 60.0:.1f} min"
        if final:
            clock += " (done)"
        elif remaining:
            clock += f", ETA {min(remaining) / 60.0:.1f} min"
        parts.append(clock)
        return f"[{self.label}] " + " | ".join(parts)

    def emit(self, trainer: L.Trainer, now: float, final: bool = False) -> None:
        print(self.line(trainer, now, final), file=self.stream, flush=True)


def count_timesteps(batch: dict[str, Any]) -> int:
    """Whole timesteps in a collated batch: every timestep has one separator token (prompts'
    included, goal segments have none)."""
    from gato_like.tokenizers import TokenType

    return int(((batch["types"] == int(TokenType.SEPARATOR)) & batch["attention_mask"]).sum())


def _time_remaining(trainer: L.Trainer) -> float | None:
    """Seconds left of the trainer's wall-time budget (``max_time``), if it has one."""
    from lightning.pytorch.callbacks import Timer

    for callback in trainer.callbacks:  # type: ignore[attr-defined]  # Lightning's max_time is its Timer callback
        if isinstance(callback, Timer):
            left = callback.time_remaining("train")
            return None if left is None else max(float(left), 0.0)
    return None
