"""A plain behaviour-cloning reference on the same data: one 2-layer MLP (256 units) per task,
trained for ``--seconds`` on the dataset's (observation, expert action) pairs, rolled out in the
same simulators on the same unseen seeds and scored with the same normalizers as ``gato-like eval``.
It shows how far the tokenized transformer is from what the data allows.

    .venv/bin/python benchmarks/mlp_reference.py --data data/control --seconds 60 --episodes 10

Inputs: proprio keys as floats; discrete keys one-hot; text (BabyAI's mission) as a bag of its
SentencePiece ids. Continuous actions: MSE on the actions scaled to [-1, 1], tanh output; discrete
actions: cross-entropy. Writes ``OUT/mlp_reference.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


class Features:
    """Observation dict -> float vector ``(F,)``, from an embodiment spec."""

    def __init__(self, spec: Any) -> None:
        from gato_like.tokenizers import TextTokenizer

        self.spec, self.text = spec, TextTokenizer()
        self.keys = sorted(k for k, o in spec.observations.items() if o.kind != "image")

    def __call__(self, observation: dict[str, Any]) -> np.ndarray:
        parts = []
        for key in self.keys:
            o = self.spec.observations[key]
            value = observation[key]
            if o.kind == "proprio":
                parts.append(np.asarray(value, np.float32).reshape(-1))
            elif o.kind == "discrete":
                flat = np.asarray(value, np.int64).reshape(-1)
                parts.append(np.eye(o.num_values, dtype=np.float32)[flat].reshape(-1))
            elif o.kind == "text":
                bag = np.zeros(self.text.vocab_size, np.float32)
                np.add.at(bag, self.text.encode(str(value)), 1.0)
                parts.append(bag)
        return np.concatenate(parts)


def train_mlp(
    x: torch.Tensor,
    y: torch.Tensor,
    out_dim: int,
    seconds: float,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    max_steps: int | None = None,
) -> tuple[nn.Module, int]:
    """The references' network: a 2-layer MLP (256 units) from ``x`` (N, F) to ``out_dim``
    outputs, Adam (1e-3) on batches of 256 rows of ``loss(prediction, y[rows])`` for ``seconds``,
    or for ``max_steps`` optimizer steps where given (``256 * max_steps`` samples, whatever the
    machine's speed). Returns the network in eval mode and the steps taken."""
    net = nn.Sequential(
        nn.Linear(x.shape[1], 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, out_dim)
    )
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    started, steps = time.perf_counter(), 0
    while steps < max_steps if max_steps else time.perf_counter() - started < seconds:
        index = torch.randint(0, len(x), (256,))
        value = loss(net(x[index]), y[index])
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        steps += 1
    return net.eval(), steps


def fit(
    task: str,
    root: str,
    seconds: float,
    seed: int,
    max_episodes: int | None = None,
    max_steps: int | None = None,
) -> tuple[nn.Module, Features, Any, int]:
    from gato_like.data_pipelines.loader import DatasetSource
    from gato_like.data_pipelines.shards import iter_task

    torch.manual_seed(seed)
    spec = DatasetSource.open(root, [task]).specs[task]
    features = Features(spec)
    xs, ys = [], []
    episodes = list(iter_task(root, task))
    if max_episodes is not None:  # a few demos, chosen by the seed (as benchmarks/fewshot.py does)
        import random

        episodes = [episodes[i] for i in random.Random(seed).sample(range(len(episodes)), max_episodes)]
    for episode in episodes:
        for t in range(episode.length):
            xs.append(features({k: v[t] for k, v in episode.observations.items()}))
            ys.append(np.asarray(episode.actions[t]).reshape(-1))
    x = torch.from_numpy(np.stack(xs))
    mean, std = x.mean(0), x.std(0) + 1e-3
    action = spec.action
    discrete = action.kind == "discrete"
    out_dim = action.num_choices if discrete else int(np.prod(action.shape))
    y = torch.from_numpy(np.stack(ys))
    if discrete:
        y = y[:, 0].long()
    else:
        low, high = torch.as_tensor(action.low).reshape(-1), torch.as_tensor(action.high).reshape(-1)
        y = (2 * (y.float() - low) / (high - low) - 1).clamp(-1, 1)
    net, steps = train_mlp(
        (x - mean) / std,
        y,
        out_dim,
        seconds,
        nn.functional.cross_entropy
        if discrete
        else (lambda pred, target: ((torch.tanh(pred) - target) ** 2).mean()),
        max_steps,
    )

    def actor(observation: dict[str, Any]) -> np.ndarray:
        with torch.no_grad():
            out = net(((torch.from_numpy(features(observation)) - mean) / std)[None])[0]
        if discrete:
            return np.array([int(out.argmax())])
        return (low + (torch.tanh(out) + 1) / 2 * (high - low)).numpy().reshape(action.shape)

    return net, features, actor, steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", default="runs/mlp_reference")
    parser.add_argument("--tasks", default=None, help="comma list (default: every task with a simulator)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="train for this many steps of 256 samples instead of --seconds (e.g. the samples a task gets in an hour)",
    )
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max_episodes", type=int, default=None, help="train on this many episodes, drawn by --seed"
    )
    args = parser.parse_args()
    from gato_like.data_pipelines.shards import read_index
    from gato_like.envs.registry import get_task
    from gato_like.training.evaluate import eval_seed, normalized_score
    from gato_like.training.rollouts import rollout_tasks

    index = read_index(args.data)["tasks"]
    names = rollout_tasks(index, args.tasks.split(",") if args.tasks else None)
    results: dict[str, Any] = {}
    for name in names:
        _, _, actor, steps = fit(name, args.data, args.seconds, args.seed, args.max_episodes, args.steps)
        task = get_task(name)
        returns = [
            task.rollout(
                eval_seed(name, args.seed, i), actor, render=False, max_steps=index[name]["max_steps"]
            ).episode_return
            for i in range(args.episodes)
        ]
        normalizers = index[name]["returns"]
        score = normalized_score(float(np.mean(returns)), normalizers["expert"], normalizers["random"])
        results[name] = {"score": None if score is None else round(score, 4), "mean_return": round(float(np.mean(returns)), 2), "train_steps": steps}  # fmt: skip
        print(f"{name:24s} score {score:.3f}  return {np.mean(returns):.1f}  ({steps} steps)", flush=True)
    scores = [r["score"] for r in results.values() if r["score"] is not None]
    summary = {
        "args": vars(args),
        "tasks": results,
        "mean_score": round(float(np.mean(scores)), 4) if scores else None,
    }
    print(f"mean score {summary['mean_score']}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "mlp_reference.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
