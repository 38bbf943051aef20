"""Where an acting step's time goes: the acting core alone (no network), side by side in one run.

    .venv/bin/python benchmarks/acting_speed.py [--rows 1 16 32] [--threads 1 2] [--profile]

For the ``tiny`` preset with the CPU recipes' acting settings (``history_steps=2``, actions
masked), on cartpole's spec with 64x64 pixels (Gato's ResNet patch encoder, and the ``strided``
option) and without them, it times one :meth:`ActingCore.act` tick for N robots at once (one row
each), with the given intra-op thread counts. Weights are untrained: the time does not depend on
them. ``--profile`` prints torch's operator table for the largest pixel tick of each encoder.
Run it alone on the machine: anything beside it is measured too.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from gato_like.acting import ActingCore
from gato_like.checkpoint import save_checkpoint
from gato_like.config import Config
from gato_like.envs.registry import get_task
from gato_like.model import GatoModel
from gato_like.serving.protocol import example_observation
from gato_like.tokenizers import EmbodimentSpec, TextTokenizer
from gato_like.training.recipes import ACTING

TASK = "dmc-cartpole-balance"


def body(pixels: bool) -> EmbodimentSpec:
    """Cartpole's embodiment spec, with its 64x64 camera or proprioception only."""
    spec = get_task(TASK).spec.to_dict()
    if not pixels:
        spec["observations"].pop("pixels")
        spec["name"] += "-proprio"
    return EmbodimentSpec.from_dict(spec)


def make_model(encoder: str = "resnet", preset: str = "tiny") -> GatoModel:
    torch.manual_seed(0)
    return GatoModel(Config.from_name(preset, image_encoder=encoder, **ACTING)).eval()


def save_untrained(directory: Path, pixels: bool, encoder: str = "resnet") -> Path:
    """An untrained ``tiny`` (acting settings) on cartpole's body as a checkpoint, for serving
    benchmarks (latency does not depend on the weights)."""
    spec = body(pixels)
    name = f"{'pixels' if pixels else 'proprio'}-{encoder}"
    return save_checkpoint(directory / name, make_model(encoder), TextTokenizer(), {spec.name: spec}, {})


def tick_ms(model: GatoModel, spec: EmbodimentSpec, rows: int, repeats: int = 40) -> list[float]:
    """Milliseconds of one act() tick for ``rows`` robots, ``repeats`` times (after a warm-up)."""
    core = ActingCore(model, TextTokenizer())
    acting = [core.allocate() for _ in range(rows)]
    core.reset([(row, spec, None, None) for row in acting])
    rng = np.random.default_rng(0)
    observations = [[example_observation(spec.to_dict(), rng) for _ in acting] for _ in range(4)]
    for k in range(5):
        core.act(list(zip(acting, observations[k % 4], strict=True)))
    times = []
    for k in range(repeats):
        start = time.perf_counter()
        core.act(list(zip(acting, observations[k % 4], strict=True)))
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args()
    cases = [("proprio", "resnet", False), ("pixels", "resnet", True), ("pixels", "strided", True)]
    models = {encoder: make_model(encoder) for _, encoder, _ in cases}
    results = []
    print(f"tiny, history_steps=2, cartpole; {os.cpu_count()} cores; ms per tick (p50 / p90)")
    print(f"{'body':8} {'encoder':8} {'threads':>7} " + " ".join(f"{f'{n} robots':>16}" for n in args.rows))
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, encoder, pixels in cases:
            cells = []
            for rows in args.rows:
                times = tick_ms(models[encoder], body(pixels), rows, args.repeats)
                p50, p90 = float(np.percentile(times, 50)), float(np.percentile(times, 90))
                results.append({"body": name, "encoder": encoder, "threads": threads, "robots": rows, "p50_ms": round(p50, 2), "p90_ms": round(p90, 2)})  # fmt: skip
                cells.append(f"{p50:7.2f} / {p90:6.2f}")
            label = encoder if pixels else "-"
            print(f"{name:8} {label:8} {threads:>7} " + " ".join(f"{c:>16}" for c in cells))
    if args.profile:
        from torch.profiler import profile

        torch.set_num_threads(1)
        for encoder in ("resnet", "strided"):
            with profile() as prof:
                tick_ms(models[encoder], body(True), max(args.rows), 10)
            print(f"\npixels, {encoder}, {max(args.rows)} robots, 1 thread (15 ticks):")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu_count": os.cpu_count(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
