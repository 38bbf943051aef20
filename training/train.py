"""``gato-like train``: pretrain a preset on a dataset with Lightning; the same code on one CPU and
on many GPUs (``--devices``, ``--strategy ddp|fsdp``), bf16 where the hardware has it."""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch

from gato_like.checkpoint import save_checkpoint, tokenizer_sha256
from gato_like.config import CONFIG_FILE, Config
from gato_like.data_pipelines.loader import check_domain_weights
from gato_like.model import position_problem
from gato_like.tokenizers import SequenceBuilder, TextTokenizer
from gato_like.training.averaging import EMAWeights, exported_model
from gato_like.training.data import GatoData
from gato_like.training.module import GatoLightning, OptimConfig
from gato_like.training.progress import PlainProgress, count_timesteps
from gato_like.training.rollouts import RolloutScores, plot_scores
from gato_like.training.rollouts import rollout_tasks as rollout_tasks_of
from gato_like.training.settings import TrainConfig, check_threads


class ExportCheckpoint(L.Callback):
    """Writes the model in the ``gato_like.checkpoint`` format (``OUT/checkpoint``) every
    ``every`` steps and at the end, with the dataset's specs and return normalizers, and in
    ``meta.json`` what a model card states: data, preset, run settings, compute, training time,
    tokens seen, throughput and the latest losses."""

    def __init__(self, out: Path, data: GatoData, every: int, settings: dict[str, Any] | None = None) -> None:
        self.out, self.data, self.every = out, data, every
        self.settings = settings or {}
        self.started = time.perf_counter()
        self.earlier = 0.0  # training seconds of the run before a resume
        self.tokens = 0  # non-pad tokens trained on, all ranks
        self.timesteps = 0  # whole timesteps trained on (one separator each), all ranks
        self.exported = -1

    def seconds(self) -> float:
        return self.earlier + time.perf_counter() - self.started

    def state_dict(self) -> dict[str, Any]:
        return {"training_seconds": self.seconds(), "tokens": self.tokens, "timesteps": self.timesteps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.earlier = float(state.get("training_seconds", 0.0))
        self.tokens = int(state.get("tokens", 0))
        self.timesteps = int(state.get("timesteps", 0))
        self.started = time.perf_counter()

    def specs_and_tasks(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The embodiment specs and the per-task entries (normalizers, episode length) a checkpoint carries."""
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
                "episodes": index[task].get("episodes"),
                **({"perturbation": index[task]["perturbation"]} if "perturbation" in index[task] else {}),
            }
        return specs, tasks

    def export(self, trainer: L.Trainer, module: GatoLightning) -> None:
        if trainer.global_rank != 0 or self.exported == trainer.global_step:
            return
        self.exported = trainer.global_step
        specs, tasks = self.specs_and_tasks()
        save_checkpoint(
            self.out / "checkpoint",
            exported_model(trainer, module),
            TextTokenizer(),
            specs,
            tasks,
            self.meta(trainer, module),
        )

    def meta(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
        """What ``meta.json`` records: data, preset, run settings, compute, time, tokens, losses."""
        assert isinstance(module, GatoLightning)
        seconds = self.seconds()
        metrics = {
            k: round(float(v), 4)
            for k, v in trainer.callback_metrics.items()
            if k.startswith(("train/", "val/", "rollout/"))
            and k != "train/tokens"
            and torch.is_tensor(v)
            and v.numel() == 1
        }
        text = TextTokenizer()
        meta: dict[str, Any] = {
            "step": trainer.global_step,
            # a fine-tune refuses a checkpoint whose tokenizer file was swapped after training
            "tokenizer_sha256": tokenizer_sha256(text),
            "data": self.data.data,
            "preset": module.config.name,
            "parameters": sum(p.numel() for p in module.model.parameters()),
            "training_seconds": round(seconds, 1),
            "tokens": self.tokens,
            "tokens_per_second": round(self.tokens / max(seconds, 1e-9), 1),
            # a folding backbone makes fewer inputs of the same timesteps: compare runs by both
            "timesteps": self.timesteps,
            "timesteps_per_second": round(self.timesteps / max(seconds, 1e-9), 1),
            "settings": self.settings,
            "compute": {
                "accelerator": type(trainer.accelerator).__name__.replace("Accelerator", "").lower(),
                "devices": trainer.num_devices,
                "nodes": trainer.num_nodes,
                "precision": str(trainer.precision),
                "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else _cpu_name(),
                "torch_threads": torch.get_num_threads(),
            },
            "metrics": metrics,
        }
        return meta

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_index: int
    ) -> None:
        self.tokens += int(batch["attention_mask"].sum()) * trainer.world_size
        self.timesteps += count_timesteps(batch) * trainer.world_size
        if self.every and trainer.global_step % self.every == 0:
            assert isinstance(module, GatoLightning)
            self.export(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        assert isinstance(module, GatoLightning)
        self.export(trainer, module)


def _cpu_name() -> str:
    """The CPU model and core count, e.g. ``AMD EPYC 7B13 (2 cores)``."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def _strategy(name: str) -> Any:
    """``ddp`` finds unused parameters: the goal head trains every ``goal_every`` steps and the image
    encoder only on batches with images, so some parameters get no gradient on some steps."""
    if name == "ddp":
        return L.pytorch.strategies.DDPStrategy(find_unused_parameters=True)
    return name


def default_precision() -> str:
    """bf16 mixed precision where the hardware has bf16 units, fp32 otherwise: a GPU that
    supports bf16, or a CPU whose flags list ``avx512_bf16`` or ``amx_bf16`` (bf16 matmul was 2.5x
    fp32 on such an EPYC; on a CPU without them bf16 ran at 1.2 GFLOP/s, ~100x slower than fp32).
    :func:`train` goes further on such a CPU: :func:`probe_precision` times the model itself."""
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if cpu_has_bf16() else "32-true"


#: fp32 is chosen over bf16 autocast on a CPU with bf16 units only when this much faster: on a
#: near tie bf16 wins, because the `cpu` recipe's `debug` model learned BabyAI markedly better in
#: bf16-mixed than in fp32 at the same steps (docs/results.md, "Windows of like length").
FP32_MARGIN = 1.1


def precision_choice(fp32_s: float, bf16_s: float) -> str:
    """``"32-true"`` when fp32 steps are :data:`FP32_MARGIN` times faster than bf16 autocast's,
    else ``"bf16-mixed"``."""
    return "32-true" if fp32_s * FP32_MARGIN < bf16_s else "bf16-mixed"


def probe_precision(config: Config, batches: list[dict[str, Any]], repeats: int = 3) -> dict[str, Any]:
    """Time this model's forward and backward on these real batches in fp32 and in bf16 autocast on
    the CPU, and choose bf16 unless fp32 is clearly faster (:func:`precision_choice`; a few
    seconds). On a CPU with bf16 units the flags alone do not decide: measured on one
    (``benchmarks/train_step.py``), bf16 autocast made `tiny` steps 1.23x faster and `debug`
    steps 1.23x slower (casts cost more than a 64-wide matmul saves); the `cpu` recipe's pooled
    `debug` steps take about the same time in both.

    Returns ``{"choice": "bf16-mixed" | "32-true", "fp32_s": ..., "bf16_s": ...}`` (seconds per
    step, the fastest of ``repeats`` rounds after a warm-up). The global RNG is left as it was.
    """
    from gato_like.model import GatoModel

    if not batches:
        raise ValueError("probe_precision: expected at least one batch")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GatoModel(config)
        seconds = {False: float("inf"), True: float("inf")}
        for round_ in range(repeats + 1):
            for bf16 in (False, True):  # alternating, so drift hits both alike
                start = time.perf_counter()
                for batch in batches:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        loss = model(batch)["loss"]
                    loss.backward()
                model.zero_grad(set_to_none=True)
                if round_:  # the first round warms up
                    seconds[bf16] = min(seconds[bf16], (time.perf_counter() - start) / len(batches))
    return {
        "choice": precision_choice(seconds[False], seconds[True]),
        "fp32_s": round(seconds[False], 5),
        "bf16_s": round(seconds[True], 5),
    }


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU advertises native bf16 arithmetic (``/proc/cpuinfo`` flags)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = next(
        (line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []
    )
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _domain_weights(data: str | Path, c: TrainConfig) -> dict[str, float] | None:
    """The recipe's task weights for the tasks the dataset has, then the given ones (which must all
    exist: checked with the dataset's tasks)."""
    from gato_like.training.recipes import get_recipe

    assert c.recipe is not None  # resolved
    weights = dict(get_recipe(c.recipe).domain_weights)
    if weights:
        from gato_like.data_pipelines.loader import DatasetSource

        present = set(DatasetSource.open(str(data), c.task_names).tasks)
        weights = {k: v for k, v in weights.items() if k in present}
    weights |= dict(c.domain_weights or {})
    return weights or None


def train(
    data: str | Path,
    out: str | Path,
    config: TrainConfig | None = None,
    *,
    callbacks: list[L.Callback] | None = None,
    progress: bool = True,
    command: str | None = None,
    **fields: Any,
) -> Path:
    """Train and return the exported checkpoint directory (``OUT/checkpoint``, or ``OUT/best``).

    ``config``: the settings (default: ``TrainConfig()``, the plain ``base`` recipe); ``fields``
    replace some of them, so ``train(data, out, preset="debug", max_steps=300)`` works too.
    ``callbacks`` are added to the trainer's; ``command`` is recorded in the checkpoint's card.

    ``OUT/lightning/last.ckpt`` holds the trainer state for ``resume`` (written atomically through
    an fsspec transaction, read back with ``weights_only=True``: tensors and plain containers, no
    arbitrary unpickling); ``OUT/logs`` the CSV logs and TensorBoard events (``tensorboard --logdir OUT/logs``). A resumed run
    continues the model, optimizer, schedule, RNG and data stream where the interrupted run stopped,
    and reproduces its losses.

    At every validation the policy is rolled out ``rollout_episodes`` episodes per task (default
    every task with a simulator; ``rollout_tasks`` to choose) and the weights with the best mean
    expert-normalized score are exported to ``OUT/best``, which is returned when it exists. A
    recipe's ``domain_weights`` apply to the tasks the dataset has; given ones must all exist.
    """
    c = replace(config or TrainConfig(), **fields).resolved()
    assert c.preset is not None and c.max_steps is not None and c.batch_size is not None  # resolved
    assert c.lr is not None and c.warmup_steps is not None and c.workers is not None
    assert c.val_every is not None and c.rollout_episodes is not None and c.goal_every is not None
    assert c.batch_tokens is not None and c.discrete_batch_tokens is not None
    precision = c.precision
    if c.rollout_episodes < 0:
        raise ValueError(f"rollout_episodes: expected >= 0, got {c.rollout_episodes}")
    if c.goal_every < 0:
        raise ValueError(f"goal_every: expected a step interval >= 0 (0: never), got {c.goal_every}")
    check_threads(c.threads)
    assert c.ema_decay is not None and c.mix_tasks is not None  # resolved
    averaging = [EMAWeights(c.ema_decay)] if c.ema_decay else []  # (a bad decay refused before any work)
    torch.set_num_threads(c.threads or thread_policy(c.workers))
    L.seed_everything(c.seed, workers=True)
    out = Path(out)
    fields = dict(c.model or {}) | (
        {"context_length": c.context_length} if c.context_length is not None else {}
    )
    model_config = Config.from_name(c.preset, **fields)
    domain_weights = _domain_weights(data, c)
    datamodule = GatoData(data, c.batch_size, model_config.context_length, c.workers, tasks=c.task_names, seed=c.seed,
                          history_steps=model_config.history_steps, batch_tokens=c.batch_tokens,
                          discrete_batch_tokens=c.discrete_batch_tokens,
                          discrete_history_steps=model_config.discrete_history_steps,
                          domain_weights=domain_weights, backbone=model_config.backbone,
                          perceiver_latents=model_config.perceiver_latents, mix_tasks=c.mix_tasks)  # fmt: skip
    check_domain_weights(domain_weights, datamodule.task_names)  # before any work, not when the loader starts
    export = ExportCheckpoint(out, datamodule, c.val_every, {})
    specs, task_entries = export.specs_and_tasks()
    problems = [
        problem
        for name, spec in specs.items()
        if (problem := position_problem(model_config, name, SequenceBuilder(spec).group_sizes()))
    ]
    if problems:  # before any work: the embedding would otherwise clamp the positions it cannot hold
        raise ValueError(
            "; ".join(problems) + "; raise --model.max_local_positions or shrink the observations"
        )
    scored = (
        rollout_tasks_of(task_entries, c.rollout_task_names) if c.rollout_episodes else []
    )  # fails before any work
    probe = None
    if (
        precision is None
        and c.accelerator in ("auto", "cpu")
        and c.strategy == "auto"
        and c.devices in ("auto", 1, "1")  # one process: ranks timing apart could choose apart
        and not torch.cuda.is_available()
        and cpu_has_bf16()
    ):
        # bf16 units on the CPU: measure which precision this model trains faster in, on its own batches
        stream = iter(datamodule._loader(c.seed + 7, workers=0))
        probe = probe_precision(model_config, [next(stream) for _ in range(2)])
        precision = probe["choice"]
        if progress:
            print(f"[precision] this CPU has bf16 units; one step of this model: fp32 {1e3 * probe['fp32_s']:.0f} ms, "
                  f"bf16 autocast {1e3 * probe['bf16_s']:.0f} ms -> {precision}")  # fmt: skip
    module = GatoLightning(
        model_config,
        OptimConfig(
            lr=c.lr,
            warmup_steps=c.warmup_steps,
            max_steps=c.max_steps,
            max_seconds=None if c.max_minutes is None else 60.0 * c.max_minutes,
            goal_every=c.goal_every,
        ),
        datamodule.task_names,
    )
    settings: dict[str, Any] = {
        "max_steps": c.max_steps,
        "batch_size": c.batch_size,
        "accumulate": c.accumulate,
        "context_length": model_config.context_length,
        "lr": c.lr,
        "warmup_steps": c.warmup_steps,
        "clip": c.clip,
        "seed": c.seed,
        "max_minutes": c.max_minutes,
        "overrides": dict(c.model or {}),
        "recipe": c.recipe,
        "batch_tokens": c.batch_tokens,
        "discrete_batch_tokens": c.discrete_batch_tokens,
        "mix_tasks": c.mix_tasks,
        "domain_weights": dict(domain_weights or {}),
        "goal_every": c.goal_every,
        "ema_decay": c.ema_decay,
        "workers": c.workers,
        "torch_threads": torch.get_num_threads(),
        "rollout_episodes": c.rollout_episodes,
    }
    if probe is not None:
        settings["precision_probe"] = probe
    export.settings = settings
    if command:
        settings["command"] = command
    loggers: list[Any] = [
        L.pytorch.loggers.CSVLogger(out, name="logs", version=""),
        L.pytorch.loggers.TensorBoardLogger(out, name="logs", version="tensorboard", default_hp_metric=False),
    ]
    state = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=out / "lightning", save_top_k=0, save_last=True, every_n_train_steps=c.val_every
    )
    end_gap = c.val_every // 20  # a few steps after a validation, its score stands (the callback keeps >= 1)
    rollouts = (
        [
            RolloutScores(
                out,
                task_entries,
                specs,
                scored,
                c.rollout_episodes,
                c.seed,
                meta=export.meta,
                end_gap=end_gap,
            )
        ]
        if scored
        else []
    )
    # the bar draws only on a terminal; to a file or a CI log, a plain line a minute instead
    plain = [PlainProgress()] if progress and not sys.stdout.isatty() else []
    trainer = L.Trainer(
        max_steps=c.max_steps,
        max_epochs=1,  # one endless resampled stream: max_steps (or max_time) ends training
        max_time=None if c.max_minutes is None else timedelta(minutes=c.max_minutes),
        accelerator=c.accelerator,
        devices=c.devices,
        strategy=_strategy(c.strategy),
        precision=precision or default_precision(),  # type: ignore[arg-type]
        accumulate_grad_batches=c.accumulate,
        gradient_clip_val=c.clip,
        val_check_interval=c.val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=c.val_batches,
        num_sanity_val_steps=0,
        logger=loggers,
        # the average first: it takes each step before the exports and rollouts of that step read it
        callbacks=[*averaging, state, export, *rollouts, *plain, *(callbacks or [])],
        enable_progress_bar=progress and not plain,
        log_every_n_steps=c.log_every,
    )
    last = out / "lightning" / "last.ckpt"
    if c.resume and not last.exists():
        raise FileNotFoundError(
            f"--resume: no trainer state at {last} (expected a run started with --out {out})"
        )
    if c.resume and (out / "checkpoint" / CONFIG_FILE).is_file():
        # the weights were trained with the run's own config: a changed preset default (e.g.
        # dynamics_target) or override would silently switch the objective halfway
        before = Config.from_checkpoint(out / "checkpoint").to_dict()
        now = model_config.to_dict()
        changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        if changed:
            flags = " ".join(f"--model.{k} {before.get(k)}" for k in changed)
            raise ValueError(
                f"--resume: the model config differs from the run's ({out / 'checkpoint' / CONFIG_FILE}) in "
                + ", ".join(f"{k}: {before.get(k)!r} there, {now.get(k)!r} now" for k in changed)
                + f"; resume with {flags}"
            )
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if c.resume else None, weights_only=True)
    if trainer.global_rank == 0 and (out / "logs" / "metrics.csv").is_file():
        plot_losses(out / "logs" / "metrics.csv", out / "losses.png")
    if trainer.global_rank == 0 and rollouts and rollouts[0].history:
        plot_scores(rollouts[0].history, out / "scores.png")
    if (out / "best").is_dir() and scored:
        return out / "best"
    return out / "checkpoint"


def thread_policy(workers: int) -> int:
    """Torch intra-op threads for training: the cores left after the data-loader workers (at
    least one). On 2 cores with one loader worker, 2 intra-op threads wait on a descheduled
    OpenMP thread at every small op; 1 thread beside the worker is faster (docs/training.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - workers)


def plot_losses(
    metrics: Path,
    path: Path,
    keys: tuple[str, ...] = ("train/policy_loss", "train/dynamics_loss", "val/loss"),
) -> Path:
    """Training and validation loss curves (``keys``; ``val/*`` drawn with markers) from
    Lightning's ``metrics.csv`` to a PNG."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics, newline="") as handle:
        rows = list(csv.DictReader(handle))
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for key in keys:
        style = "o-" if key.startswith("val/") else "-"
        points = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
        if points:
            axis.plot(*zip(*points, strict=True), style, label=key, linewidth=1, markersize=3)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("cross-entropy (nats/token)")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
