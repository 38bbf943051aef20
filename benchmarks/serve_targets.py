"""The serving targets, measured end to end through `gato-like serve` on loopback, in one run.

    .venv/bin/python benchmarks/serve_targets.py [--duration 10] [--threads 1 2] [--out runs/serve_targets]

Checkpoints: an untrained ``tiny`` with the CPU recipes' acting settings (``history_steps=2``,
actions masked) on cartpole's spec, with 64x64 pixels (Gato's ResNet patch encoder and the
``strided`` one) and without (latency does not depend on the weights). For each server thread
count, every case is one ``gato-like bench serve`` sweep (a fresh server subprocess; the robots
are asyncio clients in this process, on the same cores, measured from each step's scheduled
send): batched (dynamic batching) beside unbatched (``--max_batch 1``, one request per forward
pass, as openpi serves).

| case | target |
|---|---|
| pixels, 1 robot | p50 <= 7 ms per step |
| proprio, 32 robots at 20 Hz | p99 <= 25 ms, no missed deadline |
| pixels, 16 robots at 20 Hz | p99 <= 50 ms |

Writes ``OUT/serve_targets.json`` and one ``serve_load.json``/``.png`` per case. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from acting_speed import save_untrained

from gato_like.serving.loadgen import LoadConfig, sweep

CASES = [  # name, body with pixels, encoder, robots, target
    ("pixels-1", True, "resnet", 1, {"p50": 7.0}),
    ("pixels-1", True, "strided", 1, {"p50": 7.0}),
    ("proprio-32", False, "resnet", 32, {"p99": 25.0, "missed": 0}),
    ("pixels-16", True, "resnet", 16, {"p99": 50.0}),
    ("pixels-16", True, "strided", 16, {"p99": 50.0}),
]


def checkpoints(directory: Path) -> dict[tuple[bool, str], Path]:
    return {(pixels, encoder): save_untrained(directory, pixels, encoder) for pixels, encoder in {(c[1], c[2]) for c in CASES}}  # fmt: skip


def verdict(row: dict[str, Any], target: dict[str, float]) -> bool:
    lat = row["latency_ms"]
    ok = all(lat[k] is not None and lat[k] <= v for k, v in target.items() if k in ("p50", "p99"))
    return ok and ("missed" not in target or row["missed_deadlines"] <= target["missed"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--hz", type=float, default=20.0)
    parser.add_argument("--unbatched", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default="runs/serve_targets")
    args = parser.parse_args()
    out = Path(args.out)
    paths = checkpoints(out / "checkpoints")
    rows = []
    for threads in args.threads:
        for name, pixels, encoder, robots, target in CASES:
            load = LoadConfig(sessions=[robots], hz=args.hz, duration=args.duration, unbatched=args.unbatched, threads=threads)  # fmt: skip
            report = sweep(paths[(pixels, encoder)], out / f"{name}-{encoder}-t{threads}", load)
            for row in report["results"]:
                rows.append({"case": name, "encoder": encoder if pixels else "-", "threads": threads,
                             "mode": row["mode"], "robots": robots, "latency_ms": row["latency_ms"],
                             "missed": row["missed_deadlines"], "scheduled": row["scheduled"],
                             "steps_per_s": row["throughput_steps_per_s"], "mean_batch": row["mean_batch_size"],
                             "target": target, "met": verdict(row, target)})  # fmt: skip
    (out / "serve_targets.json").write_text(json.dumps({"cpu_count": os.cpu_count(), "rows": rows}, indent=1))
    print(f"\n{os.cpu_count()} cores, {args.hz:g} Hz per robot, {args.duration:g} s per case")
    print(
        "| case | encoder | threads | mode | p50 ms | p99 ms | missed | steps/s | mean batch | target | met |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lat = r["latency_ms"]
        goal = ", ".join(f"{k} <= {v:g}" for k, v in r["target"].items())
        print(f"| {r['case']} | {r['encoder']} | {r['threads']} | {r['mode']} | {lat['p50']} | {lat['p99']} | "
              f"{r['missed']}/{r['scheduled']} | {r['steps_per_s']} | {r['mean_batch']} | {goal} | {'yes' if r['met'] else 'no'} |")  # fmt: skip


if __name__ == "__main__":
    main()
