"""The dynamics head, measured: open-loop error of predicted proprioception against copying the
last state.

    .venv/bin/python benchmarks/dynamics.py --ckpt runs/base/checkpoint --data data/heldout-episodes \\
        --horizons 1,10 --starts 40 --out runs/dynamics.json

For every task of ``--data`` (episodes the checkpoint never trained on: generate them with another
``--seed``), ``--starts`` start points t are drawn across the episodes. ``Policy.rollout`` gets the
observation at t and the actions executed at t..t+k-1 (a perturbed rollout records them apart from
its expert labels; older datasets have the labels only) and predicts the proprioception at t+1..t+k
with the dynamics head alone (open loop: its own predictions are fed back). The baseline copies
the observation at t. Error: root mean square over every proprioceptive value at step k, in the
observation's own units; the ratio is model / baseline (below 1 beats copying).

With ``--mlp_data`` (the episodes the checkpoint trained on), a plain reference is rolled out from
the same starts: a 2-layer MLP from (proprioception, executed action) floats to the change of the
proprioception, trained for ``--mlp_seconds``, so a reader sees what the data allows.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import numpy as np


def mlp_dynamics(root: Path, task: str, keys: list[str], seconds: float, seed: int = 0) -> Any:
    """A plain dynamics reference: ``step(state (F,), action (A,)) -> next state (F,)``, the
    proprio ``keys`` concatenated; an MLP on normalized inputs predicts the normalized change."""
    import sys

    import torch
    from torch import nn

    sys.path.insert(0, str(Path(__file__).parent))
    from mlp_reference import train_mlp

    from gato_like.data_pipelines.shards import iter_task

    torch.manual_seed(seed)
    xs, ys = [], []
    for episode in iter_task(root, task):
        state = np.concatenate([episode.observations[k].reshape(episode.length, -1) for k in keys], 1)
        taken = episode.actions if episode.executed_actions is None else episode.executed_actions
        action = np.asarray(taken, np.float32).reshape(episode.length, -1)
        xs.append(np.concatenate([state[:-1], action[:-1]], 1))
        ys.append(state[1:] - state[:-1])
    x, y = torch.from_numpy(np.concatenate(xs)).float(), torch.from_numpy(np.concatenate(ys)).float()
    x_mean, x_std, y_std = x.mean(0), x.std(0) + 1e-6, y.std(0) + 1e-6
    net, _ = train_mlp((x - x_mean) / x_std, y / y_std, y.shape[1], seconds, nn.functional.mse_loss)

    def step(state: np.ndarray, action: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.concatenate([state, np.asarray(action, np.float32).reshape(-1)])).float()
        with torch.no_grad():
            return state + (net(((v - x_mean) / x_std)[None])[0] * y_std).numpy()

    return step


def measure(ckpt: Path, data: Path, horizons: list[int], starts: int, seed: int = 0, tasks: list[str] | None = None, decode: str = "median", mlp_data: Path | None = None, mlp_seconds: float = 30.0) -> dict[str, Any]:  # fmt: skip
    from gato_like.data_pipelines.shards import iter_task, read_index
    from gato_like.policy import Policy

    policy = Policy.from_checkpoint(ckpt)
    index = read_index(data)
    longest = max(horizons)
    results: dict[str, Any] = {}
    for task in tasks or sorted(index["tasks"]):
        spec = policy.checkpoint.spec_for(task)
        keys = [k for k, o in sorted(spec.observations.items()) if o.kind == "proprio"]
        episodes = list(iter_task(data, task))
        rng = random.Random(seed)
        reference = mlp_dynamics(mlp_data, task, keys, mlp_seconds, seed) if mlp_data else None
        mlp_sq = {k: [] for k in horizons}  # type: dict[int, list[float]]
        model_sq = {k: [] for k in horizons}  # type: dict[int, list[float]]
        copy_sq = {k: [] for k in horizons}  # type: dict[int, list[float]]
        for _ in range(starts):
            episode = rng.choice(episodes)
            t = rng.randrange(0, episode.length - longest)
            observation = {k: v[t] for k, v in episode.observations.items() if k in spec.observations}
            policy.reset(task)
            # the actions that produced the recorded states: the executed ones where a perturbed
            # rollout recorded them apart from its labels
            taken = episode.actions if episode.executed_actions is None else episode.executed_actions
            predicted = policy.rollout(observation, taken[t : t + longest], decode=decode)
            if reference is not None:
                state, states = np.concatenate([episode.observations[key][t].ravel() for key in keys]), []
                for action in taken[t : t + longest]:
                    state = reference(state, action)
                    states.append(state)
            for k in horizons:
                truth = np.concatenate([episode.observations[key][t + k].ravel() for key in keys])
                if reference is not None:
                    mlp_sq[k].append(float(np.mean((states[k - 1] - truth) ** 2)))
                guess = np.concatenate([predicted[k - 1][key].ravel() for key in keys])
                last = np.concatenate([episode.observations[key][t].ravel() for key in keys])
                model_sq[k].append(float(np.mean((guess - truth) ** 2)))
                copy_sq[k].append(float(np.mean((last - truth) ** 2)))
        results[task] = {
            str(k): {
                "model_rmse": round(float(np.sqrt(np.mean(model_sq[k]))), 5),
                "copy_last_rmse": round(float(np.sqrt(np.mean(copy_sq[k]))), 5),
                "ratio": round(float(np.sqrt(np.mean(model_sq[k]) / max(np.mean(copy_sq[k]), 1e-12))), 3),
            }
            | (
                {"mlp_ratio": round(float(np.sqrt(np.mean(mlp_sq[k]) / max(np.mean(copy_sq[k]), 1e-12))), 3)}
                if reference is not None
                else {}
            )
            for k in horizons
        }
        print(task, json.dumps(results[task]), flush=True)
    return {"checkpoint": str(ckpt), "data": str(data), "starts": starts, "decode": decode, "mlp_data": str(mlp_data) if mlp_data else None, "tasks": results}  # fmt: skip


def table(summary: dict[str, Any], horizons: list[int]) -> str:
    head = " | ".join(f"{k}-step RMSE model / copy-last (ratio)" for k in horizons)
    lines = [f"| task | {head} |", "|---|" + "---|" * len(horizons)]
    for task, r in summary["tasks"].items():
        cells = [f"{r[str(k)]['model_rmse']:.4f} / {r[str(k)]['copy_last_rmse']:.4f} ({r[str(k)]['ratio']:.2f}×)" + (f"; MLP {r[str(k)]['mlp_ratio']:.2f}×" if "mlp_ratio" in r[str(k)] else "") for k in horizons]  # fmt: skip
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="held-out episodes (a dataset folder)")
    parser.add_argument("--horizons", default="1,10")
    parser.add_argument("--starts", type=int, default=40, help="start points per task")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks (default: all of --data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decode", default="median", help="median, mean or argmax (Policy.rollout)")
    parser.add_argument("--mlp_data", type=Path, default=None, help="training episodes for the MLP reference")
    parser.add_argument("--mlp_seconds", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = parser.parse_args()
    horizons = [int(k) for k in args.horizons.split(",")]
    tasks = args.tasks.split(",") if args.tasks else None
    summary = measure(args.ckpt, args.data, horizons, args.starts, args.seed, tasks, args.decode, args.mlp_data, args.mlp_seconds)  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(table(summary, horizons))


if __name__ == "__main__":
    main()
