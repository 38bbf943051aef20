"""Generation speed and loader throughput, side by side in one run.

    .venv/bin/python benchmarks/data_throughput.py [--dataset data/default] [--batches 40]

Generation: the five control tasks with 64x64 rendering, 1 process vs 2 (episodes/s, frames/s).
Loader: tokens/s (padding excluded) of padded batches with 0 and 2 workers, context 1024, batch 8,
from --dataset (default: a small dataset generated here). The training preset's consumption is
printed beside it by the training benchmark once the model exists.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from gato_like.data_pipelines.generate import generate
from gato_like.data_pipelines.loader import LoaderConfig, make_dataloader
from gato_like.envs.registry import SUITES


def generation(workers: int, root: Path, episodes: int, steps: int) -> tuple[float, float]:
    index = generate(root, tasks=list(SUITES["control"]), episodes=episodes, max_steps=steps, normalizer_episodes=1,
                     workers=workers, overwrite=True, progress=False)  # fmt: skip
    seconds = index["timing"]["seconds"]
    total = sum(t["episodes"] for t in index["tasks"].values())
    return total / seconds, index["timing"]["rendered_frames"] / seconds


def loader_tokens_per_second(root: Path, workers: int, batches: int) -> float:
    loader = make_dataloader(
        root, batch_size=8, config=LoaderConfig(context_length=1024), num_workers=workers
    )
    iterator = iter(loader)
    for _ in range(5):  # warm up: worker start, shuffle buffers
        next(iterator)
    tokens, start = 0, time.perf_counter()
    for _ in range(batches):
        tokens += int(next(iterator)["attention_mask"].sum())
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset", type=Path, default=None, help="dataset for the loader (default: generated here)"
    )
    parser.add_argument(
        "--episodes", type=int, default=4, help="episodes per control task for the generation timing"
    )
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batches", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print("generation (5 control tasks, 64x64 RGB):")
        rates = {}
        for workers in (1, 2):
            rates[workers] = generation(workers, Path(tmp) / f"gen{workers}", args.episodes, args.steps)
            print(
                f"  {workers} process(es): {rates[workers][0]:.2f} episodes/s, {rates[workers][1]:,.0f} frames/s"
            )
        print(f"  2 vs 1 process: {rates[2][1] / rates[1][1]:.2f}x")
        root = args.dataset or Path(tmp) / "gen2"
        print(f"loader ({root}, context 1024, batch 8):")
        speeds = {w: loader_tokens_per_second(root, w, args.batches) for w in (0, 2)}
        for workers, speed in speeds.items():
            print(f"  {workers} workers: {speed:,.0f} tokens/s")
        print(f"  2 workers vs in-process: {speeds[2] / speeds[0]:.2f}x")


if __name__ == "__main__":
    main()
