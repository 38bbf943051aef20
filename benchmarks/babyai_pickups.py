"""How a policy fails BabyAI's PickupLoc ("pick up the red ball on your left"): on the evaluation's
unseen episodes (the seeds of ``gato-like eval``), each failed episode is sorted by what the agent
carries when it times out: nothing (it never picked up), an object of the mission's type and
colour but not at the place the mission names, or another object. A checkpoint and, with
``--mlp_seconds``, the per-task MLP reference of ``benchmarks/mlp_reference.py`` on ``--data``
are run on the same episodes, so the two failure profiles sit side by side.

    .venv/bin/python benchmarks/babyai_pickups.py --ckpt runs/cpu70/best --data data/suite60s \\
        --mlp_seconds 120 --episodes 100 --seed 20

Non-strict PickupLoc does not end an episode on a wrong pickup, so the object carried at the end
is what the agent chose last. The level's environment is read after the episode through
``gymnasium.make``, wrapped here to keep a handle on it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

TASK = "babyai-PickupLoc"
KINDS = [
    "success",
    "carrying nothing",
    "right type and colour, wrong place",
    "another object: the mission's type",
    "another object: the mission's colour",
    "another object: neither",
]


@contextlib.contextmanager
def kept_environments() -> Iterator[list[Any]]:
    """Every environment ``gymnasium.make`` builds inside the block, in order."""
    import gymnasium

    made: list[Any] = []
    original = gymnasium.make

    def make(*args: Any, **kwargs: Any) -> Any:
        made.append(original(*args, **kwargs))
        return made[-1]

    gymnasium.make = make
    try:
        yield made
    finally:
        gymnasium.make = original


def profile(actor: Callable[[dict[str, Any]], Any], episodes: int, seed: int, reset: Callable[[], None]) -> collections.Counter[str]:  # fmt: skip
    """Counts of ``KINDS`` over ``episodes`` unseen episodes of PickupLoc driven by ``actor``."""
    from gato_like.envs.registry import get_task
    from gato_like.training.evaluate import eval_seed

    task, counts = get_task(TASK), collections.Counter[str]()
    with kept_environments() as made:
        for i in range(episodes):
            reset()
            played = task.rollout(eval_seed(TASK, seed, i), actor, render=False)
            env = made[-1].unwrapped
            wanted, carried = env.instrs.desc, env.carrying
            if played.success:
                counts[KINDS[0]] += 1
            elif carried is None:
                counts[KINDS[1]] += 1
            elif carried.type == wanted.type and wanted.color in (None, carried.color):
                counts[KINDS[2]] += 1
            elif carried.type == wanted.type:
                counts[KINDS[3]] += 1
            elif carried.color == wanted.color:
                counts[KINDS[4]] += 1
            else:
                counts[KINDS[5]] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", default=None, help="a checkpoint directory (e.g. runs/cpu70/best)")
    parser.add_argument("--data", default=None, help="the dataset the MLP reference trains on")
    parser.add_argument("--mlp_seconds", type=float, default=0.0, help="0: no MLP row")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument(
        "--seed", type=int, default=0, help="the evaluation's seed (as gato-like eval --seed)"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.mlp_seconds and not args.data:
        parser.error("--mlp_seconds needs --data (the dataset the MLP trains on)")
    if not args.ckpt and not args.mlp_seconds:
        parser.error("give --ckpt, --mlp_seconds with --data, or both")
    torch.set_num_threads(args.threads)

    rows: dict[str, collections.Counter[str]] = {}
    if args.ckpt:
        from gato_like.policy import Policy

        policy = Policy.from_checkpoint(args.ckpt)
        keys = frozenset(policy.checkpoint.spec_for(TASK).observations)
        rows[args.ckpt] = profile(
            lambda o: policy.act({k: v for k, v in o.items() if k in keys}),
            args.episodes,
            args.seed,
            lambda: policy.reset(TASK),
        )
    if args.mlp_seconds:
        sys.path.insert(0, str(Path(__file__).parent))
        from mlp_reference import fit

        _, _, actor, steps = fit(TASK, args.data, args.mlp_seconds, args.seed)
        rows[f"MLP, {args.mlp_seconds:.0f} s ({steps} steps)"] = profile(
            actor, args.episodes, args.seed, lambda: None
        )
    print(f"{TASK}, {args.episodes} episodes (--seed {args.seed})")
    print(f"{'':40s}" + "".join(f"{k:>36s}" for k in KINDS))
    for name, counts in rows.items():
        print(f"{name[:40]:40s}" + "".join(f"{counts[k]:36d}" for k in KINDS))


if __name__ == "__main__":
    main()
