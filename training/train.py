"""``gato-like train``: pretrain a preset on a dataset with Lightning; the same code on one CPU and
on many GPUs (``--devices``, ``--strategy ddp|fsdp``), bf16 where the hardware has it."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch

from gato_like.checkpoint import save_checkpoint
from gato_like.config import Config
from gato_like.tokenizers import TextTokenizer
from gato_like.training.data import GatoData
from gato_like.training.module import GatoLightning, OptimConfig


class ExportCheckpoint(L.Callback):
    """Writes the model in the ``gato_like.checkpoint`` format (``OUT/checkpoint``) every
    ``every`` steps and at the end, with the dataset's specs and return normalizers."""

    def __init__(self, out: Path, data: GatoData, every: int) -> None:
        self.out, self.data, self.every = out, data, every
        self.started = time.perf_counter()
        self.earlier = 0.0  # training seconds of the run before a resume

    def seconds(self) -> float:
        return self.earlier + time.perf_counter() - self.started

    def state_dict(self) -> dict[str, Any]:
        return {"training_seconds": self.seconds()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.earlier = float(state.get("training_seconds", 0.0))
        self.started = time.perf_counter()

    def export(self, trainer: L.Trainer, module: GatoLightning) -> None:
        if trainer.global_rank != 0:
            return
        index = self.data.source.index["tasks"]
        specs = {}
        tasks: dict[str, Any] = {}
        for task in self.data.task_names:
            spec = self.data.source.specs[task]
            specs[spec.name] = spec
            tasks[task] = {
                "embodiment": spec.name,
                "returns": index[task]["returns"],
                "max_steps": index[task]["max_steps"],
            }
        meta = {
            "step": trainer.global_step,
            "data": self.data.data,
            "preset": module.config.name,
            "training_seconds": round(self.seconds(), 1),
        }
        save_checkpoint(self.out / "checkpoint", module.model, TextTokenizer(), specs, tasks, meta)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if self.every and trainer.global_step % self.every == 0:
            assert isinstance(module, GatoLightning)
            self.export(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        assert isinstance(module, GatoLightning)
        self.export(trainer, module)


def _strategy(name: str) -> Any:
    """``ddp`` finds unused parameters: the goal head trains every ``goal_every`` steps and the image
    encoder only on batches with images, so some parameters get no gradient on some steps."""
    if name == "ddp":
        return L.pytorch.strategies.DDPStrategy(find_unused_parameters=True)
    return name


def default_precision() -> str:
    """bf16 mixed precision where the GPU has bf16, fp32 otherwise (CPUs without bf16 units are ~100x slower in bf16)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def train(
    data: str | Path,
    out: str | Path,
    preset: str = "small",
    max_steps: int = 1000,
    batch_size: int = 8,
    context_length: int | None = None,
    lr: float = 3e-4,
    warmup_steps: int = 100,
    accumulate: int = 1,
    clip: float = 1.0,
    workers: int = 1,
    devices: int | str = "auto",
    accelerator: str = "auto",
    strategy: str = "auto",
    precision: str | None = None,
    val_every: int = 200,
    val_batches: int = 4,
    seed: int = 0,
    resume: bool = False,
    max_minutes: float | None = None,
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
    log_every: int = 10,
    callbacks: list[L.Callback] | None = None,
) -> Path:
    """Train and return the exported checkpoint directory (``OUT/checkpoint``).

    ``OUT/lightning/last.ckpt`` holds the trainer state for ``resume`` (written atomically through
    an fsspec transaction, read back with ``weights_only=True``: tensors and plain containers, no
    arbitrary unpickling); ``OUT/logs`` the CSV (and TensorBoard, if installed) logs. A resumed run
    continues the model, optimizer, schedule, RNG and data stream where the interrupted run stopped,
    and reproduces its losses. ``callbacks`` are added to the trainer's.
    """
    L.seed_everything(seed, workers=True)
    out = Path(out)
    fields = dict(overrides or {}) | (
        {"context_length": context_length} if context_length is not None else {}
    )
    config = Config.from_name(preset, **fields)
    datamodule = GatoData(data, batch_size, config.context_length, workers, seed=seed)
    module = GatoLightning(
        config, OptimConfig(lr=lr, warmup_steps=warmup_steps, max_steps=max_steps), datamodule.task_names
    )
    loggers: list[Any] = [L.pytorch.loggers.CSVLogger(out, name="logs", version="")]
    try:
        import tensorboard  # noqa: F401

        loggers.append(L.pytorch.loggers.TensorBoardLogger(out, name="logs", version="tensorboard"))
    except ImportError:
        pass
    state = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=out / "lightning", save_top_k=0, save_last=True, every_n_train_steps=val_every
    )
    trainer = L.Trainer(
        max_steps=max_steps,
        max_time=None if max_minutes is None else timedelta(minutes=max_minutes),
        accelerator=accelerator,
        devices=devices,
        strategy=_strategy(strategy),
        precision=precision or default_precision(),  # type: ignore[arg-type]
        accumulate_grad_batches=accumulate,
        gradient_clip_val=clip,
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=val_batches,
        num_sanity_val_steps=0,
        logger=loggers,
        callbacks=[state, ExportCheckpoint(out, datamodule, val_every), *(callbacks or [])],
        enable_progress_bar=progress,
        log_every_n_steps=log_every,
    )
    last = out / "lightning" / "last.ckpt"
    if resume and not last.exists():
        raise FileNotFoundError(
            f"--resume: no trainer state at {last} (expected a run started with --out {out})"
        )
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if resume else None, weights_only=True)
    return out / "checkpoint"
