"""What a pooled BabyAI training step costs, and what the three changes that made it cheap are
worth, side by side in one run: the loader's batches (one decode per ~4 one-timestep windows, as
before, against one window per timestep of each decoded episode) and the model's step (the fold's
MLP on every token against once per distinct token; every dynamics target against at most 512),
at the `cpu` recipe's BabyAI batch budget and at the old one.

    .venv/bin/python benchmarks/pooled_step.py --data data/suite60h --task babyai-GoToLocal

Each model row does the same optimizer steps on the same batches from the same weights (the
`cpu` recipe's model, bf16 autocast where the CPU has bf16 units), the fastest of ``--repeats``
runs, rows alternating; each loader row times ``--batches`` batches after 10 warm-up batches.
Run it alone: a benchmark beside a training run measures neither.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from gato_like.config import Config
from gato_like.data_pipelines import loader as loader_module
from gato_like.model import GatoModel
from gato_like.training.data import GatoData
from gato_like.training.recipes import get_recipe
from gato_like.training.train import cpu_has_bf16


def batches_of(
    args: argparse.Namespace, config: Config, budget: int, old_windows: bool
) -> tuple[list[dict], float]:
    """``args.batches`` batches of ``args.task`` at a ``budget``-token budget and the loader's
    seconds per batch; ``old_windows``: one decode per 4 windows' worth of timesteps (as before)."""
    original = loader_module.WindowSampler.windows_per_episode

    def old(self: Any, task: str, bounds: Any) -> int:
        history = self.history(task)
        return (
            max(1, min(64, (len(bounds) - 1) // (4 * history))) if history else original(self, task, bounds)
        )

    if old_windows:
        loader_module.WindowSampler.windows_per_episode = old  # type: ignore[method-assign]
    try:
        data = GatoData(args.data, 1024, config.context_length, 0, tasks=[args.task], seed=0,
                        history_steps=config.history_steps, discrete_history_steps=config.discrete_history_steps,
                        batch_tokens=budget, backbone=config.backbone)  # fmt: skip
        stream = iter(data._loader(0))
        for _ in range(10):
            next(stream)
        start = time.perf_counter()
        batches = [next(stream) for _ in range(args.batches)]
        return batches, (time.perf_counter() - start) / args.batches
    finally:
        loader_module.WindowSampler.windows_per_episode = original  # type: ignore[method-assign]


def model_seconds(config: Config, batches: list[dict], bf16: bool, distinct: bool) -> float:
    """Seconds per optimizer step over ``batches`` from fresh weights (seed 0), after 3 warm-up
    steps; ``distinct``: the fold's MLP once per distinct token (else on every token)."""
    torch.manual_seed(0)
    model = GatoModel(config)
    if not distinct:
        model.pool_keys = lambda *args, **kwargs: None  # type: ignore[method-assign]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for i, batch in enumerate(batches[:3] + batches):
        if i == 3:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True)
    parser.add_argument("--task", default="babyai-GoToLocal")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="the fastest of this many runs per model row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = get_recipe("cpu")
    config = Config.from_name(recipe.preset, **recipe.model)
    uncapped = Config.from_name(recipe.preset, **(recipe.model | {"dynamics_max_targets": 0}))
    bf16 = cpu_has_bf16()
    print(f"{args.task} of {args.data}, the cpu recipe's model, {'bf16 autocast' if bf16 else 'fp32'}, "
          f"{args.threads} threads")  # fmt: skip
    print(f"{'budget':>7s} {'windows':>7s} {'loader, before':>15s} {'loader, now':>12s} {'model, before':>14s} "
          f"{'distinct':>9s} {'+ capped':>9s} {'step before':>12s} {'step now':>9s} {'windows/s before':>17s} {'now':>6s}")  # fmt: skip
    for budget in (recipe.batch_tokens, recipe.discrete_batch_tokens):
        _, loader_before = batches_of(args, config, budget, old_windows=True)
        batches, loader_now = batches_of(args, config, budget, old_windows=False)
        windows = sum(len(b["ids"]) for b in batches) / len(batches)
        rows = {"before": (uncapped, False), "distinct": (uncapped, True), "capped": (config, True)}
        seconds: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, (cfg, distinct) in rows.items():
                seconds[name] = min(
                    seconds.get(name, float("inf")), model_seconds(cfg, batches, bf16, distinct)
                )
        before, now = loader_before + seconds["before"], loader_now + seconds["capped"]
        print(f"{budget:7d} {windows:7.1f} {loader_before * 1e3:12.1f} ms {loader_now * 1e3:9.1f} ms "
              f"{seconds['before'] * 1e3:11.1f} ms {seconds['distinct'] * 1e3:6.1f} ms {seconds['capped'] * 1e3:6.1f} ms "
              f"{before * 1e3:9.1f} ms {now * 1e3:6.1f} ms {windows / before:17.0f} {windows / now:6.0f}  "
              f"({before / now:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
