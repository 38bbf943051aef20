"""Load test of the policy server: N simulated robots at a fixed rate, batched against unbatched.

    .venv/bin/python benchmarks/serve_load.py --ckpt RUN/checkpoint [--sessions 1 4 16 32 64]
        [--hz 20] [--duration 10] [--task dmc-point_mass-easy] [--out runs/serve_bench]

Same as ``gato-like bench serve``: for each mode a ``gato-like serve`` subprocess is launched
(``batched``: dynamic batching up to 64 steps per forward pass; ``unbatched``: ``--max-batch 1``,
one request per forward pass), then N robots (one WebSocket session each, in this process) send a
step every 1/hz seconds with phases spread over the period. Latency is measured from each step's
scheduled send time; p50/p90/p99/max, missed deadlines (reply later than one period) and
throughput go to ``serve_load.json``, the curves to ``serve_load.png``.
"""

from __future__ import annotations

import argparse

from gato_like.serving.loadgen import LoadConfig, sweep


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", help="checkpoint directory (servers are launched)")
    parser.add_argument("--url", help="a running server instead (one mode: as it is configured)")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    parser.add_argument("--hz", type=float, default=20.0)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per robot count")
    parser.add_argument("--task", default=None, help="task or embodiment (default: the first embodiment)")
    parser.add_argument("--unbatched", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default="runs/serve_bench")
    parser.add_argument("--token", default=None)
    args = parser.parse_args()
    sweep(
        args.ckpt,
        args.out,
        LoadConfig(args.sessions, args.hz, args.duration, args.task, args.unbatched, args.url, args.token),
    )


if __name__ == "__main__":
    main()
