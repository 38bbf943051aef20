"""Do the states a trained policy drifts into, labelled by the expert (DAgger), teach a task
what as many more of the expert's own perturbed episodes (DART) do not?

Two datasets of one task with the same number of episodes:

- ``dart``: ``gato-like data generate`` with the suite's perturbation for the task and
  ``base + extra`` episodes (the first ``base`` are the suite's own: the seeds are the same);
- ``dagger``: the ``base`` episodes of ``--data`` plus ``extra`` episodes in which the checkpoint
  ``--ckpt`` acts and the task's expert labels every state it reaches
  (``ControlTask.rollout(..., expert_labels=True)``), on seeds neither generation nor evaluation uses.

Then, per seed, the same ``gato-like train`` (the ``cpu`` recipe on that task alone,
``--max_steps``, one thread each, the two arms side by side) and ``gato-like eval`` on
``--episodes`` unseen episodes; prints the scores side by side and writes ``OUT/probe_dagger.json``.

    .venv/bin/python benchmarks/probe_dagger.py --data data/suite60p --ckpt runs/cpu68/best \\
        --task dmc-pendulum-swingup --extra 20 --steps 1500 --seeds 1,2 --out runs/probe_dagger
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gato_like.data_pipelines.shards import (
    TaskShardWriter,
    iter_task,
    load_spec,
    read_index,
    returns_summary,
    write_index,
)
from gato_like.envs.control import ControlTask
from gato_like.envs.registry import get_task
from gato_like.policy import Policy

#: collection seeds: outside generation's and evaluation's (1,000,000+) ranges
COLLECT_SEED = 5_000_000


def cli() -> str:
    return str(Path(sys.executable).parent / "gato-like")


def dagger_dataset(data: Path, ckpt: Path, task_name: str, extra: int, out: Path) -> dict[str, Any]:
    """``out``: ``data``'s episodes of ``task_name`` and ``extra`` policy-run, expert-labelled
    ones, indexed as ``data`` indexes the task (its normalizers kept)."""
    task = get_task(task_name)
    if not isinstance(task, ControlTask):
        raise ValueError(f"--task: expected a control task with a scripted expert, got {task_name!r}")
    source = read_index(data)["tasks"][task_name]
    policy = Policy.from_checkpoint(ckpt)
    keys = frozenset(policy.checkpoint.spec_for(task_name).observations)
    writer = TaskShardWriter(out, task_name, load_spec(data, task_name))
    for episode in iter_task(data, task_name):
        writer.add(episode)
    returns = []
    for i in range(extra):
        policy.reset(task_name)
        episode = task.rollout(
            COLLECT_SEED + i,
            lambda o: policy.act({k: v for k, v in o.items() if k in keys}),
            render=False,
            expert_labels=True,
        )
        returns.append(episode.episode_return)
        writer.add(episode)
    writer.flush()
    entry = dict(source)
    entry["shards"] = [vars(s) for s in writer.shards]
    entry["episodes"] = sum(s.episodes for s in writer.shards)
    entry["timesteps"] = sum(s.timesteps for s in writer.shards)
    entry["dagger"] = {"checkpoint": str(ckpt), "episodes": extra, "policy_returns": returns_summary(returns)}
    write_index(out, {task_name: entry})
    return {"policy_returns": returns}


def run_pair(commands: dict[str, list[str]], logs: Path) -> None:
    """The arms' commands side by side, each logged to ``logs/ARM.log``; raises if one fails."""
    with contextlib.ExitStack() as files:
        running = {
            arm: subprocess.Popen(command, stdout=files.enter_context(open(logs / f"{arm}.log", "w")), stderr=subprocess.STDOUT)
            for arm, command in commands.items()
        }  # fmt: skip
        for arm, process in running.items():
            if process.wait() != 0:
                raise RuntimeError(f"{arm}: {' '.join(commands[arm])} failed; see {logs / f'{arm}.log'}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="the suite's dataset (its task's episodes)")
    parser.add_argument(
        "--ckpt", type=Path, required=True, help="the policy that collects (e.g. runs/cpu68/best)"
    )
    parser.add_argument("--task", default="dmc-pendulum-swingup")
    parser.add_argument("--extra", type=int, default=20, help="episodes added to each arm")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--episodes", type=int, default=20, help="unseen evaluation episodes")
    parser.add_argument("--out", type=Path, default=Path("runs/probe_dagger"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    source = read_index(args.data)["tasks"][args.task]
    base, hold = source["episodes"], source["perturbation"]["hold"]

    datasets = {"dart": args.out / "dart", "dagger": args.out / "dagger"}
    for path in datasets.values():
        shutil.rmtree(path, ignore_errors=True)
    subprocess.run([cli(), "data", "generate", "--out", str(datasets["dart"]), "--tasks", args.task, "--pixels", "false",
                    "--episodes", str(base + args.extra), "--hold", str(hold)], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    collected = dagger_dataset(args.data, args.ckpt, args.task, args.extra, datasets["dagger"])
    print(
        f"collected {args.extra} episodes with {args.ckpt}: returns {np.round(collected['policy_returns']).astype(int).tolist()}"
    )

    results: dict[str, dict[str, float]] = {arm: {} for arm in datasets}
    for seed in args.seeds.split(","):
        runs = {arm: args.out / f"{arm}_s{seed}" for arm in datasets}
        run_pair({arm: [cli(), "train", "--data", str(datasets[arm]), "--out", str(runs[arm]), "--max_steps", str(args.steps),
                        "--max_minutes", "60", "--rollout_episodes", "0", "--threads", "1", "--seed", seed]
                  for arm in datasets}, args.out)  # fmt: skip
        run_pair({arm: [cli(), "eval", "--ckpt", str(runs[arm] / "checkpoint"), "--episodes", str(args.episodes),
                        "--threads", "1", "--out", str(runs[arm] / "eval")] for arm in datasets}, args.out)  # fmt: skip
        for arm in datasets:
            scores = json.loads((runs[arm] / "eval" / "eval.json").read_text())["tasks"][args.task]
            results[arm][seed] = scores["expert_normalized_score"]
    print(f"\n{args.task}, {args.steps} steps, {args.episodes} unseen episodes a run")
    print(f"{'arm':40s} " + " ".join(f"seed {s:>3s}" for s in args.seeds.split(",")) + "    mean")
    for arm, label in (
        ("dart", f"{base + args.extra} DART episodes"),
        ("dagger", f"{base} DART + {args.extra} DAgger"),
    ):
        values = list(results[arm].values())
        print(f"{label:40s} " + " ".join(f"{v:8.2f}" for v in values) + f" {np.mean(values):7.2f}")
    (args.out / "probe_dagger.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                             "collected": collected, "scores": results}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
