"""An exponential moving average of the weights (Polyak averaging): the weights a run exports and
scores when ``ema_decay`` is set, while the optimizer keeps training the raw ones.

The averaging itself is torch's (``torch.optim.swa_utils.AveragedModel`` with
``get_ema_multi_avg_fn``). Lightning's own ``WeightAveraging`` callback swaps the average into the
module only around validation epochs and at the very end, while this project's exports and
closed-loop rollouts run at other hooks and must read the average every time, so the callback
below hands the averaged model to them instead (:func:`exported_model`).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from gato_like.model import GatoModel


class EMAWeights(L.Callback):
    """Keeps an exponential moving average of the model's parameters, updated after every
    optimizer step. Step ``n``'s update uses the decay ``min(decay, (1 + n) / (10 + n))``, so a
    short run's average is not held back by its first, untrained weights (with a fixed 0.999 the
    initial weights still carry ``0.999 ** n`` of it: a fifth after 1,500 steps).

    The raw weights keep training and are what ``OUT/lightning/last.ckpt`` resumes; the average is
    this callback's state in the same file, so a resumed run continues the same average.

    Args:
        decay: the average's decay per step once warmed up, in [0, 1); 0.999 averages over the
            last ~1,000 steps, 0 keeps the raw weights.
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay: expected a decay per step in [0, 1) (0: no averaging), got {decay}")
        self.decay = decay
        self.average: AveragedModel | None = None

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.average is not None:
            return
        if "fsdp" in type(trainer.strategy).__name__.lower():
            raise ValueError(
                "ema_decay: the weight average keeps a full copy of the model on every rank, which "
                "a sharded (FSDP) run does not have; train with --ema_decay 0 or --strategy ddp"
            )
        # buffers are constants here (no batch norm): the copy's stay as they were built
        self.average = AveragedModel(_model(module), multi_avg_fn=self._update, use_buffers=False)

    def _update(
        self,
        averaged: tuple[torch.Tensor, ...] | list[torch.Tensor],
        current: tuple[torch.Tensor, ...] | list[torch.Tensor],
        count: torch.Tensor | int,
    ) -> None:
        n = int(count)
        get_ema_multi_avg_fn(min(self.decay, (1.0 + n) / (10.0 + n)))(averaged, current, count)

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_index: int
    ) -> None:
        # once per optimizer step (gradient accumulation calls this per batch); the count of
        # updates is the average's own, so a resumed run goes on where its state stopped
        if self.average is not None and trainer.global_step > int(self.average.n_averaged):
            self.average.update_parameters(_model(module))

    def model(self) -> GatoModel:
        """The averaged model (raises before training has set it up)."""
        if self.average is None:
            raise RuntimeError("EMAWeights: no average yet (the callback sets it up when fit starts)")
        inner = self.average.module
        assert isinstance(inner, GatoModel)
        return inner

    def state_dict(self) -> dict[str, Any]:
        return {"average": None if self.average is None else self.average.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        average = state.get("average")
        if average is None:
            return
        if self.average is None:  # Lightning restores callbacks after their setup
            raise RuntimeError("EMAWeights: the state came before setup made the average to load it into")
        self.average.load_state_dict(average)


def exported_model(trainer: L.Trainer, module: L.LightningModule) -> GatoModel:
    """The weights a run exports and rolls out: the moving average when the trainer keeps one
    (:class:`EMAWeights`), the module's own model otherwise."""
    for callback in getattr(trainer, "callbacks", []):  # (a bare stand-in trainer has none)
        if isinstance(callback, EMAWeights) and callback.average is not None:
            return callback.model()
    model = _model(module)
    assert isinstance(model, GatoModel)
    return model


def _model(module: L.LightningModule) -> torch.nn.Module:
    model = getattr(module, "model", None)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a module with a .model (a GatoModel), got {type(module).__name__}")
    return model
