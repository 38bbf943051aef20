"""The goal-conditioned head, measured: reaching success with a goal state (or goal image) against
the same policy without a goal.

    .venv/bin/python benchmarks/goals.py --ckpt runs/goal_pm/checkpoint \\
        --tasks dmc-point_mass-goals --goals 50 --out runs/goals.json

For each of ``--goals`` fresh episode seeds per task, the scripted expert is rolled out first and
its final observation is the goal: ``state`` gives the goal head the proprioceptive keys,
``image`` the camera frame (only for checkpoints whose spec has one). The goal-conditioned
policy (``Policy.reset(task, goal=...)``: the goal segment before the history, the goal head) and
the unconditioned policy are then rolled out from the same seed. Success is the task's own at
the last step. With ``--mlp_data`` (goal-reaching demos, e.g. ``data generate --suite goals``), a
plain reference is rolled out beside them: a 2-layer MLP on (observation, hindsight goal) floats,
trained for ``--mlp_seconds`` on those demos, so a reader sees what the data allows.

On the goal-reaching tasks (``dmc-point_mass-goals``, ``dmc-reacher-goals``: a random goal
position per seed, not the task's target) only the goal tells the policy where to go; on the
plain tasks the goal is the target the policy already knows.
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np


def goal_mlp(root: str, task: str, seconds: float, seed: int = 0) -> Any:
    """A goal-conditioned behaviour-cloning reference: ``actor(goal) -> (observation -> action)``.

    Inputs are the observation's and the goal's float features (``mlp_reference.Features``);
    each training step's goal is the observation of a uniformly drawn later step of its episode
    (hindsight relabelling, as the loader does); continuous actions only (MSE on [-1, 1], tanh)."""
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from mlp_reference import Features, train_mlp

    from gato_like.data_pipelines.loader import DatasetSource
    from gato_like.data_pipelines.shards import iter_task

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    spec = DatasetSource.open(root, [task]).specs[task]
    if spec.action.kind == "discrete":
        raise ValueError(f"{task}: the goal-conditioned MLP reference takes continuous actions only")
    features = Features(spec)
    xs, ys = [], []
    for episode in iter_task(root, task):
        obs = [features({k: v[t] for k, v in episode.observations.items()}) for t in range(episode.length)]
        for t in range(episode.length):
            xs.append(np.concatenate([obs[t], obs[rng.integers(t, episode.length)]]))
            ys.append(np.asarray(episode.actions[t], np.float32).reshape(-1))
    x = torch.from_numpy(np.stack(xs))
    mean, std = x.mean(0), x.std(0) + 1e-3
    low = torch.as_tensor(spec.action.low, dtype=torch.float32).reshape(-1)
    high = torch.as_tensor(spec.action.high, dtype=torch.float32).reshape(-1)
    y = (2 * (torch.from_numpy(np.stack(ys)) - low) / (high - low) - 1).clamp(-1, 1)
    net, _ = train_mlp((x - mean) / std, y, y.shape[1], seconds, lambda pred, target: ((torch.tanh(pred) - target) ** 2).mean())  # fmt: skip

    def actor(goal: dict[str, Any]) -> Any:
        g = features(goal)

        def act(observation: dict[str, Any]) -> np.ndarray:
            v = torch.from_numpy(np.concatenate([features(observation), g]))
            with torch.no_grad():
                out = torch.tanh(net(((v - mean) / std)[None].float())[0])
            return (low + (out + 1) / 2 * (high - low)).numpy().reshape(spec.action.shape)

        return act

    return actor


def measure(
    ckpt: Path,
    tasks: list[str],
    goals: int,
    max_steps: int | None,
    kinds: list[str],
    mlp_data: str | None = None,
    mlp_seconds: float = 30.0,
    action_decoding: str | None = None,
) -> dict[str, Any]:
    from gato_like.envs.registry import get_task
    from gato_like.policy import Policy

    policy = Policy.from_checkpoint(ckpt)
    if action_decoding is not None:
        policy.model.config.action_decoding = action_decoding  # read at every act
    results: dict[str, Any] = {}
    for name in tasks:
        task = get_task(name)
        spec = policy.checkpoint.spec_for(name)
        wants_pixels = "pixels" in spec.observations
        keys = frozenset(spec.observations)
        proprio = [k for k, o in spec.observations.items() if o.kind == "proprio"]
        steps = max_steps or task.max_steps
        rows: dict[str, list[bool]] = {"none": [], "expert": []}
        reference = goal_mlp(mlp_data, name, mlp_seconds) if mlp_data else None
        if reference is not None:
            rows["mlp"] = []
        for kind in kinds:
            if kind == "image" and not wants_pixels:
                print(f"{name}: the checkpoint's spec has no image; goal-image skipped", flush=True)
                continue
            rows[kind] = []
        for i in range(goals):
            seed = 3_000_000 + zlib.crc32(name.encode()) % 1000 * 1000 + i
            expert = task.rollout(seed, "expert", render=wants_pixels or "image" in rows, max_steps=steps)
            rows["expert"].append(expert.success)
            final = {k: v[-1] for k, v in expert.observations.items()}

            def act(observation: dict[str, Any], keys: frozenset[str] = keys) -> Any:
                return policy.act({k: v for k, v in observation.items() if k in keys})

            if reference is not None:
                rows["mlp"].append(
                    task.rollout(seed, reference(final), render=False, max_steps=steps).success
                )
            for kind in rows:
                if kind in ("expert", "mlp"):
                    continue
                goal = None
                if kind == "state":
                    goal = {k: final[k] for k in proprio} | (
                        {"pixels": np.zeros_like(final["pixels"])} if wants_pixels else {}
                    )
                elif kind == "image":
                    goal = {k: final[k] for k in spec.observations}
                policy.reset(name, goal=goal)
                episode = task.rollout(seed, act, render=wants_pixels, max_steps=steps)
                rows[kind].append(episode.success)
            print(name, i, {k: v[-1] for k, v in rows.items()}, flush=True)
        results[name] = {
            k: {"success_rate": round(float(np.mean(v)), 4), "goals": len(v)} for k, v in rows.items()
        }
    decoding = policy.model.config.action_decoding
    return {"checkpoint": str(ckpt), "max_steps": max_steps, "action_decoding": decoding, "tasks": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--tasks", default="dmc-point_mass-goals,dmc-reacher-goals")
    parser.add_argument("--goals", type=int, default=50)
    parser.add_argument("--max_steps", type=int, default=None, help="episode length (default: the task's)")
    parser.add_argument("--kinds", default="state,image", help="goal kinds: state, image")
    parser.add_argument("--mlp_data", default=None, help="goal-reaching demos for the MLP reference")
    parser.add_argument("--mlp_seconds", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--action_decoding",
        choices=("argmax", "mean", "median"),
        default=None,
        help="decode continuous actions this way instead of as the checkpoint's config says",
    )
    args = parser.parse_args()
    summary = measure(args.ckpt, args.tasks.split(","), args.goals, args.max_steps, args.kinds.split(","), args.mlp_data, args.mlp_seconds, args.action_decoding)  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print("| task | goal | success | goals |\n|---|---|---|---|")
    for task, rows in summary["tasks"].items():
        for kind, r in rows.items():
            label = {"none": "no goal (policy head)", "state": "goal state", "image": "goal image", "expert": "scripted expert", "mlp": "goal-conditioned MLP reference"}[kind]  # fmt: skip
            print(f"| {task} | {label} | {r['success_rate']:.0%} | {r['goals']} |")


if __name__ == "__main__":
    main()
