"""The training loader's task batches per second, side by side in one run, on the same batches:
windows tokenized in one pass per decoded episode (the loader) against one tokenizer call per
window and per goal (the loader before; kept here as the reference). The loader settings are the
``cpu`` recipe's (pooled timesteps, histories of 2 and 1, 4096 and 16384 tokens a batch).

    .venv/bin/python benchmarks/loader_batches.py --data data/suite60h [--batches 300] [--repeats 3]

The loader runs in the training process (the recipes' ``workers = 0``), so every second it takes
is a second the model does not train; compare its seconds per batch with a training step's
(``benchmarks/train_step.py``). Both rows yield identical batches (checked here, and by
``tests/test_loader.py``)."""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from gato_like.data_pipelines.loader import LoaderConfig, WindowSampler, make_dataloader
from gato_like.tokenizers import TokenSequence
from gato_like.training.data import GatoData

ONE_PASS = WindowSampler.episode_samples


def per_window(self: WindowSampler, episode: Any, bounds: Any, rng: Any, pool: Any, count: int,
               candidates: bool = True) -> tuple[list[dict[str, Any]], list[TokenSequence]]:  # fmt: skip
    """The same draws, each window, goal and prompt candidate tokenized on its own."""
    plans, spans, chosen = self.plan(episode, bounds, rng, pool, count, candidates)
    tokenized = [self._build(episode, np.arange(a, b)) for a, b in spans]
    return self.assemble(episode, plans, tokenized, chosen)


def run(data: GatoData, batches: int) -> tuple[float, list[dict[str, Any]]]:
    config = LoaderConfig(
        context_length=data.context_length, backbone=data.backbone, history_steps=data.history_steps,
        discrete_history_steps=data.discrete_history_steps, task_batches=True, batch_tokens=data.batch_tokens,
        discrete_batch_tokens=data.discrete_batch_tokens,
    )  # fmt: skip
    stream = iter(make_dataloader(data.data, data.batch_size, config, num_workers=0))
    kept = [next(stream) for _ in range(4)]  # warm-up: shard opening, first shuffle buffers
    start = time.perf_counter()
    kept += [next(stream) for _ in range(batches)]
    return time.perf_counter() - start, kept


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3, help="the fastest of this many runs per row")
    args = parser.parse_args()
    data = GatoData(args.data, 1024, 256, 0, seed=0, history_steps=2, discrete_history_steps=1, batch_tokens=4096,
                    discrete_batch_tokens=16384, backbone="pooled")  # fmt: skip
    rows = {"one tokenizer call per window (before)": per_window, "one pass per decoded episode": ONE_PASS}
    seconds: dict[str, float] = {}
    outputs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.repeats):  # alternate, so drift on a shared machine hits every row alike
        for name, method in rows.items():
            WindowSampler.episode_samples = method  # type: ignore[method-assign]
            took, outputs[name] = run(data, args.batches)
            seconds[name] = min(seconds.get(name, float("inf")), took)
    WindowSampler.episode_samples = ONE_PASS  # type: ignore[method-assign]
    first, *others = outputs.values()
    same = all(
        a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a if k != "episode")
        for other in others
        for a, b in zip(first, other, strict=True)
    )
    print(f"{args.batches} task batches of {args.data} (the cpu recipe's loader settings), in this process; "
          f"identical batches: {same}")  # fmt: skip
    base = next(iter(seconds.values()))
    print(f"{'loader':48s} {'batches/s':>9s} {'s/batch':>8s} {'speed-up':>8s}")
    for name, s in seconds.items():
        print(f"{name:48s} {args.batches / s:9.2f} {s / args.batches:8.3f} {base / s:7.2f}x")


if __name__ == "__main__":
    main()
