"""``gato-like finetune``: adapt a pretrained checkpoint to a new embodiment from a few demonstrations.

::

    base checkpoint ──► checks (tokenizer, specs) ──┐
    DEMOS (gato-like data convert) ──► checks ──────┤   nothing trains until every check passes
                                                    ▼
    demos ──► train (all but the held-out ones) ──► windows (25 % prompted by another demo) ──► Lightning
          └─► held-out demo(s) ──► validation policy loss every ``val_every`` steps ──► early stopping
    best weights (LoRA merged) ──► OUT/checkpoint: base specs + the new one, meta records base, demos, mode

Modes: ``lora`` (rank-r adapters on attention and MLP, plus the layer norms and the dynamics and
goal heads' adapters; the default),
``head`` (the output layer, tied with the token embedding, the final norm and the head adapters)
and ``full`` (every weight). The exported checkpoint has the base model's format, so
``Policy.from_checkpoint``, ``gato-like eval`` and ``gato-like serve`` take it as it is.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from gato_like.checkpoint import (
    TOKENIZER_FILE,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    tokenizer_sha256,
)
from gato_like.config import Config
from gato_like.data_pipelines.episodes import Episode, EpisodeFormatError
from gato_like.data_pipelines.loader import DatasetSource, LoaderConfig, WindowSampler, collate
from gato_like.data_pipelines.shards import DatasetError
from gato_like.lora import LoRALinear, apply_lora, merge_lora
from gato_like.model import GatoModel, action_targets
from gato_like.tokenizers import EmbodimentSpec, TokenSequence
from gato_like.tokenizers.spec import SpecError, SpecMismatchError
from gato_like.training.module import GatoLightning, OptimConfig, lr_factor
from gato_like.training.progress import PlainProgress
from gato_like.training.settings import FinetuneConfig, Mode

MODES = ("lora", "head", "full")
#: Default peak learning rate per mode (adapters and heads tolerate a larger step than full weights).
DEFAULT_LR = {"lora": 2e-3, "head": 2e-3, "full": 5e-4}


class FinetuneError(ValueError):
    """Inputs that cannot be fine-tuned on; raised before any training, naming every problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            "cannot fine-tune:\n" + "\n".join(f"  - {p}" for p in problems)
            if len(problems) > 1
            else f"cannot fine-tune: {problems[0]}"
        )


# -- checks ---------------------------------------------------------------------------------------


@dataclass
class Demos:
    """The demonstrations of one task, read and checked: ``train`` and ``held_out`` episodes."""

    root: Path
    task: str
    spec: EmbodimentSpec
    index_entry: dict[str, Any]
    train: list[Episode]
    held_out: list[Episode]


def check_base(base: str | Path) -> Any:
    """Load the base checkpoint; its tokenizer must be the one its weights were trained with."""
    try:
        loaded = load_checkpoint(base)
    except CheckpointError as error:
        raise FinetuneError([f"base checkpoint: {error}"]) from None
    expected = loaded.meta.get("tokenizer_sha256")
    actual = tokenizer_sha256(loaded.text)  # the bytes of the checkpoint's tokenizer/text.model
    if expected and expected != actual:
        raise FinetuneError(
            [
                f"base checkpoint {base}: {TOKENIZER_FILE} has sha256 {actual[:12]}..., but the weights were "
                f"trained with the tokenizer of sha256 {expected[:12]}... (meta.json tokenizer_sha256); "
                "the text ids would not mean what the model learned. Put the original tokenizer back, or "
                "pretrain with the new one"
            ]
        )
    return loaded


def load_demos(
    demos: str | Path,
    task: str | None = None,
    spec_file: str | Path | None = None,
    holdout: int | None = None,
    seed: int = 0,
    base_specs: dict[str, EmbodimentSpec] | None = None,
) -> Demos:
    """Read every demo of ``task`` from a dataset folder and check it; split off the held-out ones.

    Raises :class:`FinetuneError` listing every problem: an unreadable folder, a spec that does not
    match the demos (``spec_file`` given or the folder's own), non-finite values, too few demos, an
    embodiment name the base checkpoint already uses for a different spec.
    """
    from gato_like.data_pipelines.shards import iter_shard

    root = Path(demos)
    try:
        source = DatasetSource.open(root)
    except SpecError:
        raise  # a broken embodiment.json: its own error names the file and every field
    except (DatasetError, OSError, ValueError) as error:
        raise FinetuneError(
            [f"demos {root}: {error} (make the folder with `gato-like data convert`)"]
        ) from None
    names = source.tasks
    if task is None:
        if len(names) != 1:
            raise FinetuneError([f"demos {root} hold {len(names)} tasks {names}: name one with --task"])
        task = names[0]
    if task not in names:
        raise FinetuneError([f"demos {root}: no task {task!r} (tasks: {names})"])
    spec = source.specs[task]
    problems: list[str] = []
    if spec_file is not None:
        given = EmbodimentSpec.from_file(spec_file)
        detail = given.differences(spec, "the spec", "the demos")
        if detail:
            problems.append(f"--spec {spec_file} does not match the demos in {root}: " + "; ".join(detail))
            spec = given  # check every episode against the spec the user means, to list all problems
    known = (base_specs or {}).get(spec.name)
    if known is not None and known != spec:
        problems.append(
            f"the base checkpoint already has an embodiment named {spec.name!r} with a different spec; "
            "give yours another name in its embodiment.json"
        )
    episodes: list[Episode] = []
    for url in source.shard_urls(task):
        try:
            for episode in iter_shard(url):
                try:
                    episode.check(spec)
                    if not np.isfinite(episode.rewards).all():
                        raise ValueError("rewards: expected finite values, got NaN or Inf")
                    episodes.append(episode)
                except SpecMismatchError as error:
                    problems.append(
                        f"{url}: demo {episode.key!r}: " + "; ".join(str(v) for v in error.violations)
                    )
                except ValueError as error:
                    problems.append(f"{url}: demo {episode.key!r}: {error}")
        except (EpisodeFormatError, OSError) as error:
            problems.append(str(error))
    if not problems and len(episodes) < 2:
        problems.append(
            f"demos {root} task {task!r}: {len(episodes)} demo(s); at least 2 are needed, one to train on "
            "and one held out for early stopping"
        )
    count = holdout if holdout is not None else max(1, round(0.1 * len(episodes)))
    if not problems and not 1 <= count < len(episodes):
        problems.append(
            f"holdout: expected 1 to {len(episodes) - 1} held-out demos of the {len(episodes)}, got {count}"
        )
    if problems:
        raise FinetuneError(problems)
    order = list(range(len(episodes)))
    random.Random(seed).shuffle(order)
    held = sorted(order[:count])
    return Demos(
        root=root,
        task=task,
        spec=spec,
        index_entry=source.index["tasks"][task],
        train=[episodes[i] for i in range(len(episodes)) if i not in held],
        held_out=[episodes[i] for i in held],
    )


# -- data -----------------------------------------------------------------------------------------


class DemoStream(torch.utils.data.IterableDataset):
    """Endless training sequences from in-memory demos: a random demo, a random window of whole
    timesteps, a prompt from another demo for ``prompt_probability`` of them, a hindsight goal."""

    def __init__(self, sampler: WindowSampler, episodes: list[Episode], seed: int) -> None:
        super().__init__()
        self.sampler, self.episodes, self.seed = sampler, episodes, seed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rng = random.Random(self.seed)
        bounds = [self.sampler.bounds(e) for e in self.episodes]
        pool: deque[tuple[str, list[TokenSequence]]] = deque(
            (
                (e.key, self.sampler.prompt_candidates(e, b, rng))
                for e, b in zip(self.episodes, bounds, strict=True)
            ),
            maxlen=len(self.episodes),
        )
        while True:
            i = rng.randrange(len(self.episodes))
            yield self.sampler.sample(self.episodes[i], bounds[i], rng, pool)


class DemoData(L.LightningDataModule):
    def __init__(self, demos: Demos, text: Any, model: Config, batch_size: int, prompt_probability: float, seed: int, goal_last: bool = False) -> None:  # fmt: skip
        """Windows of the demos cut as the base model was trained and acts: ``model``'s context
        (in its backbone's inputs) and history (``history_steps``, ``discrete_history_steps``)."""
        super().__init__()
        index = {"tasks": {demos.task: demos.index_entry}}
        source = DatasetSource(str(demos.root), index, {demos.task: demos.spec})
        config = LoaderConfig(context_length=model.context_length, prompt_probability=prompt_probability, seed=seed,
                              history_steps=model.history_steps, backbone=model.backbone,
                              discrete_history_steps=model.discrete_history_steps,
                              perceiver_latents=model.perceiver_latents)  # fmt: skip
        self.sampler = WindowSampler(source, config, text)
        self.demos, self.batch_size, self.seed = demos, batch_size, seed
        self.pad_id = self.sampler.builders[demos.task].layout.pad_id
        self.validation = [s for e in demos.held_out for s in self.sampler.tiles(e, goal_last)]

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(samples, self.pad_id)

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(
            DemoStream(self.sampler, self.demos.train, self.seed),
            batch_size=self.batch_size,
            collate_fn=self._collate,
            num_workers=0,
        )

    def val_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(
            self.validation,  # type: ignore[arg-type]  # a list is a map-style dataset
            batch_size=self.batch_size,
            collate_fn=self._collate,
            shuffle=False,
        )

    def tokens_per_pass(self) -> int:
        return int(sum(self.sampler.bounds(e)[-1] for e in self.demos.train))


# -- the module -----------------------------------------------------------------------------------


class FinetuneModule(GatoLightning):
    """Trains the parameters ``mode`` selects; validates the ``monitor`` head's loss (policy or
    goal) over the held-out demos."""

    def __init__(self, model: GatoModel, optim: OptimConfig, mode: Mode, weight_decay: float, monitor: str = "policy") -> None:  # fmt: skip
        model.train()  # loaded checkpoints come in eval mode
        super().__init__(model.config, optim, [], model=model)
        self.mode, self.weight_decay, self.monitor = mode, weight_decay, monitor

    def on_validation_epoch_start(self) -> None:
        self._val = torch.zeros(2, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict[str, Any], batch_index: int) -> None:
        if self.monitor == "goal":
            out = self.model(batch, goal=True)
            targets = action_targets(batch)[:, 1:].sum().double()  # the goal loss's targets
        else:
            out = self.model(batch)
            targets = (batch["loss_mask"][:, 1:]).sum().double()
        self._val += torch.stack([out[f"{self.monitor}_loss"].double() * targets, targets])

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val, reduce_op="sum")
        self.log(f"val/{self.monitor}_loss", (total[0] / total[1].clamp(min=1)).float(), prog_bar=True)

    def configure_optimizers(self) -> Any:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            trainable, lr=self.optim.lr, betas=self.optim.betas, weight_decay=self.weight_decay
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, self.optim))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def select_trainable(model: torch.nn.Module, mode: Mode, rank: int, alpha: float) -> int:
    """Freeze what ``mode`` keeps fixed (adding LoRA adapters for ``lora``); returns trainable count."""
    if mode not in MODES:
        raise FinetuneError([f"mode: expected one of {MODES}, got {mode!r}"])
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if mode == "lora":
            apply_lora(model, rank, alpha)
            for module in model.modules():
                if isinstance(module, LoRALinear):
                    module.lora_a.requires_grad_(True)
                    module.lora_b.requires_grad_(True)
                elif isinstance(module, torch.nn.LayerNorm):
                    for p in module.parameters():
                        p.requires_grad_(True)
            for name in ("dynamics_adapter", "goal_adapter"):  # the heads' own small adapters
                for p in getattr(model, name).parameters():
                    p.requires_grad_(True)
            model.goal_segment.requires_grad_(True)
        else:  # head: output layer (tied with the token embedding), final norm, head adapters
            for name in ("tokens", "ln_f", "dynamics_adapter", "goal_adapter"):
                for p in getattr(model, name).parameters():
                    p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class KeepBest(L.Callback):
    """Keeps a copy of the weights at the best held-out loss ``key`` (on the CPU), for the export."""

    def __init__(self, key: str = "val/policy_loss") -> None:
        self.key = key
        self.best = math.inf
        self.step = 0
        self.state: dict[str, torch.Tensor] | None = None
        self.history: list[tuple[int, float]] = []

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.key)
        if value is None or trainer.sanity_checking:
            return
        loss = float(value)
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite held-out loss at step {trainer.global_step}")
        self.history.append((trainer.global_step, round(loss, 5)))
        if loss < self.best:
            self.best, self.step = loss, trainer.global_step
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


# -- the command ----------------------------------------------------------------------------------


def finetune(
    base: str | Path,
    demos: str | Path,
    out: str | Path,
    config: FinetuneConfig | None = None,
    task: str | None = None,
    spec: str | Path | None = None,
    progress: bool = True,
    command: str | None = None,
) -> Path:
    """Fine-tune ``base`` on the demos of one task; returns ``OUT/checkpoint``.

    Every check (base checkpoint and tokenizer, spec against the demos, finite values, enough
    demos to hold one out) runs before any training; see :class:`FinetuneError`.
    """
    cfg = config or FinetuneConfig()
    if cfg.mode not in MODES:
        raise FinetuneError([f"mode: expected one of {MODES}, got {cfg.mode!r}"])
    out = Path(out)
    loaded = check_base(base)
    data_demos = load_demos(demos, task, spec, cfg.holdout, cfg.seed, loaded.specs)
    model = loaded.model
    base_config = model.config
    L.seed_everything(cfg.seed, workers=True)
    if cfg.monitor not in ("policy", "goal"):
        raise FinetuneError([f"monitor: expected 'policy' or 'goal', got {cfg.monitor!r}"])
    if cfg.monitor == "goal" and cfg.goal_every < 1:
        raise FinetuneError(["monitor 'goal' follows the goal head, which goal_every 0 never trains"])
    data = DemoData(data_demos, loaded.text, base_config, cfg.batch_size, cfg.prompt_probability, cfg.seed, goal_last=cfg.monitor == "goal")  # fmt: skip
    tokens_per_pass = data.tokens_per_pass()
    batches_per_pass = max(1, math.ceil(tokens_per_pass / (cfg.batch_size * base_config.context_length)))
    max_steps = cfg.max_steps or int(np.clip(30 * batches_per_pass, 100, 1500))
    val_every = cfg.val_every or max(10, max_steps // 15)
    lr = cfg.lr or DEFAULT_LR[cfg.mode]
    total = sum(p.numel() for p in model.parameters())
    trainable = select_trainable(model, cfg.mode, cfg.lora_rank, cfg.lora_alpha)
    optim = OptimConfig(
        lr=lr, warmup_steps=min(20, max_steps // 10), max_steps=max_steps, goal_every=cfg.goal_every
    )
    module = FinetuneModule(model, optim, cfg.mode, cfg.weight_decay, cfg.monitor)
    monitored = f"val/{cfg.monitor}_loss"
    keep = KeepBest(monitored)
    stop = L.pytorch.callbacks.EarlyStopping(monitored, patience=cfg.patience, mode="min", check_finite=True)
    from datetime import timedelta

    from gato_like.training.train import default_precision, plot_losses

    # the bar draws only on a terminal; to a file or a CI log, a plain line every 30 s instead
    plain = (
        [PlainProgress(every_seconds=30.0, label="finetune")] if progress and not sys.stdout.isatty() else []
    )
    trainer = L.Trainer(
        max_steps=max_steps,
        max_epochs=1,
        max_time=None if cfg.max_minutes is None else timedelta(minutes=cfg.max_minutes),
        accelerator="auto",
        devices=1,
        precision=default_precision(),  # type: ignore[arg-type]  # one of Lightning's precision names
        gradient_clip_val=1.0,
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=[L.pytorch.loggers.CSVLogger(out, name="logs", version="")],
        callbacks=[keep, stop, *plain],
        enable_progress_bar=progress and not plain,
        enable_checkpointing=False,
        log_every_n_steps=max(1, min(10, val_every)),
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - started
    if keep.state is None:  # stopped before the first validation (time cap): take the weights as they are
        trainer.validate(module, datamodule=data, verbose=False)
    if keep.state is not None:
        module.load_state_dict(keep.state)
    merge_lora(module.model)
    for p in module.model.parameters():
        p.requires_grad_(True)
    base_meta = loaded.meta
    tasks = dict(loaded.tasks)
    entry = data_demos.index_entry
    tasks[data_demos.task] = {
        "embodiment": data_demos.spec.name,
        "returns": entry.get("returns"),
        "max_steps": entry.get("max_steps"),
        "episodes": len(data_demos.train) + len(data_demos.held_out),
    }
    meta = {
        "preset": base_config.name,
        "parameters": total,
        "data": str(data_demos.root),
        "step": keep.step,
        "tokenizer_sha256": tokenizer_sha256(loaded.text),
        "training_seconds": round(seconds, 1),
        "settings": {
            "command": command,
            "context_length": base_config.context_length,
            "batch_size": cfg.batch_size,
            "lr": lr,
            "max_steps": max_steps,
            "warmup_steps": optim.warmup_steps,
            "goal_every": cfg.goal_every,
            "clip": 1.0,
        },
        "finetune": {
            "base": str(base),
            "base_preset": base_meta.get("preset"),
            "base_step": base_meta.get("step"),
            "base_data": base_meta.get("data"),
            "base_tokens": base_meta.get("tokens"),
            "task": data_demos.task,
            "embodiment": data_demos.spec.name,
            "demos": len(data_demos.train),
            "held_out": len(data_demos.held_out),
            "demo_keys": [e.key for e in data_demos.train],
            "held_out_keys": [e.key for e in data_demos.held_out],
            "mode": cfg.mode,
            "trainable_parameters": trainable,
            "steps_run": trainer.global_step,
            "best_step": keep.step,
            "monitor": cfg.monitor,
            f"best_held_out_{cfg.monitor}_loss": None
            if not math.isfinite(keep.best)
            else round(keep.best, 5),
            "validation": keep.history,
            # patience ran out before the step budget (at the last validation it ends nothing)
            "early_stopped": stop.wait_count >= cfg.patience and trainer.global_step < max_steps,
            "config": {k: v for k, v in asdict(cfg).items()},
        },
    }
    specs = dict(loaded.specs) | {data_demos.spec.name: data_demos.spec}
    checkpoint = save_checkpoint(out / "checkpoint", module.model, loaded.text, specs, tasks, meta)
    if (out / "logs" / "metrics.csv").is_file():
        plot_losses(
            out / "logs" / "metrics.csv",
            out / "losses.png",
            ("train/policy_loss", "train/dynamics_loss", monitored),
        )
    (out / "finetune.json").write_text(json.dumps(meta["finetune"], indent=2) + "\n")
    return checkpoint


__all__ = [
    "Demos",
    "FinetuneConfig",
    "FinetuneError",
    "check_base",
    "finetune",
    "load_demos",
    "select_trainable",
]
