"""``gato-like eval``: roll the runtime agent out in the real simulators and score it.

Per task: mean return over N episodes, the expert-normalized score
``(R - R_random) / (R_expert - R_random)`` with the normalizers the checkpoint carries from its
dataset, and the success rate. Writes ``eval.json``, a bar plot ``scores.png`` and a GIF of the
first episode of every task (camera frames, or a top-down view of BabyAI's grid).
"""

from __future__ import annotations

import json
import shlex
import shutil
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gato_like.checkpoint import Checkpoint
from gato_like.data_pipelines.inspect import save_gif
from gato_like.data_pipelines.shards import atomic_write_bytes
from gato_like.envs import Env, from_gymnasium, get_task
from gato_like.policy import Policy
from gato_like.training.settings import EvalConfig, check_threads


def evaluate(
    checkpoint: str | Path,
    out: str | Path,
    config: EvalConfig | None = None,
    *,
    command: str | None = None,
    write_card_file: bool = True,
    media: bool = True,
    **fields: Any,
) -> dict[str, Any]:
    """Evaluate every task (default: every task the checkpoint was trained on that has a reward),
    and write ``eval.json``, ``scores.png``, a GIF per task and ``model_card.md``.

    ``config``: what to evaluate (:class:`~gato_like.training.settings.EvalConfig`; ``fields``
    replace some of it, so ``evaluate(ckpt, out, episodes=3)`` works too).

    ``command``: the command line to print in the card (default: the equivalent ``gato-like eval``).
    ``prompt``: a dataset folder (e.g. the fine-tuning demos): each episode is prompted with the
    last timesteps of one of its demos of the task (up to a quarter of the context), as Gato
    prompts a new task with a demonstration.

    The observations the simulator gives are cut to the keys of the checkpoint's spec, so a body
    described with fewer sensors (e.g. proprioception only) is evaluated in the same simulator.
    A task whose normalizers lack the random policy's return (demos brought with `data convert`)
    gets it measured here, over ``episodes`` uniform-random episodes.

    ``gym``: a gymnasium environment id instead of the built-in simulators. Its spaces give an
    embodiment spec (:meth:`EmbodimentSpec.from_gymnasium`); the checkpoint's task with that spec
    is rolled out in it (``tasks`` names it when several match). It has no expert, so the result
    is the mean return beside a uniform-random policy's, not an expert-normalized score.
    """
    c = replace(config or EvalConfig(), **fields)
    tasks, episodes, max_steps, seed, prompt, gym = (
        c.task_names,
        c.episodes,
        c.max_steps,
        c.seed,
        c.prompt,
        c.gym,
    )
    if episodes < 1:
        raise ValueError(f"episodes: expected >= 1, got {episodes}")
    check_threads(c.threads)
    if c.threads is not None:
        torch.set_num_threads(c.threads)
    policy = Policy.from_checkpoint(checkpoint)
    known = policy.checkpoint.tasks
    names = tasks or [t for t in sorted(known) if t != "captions"]
    simulators: dict[str, Env] = {}
    if gym is not None:
        gym_task = from_gymnasium(gym)
        names = [gym_checkpoint_task(policy.checkpoint, gym_task, tasks)]
        simulators[names[0]] = gym_task
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for name in names:
        task = simulators.get(name) or get_task(name)
        steps = max_steps or known.get(name, {}).get("max_steps") or task.max_steps
        returns, successes = [], []
        spec = policy.checkpoint.spec_for(name)
        # one prompt per demo, cut once; episode i is prompted with demo i (cycling)
        prompts = (
            [demo_prompt(d, policy) for d in prompt_demos(prompt, name, spec)] if prompt is not None else []
        )

        for i in range(episodes):
            episode = play_episode(
                policy, name, eval_seed(name, seed, i), steps,
                prompt=prompts[i % len(prompts)] if prompts else None, record=media and i == 0,
                task=task,
            )  # fmt: skip
            returns.append(episode.episode_return)
            successes.append(episode.success)
            frames = episode.observations.get("pixels", episode.extra.get("frames"))
            if media and i == 0 and frames is not None:
                save_gif(frames, out / f"{name}.gif", max_frames=300)
        normalizers = known.get(name, {}).get("returns") or {}
        expert, random = normalizers.get("expert"), normalizers.get("random")
        random_measured = expert_measured = False
        trained_steps = known.get(name, {}).get("max_steps")
        if gym is not None:  # no expert: the random policy's return is the only reference
            expert, random = None, random_returns(task, episodes, steps, seed)
            random_measured = True
        elif trained_steps is not None and steps != trained_steps:
            # the normalizers were measured at the data's episode length: measure them at this one
            expert, random = (
                expert_returns(task, episodes, steps, seed),
                random_returns(task, episodes, steps, seed),
            )
            random_measured = expert_measured = True
        elif expert and not random:
            random = random_returns(task, episodes, steps, seed)
            random_measured = True
        mean = float(np.mean(returns))
        score = normalized_score(mean, expert, random)
        results[name] = {
            "episodes": episodes,
            "max_steps": steps,
            "mean_return": round(mean, 4),
            "returns": [round(r, 4) for r in returns],
            "expert_normalized_score": None if score is None else round(score, 4),
            "success_rate": round(float(np.mean(successes)), 4),
            "normalizers": {
                "expert": expert,
                "random": random,
                "random_measured_here": random_measured,
                "expert_measured_here": expert_measured,
            },
            "prompted": bool(prompts),
        }
    scores = [
        r["expert_normalized_score"] for r in results.values() if r["expert_normalized_score"] is not None
    ]
    if command is None:
        command = shlex.join(
            ["gato-like", "eval", "--ckpt", str(checkpoint), "--out", str(out), "--episodes", str(episodes)]
            + (["--tasks", ",".join(tasks)] if tasks else [])
            + (["--max_steps", str(max_steps)] if max_steps else [])
            + (["--seed", str(seed)] if seed else [])
            + (["--gym", gym] if gym else [])
            + (["--threads", str(c.threads)] if c.threads else [])
        )
    summary = {
        "checkpoint": str(checkpoint),
        "command": command,
        "tasks": results,
        "mean_score": round(float(np.mean(scores)), 4) if scores else None,
    }
    (out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not write_card_file:
        return summary
    _plot(results, out / "scores.png")
    curves = Path(checkpoint).parent / "losses.png"  # written by train() beside the checkpoint
    if curves.is_file() and curves.resolve() != (out / "losses.png").resolve():
        shutil.copyfile(curves, out / "losses.png")
    write_card(policy.checkpoint, checkpoint, summary, out / "model_card.md")
    return summary


def eval_seed(task: str, seed: int, index: int) -> int:
    """The seed of evaluation episode ``index``: outside the range data generation draws from."""
    return 1_000_000 + zlib.crc32(task.encode()) % 1000 * 1000 + seed * 100 + index


def normalized_score(
    mean: float, expert: dict[str, Any] | None, random: dict[str, Any] | None
) -> float | None:
    """``(R - R_random) / (R_expert - R_random)``, or None without both normalizers."""
    if expert and random and expert["mean"] != random["mean"]:
        return (mean - random["mean"]) / (expert["mean"] - random["mean"])
    return None


def play_episode(
    policy: Policy,
    name: str,
    seed: int,
    steps: int,
    prompt: tuple[dict[str, Any], Any] | None = None,
    record: bool = False,
    task: Env | None = None,
) -> Any:
    """One closed-loop episode of ``policy`` in task ``name``'s simulator (reset with ``prompt``);
    ``record`` keeps frames for a video (camera frames, or BabyAI's top-down grid view).

    The observations the simulator gives are cut to the keys of the checkpoint's spec. ``task``:
    the simulator (default: the built-in task ``name``; e.g. :func:`~gato_like.envs.from_gymnasium` of a user's env)."""
    task = task or get_task(name)
    spec = policy.checkpoint.spec_for(name)
    keys = frozenset(spec.observations)

    def act(observation: dict[str, Any]) -> Any:
        return policy.act({k: v for k, v in observation.items() if k in keys})

    policy.reset(name, prompt=prompt)
    return task.rollout(seed, act, render="pixels" in spec.observations, max_steps=steps, record=record)


def gym_checkpoint_task(checkpoint: Any, gym_task: Env, tasks: list[str] | None = None) -> str:
    """The checkpoint's task to roll out in a gymnasium environment: the one named in ``tasks``,
    else the one whose spec has the environment's observations and action. Raises ``ValueError``
    saying what differs when none fits."""
    derived = gym_task.spec
    if tasks is not None and len(tasks) != 1:
        raise ValueError(f"--gym: expected one checkpoint task to roll out, got {tasks}")

    def differences(name: str) -> list[str]:  # the body matters, not what it is called
        return checkpoint.spec_for(name).differences(derived, "the checkpoint", gym_task.name, body_only=True)

    if tasks:
        if tasks[0] not in checkpoint.tasks:
            raise ValueError(
                f"--tasks {tasks[0]}: not a task of the checkpoint (tasks: {sorted(checkpoint.tasks)})"
            )
        problems = differences(tasks[0])
        if problems:
            raise ValueError(
                f"checkpoint task {tasks[0]!r} does not fit {gym_task.name}: " + "; ".join(problems)
            )
        return tasks[0]
    fitting = [name for name in sorted(checkpoint.tasks) if not differences(name)]
    if len(fitting) == 1:
        return fitting[0]
    if fitting:
        raise ValueError(
            f"{gym_task.name}: several checkpoint tasks fit ({fitting}); choose one with --tasks"
        )
    raise ValueError(
        f"{gym_task.name}: no task of the checkpoint has its observations and action "
        f"({derived.to_dict()['observations']} -> {derived.action.to_dict()}); fine-tune on demos of it first "
        f"(checkpoint tasks: {sorted(checkpoint.tasks)})"
    )


def expert_returns(task: Env, episodes: int, max_steps: int, seed: int = 0) -> dict[str, Any]:
    """The clean expert's return summary over ``episodes`` episodes (no rendering)."""
    from gato_like.data_pipelines.shards import returns_summary

    values = [
        task.rollout(3_000_000 + seed * 1000 + i, "expert", render=False, max_steps=max_steps).episode_return
        for i in range(episodes)
    ]
    return returns_summary(values)


def random_returns(task: Env, episodes: int, max_steps: int, seed: int = 0) -> dict[str, Any]:
    """The uniform-random policy's return summary over ``episodes`` episodes (no rendering)."""
    from gato_like.data_pipelines.shards import returns_summary

    values = [
        task.rollout(2_000_000 + seed * 1000 + i, "random", render=False, max_steps=max_steps).episode_return
        for i in range(episodes)
    ]
    return returns_summary(values)


def prompt_demos(root: str | Path, task: str, spec: Any) -> list[Any]:
    """The episodes of ``task`` in a dataset folder, for prompting; they must follow ``spec``."""
    from gato_like.data_pipelines.shards import iter_task, read_index

    index = read_index(root)
    if task not in index["tasks"]:
        raise ValueError(f"--prompt {root}: no demos of task {task!r} (tasks: {sorted(index['tasks'])})")
    episodes = list(iter_task(root, task))
    for episode in episodes:
        episode.check(spec)
    if not episodes:
        raise ValueError(f"--prompt {root}: task {task!r} has no episodes")
    return episodes


def demo_prompt(episode: Any, policy: Policy, fraction: float = 0.25) -> tuple[dict[str, Any], Any]:
    """The last whole timesteps of a demo that fit in ``fraction`` of the context, counted in
    backbone inputs, and no more than ``history_steps`` (as the loader cuts training prompts): a
    goal-like prompt."""
    from gato_like.tokenizers import SequenceBuilder

    builder = SequenceBuilder(policy.checkpoint.spec_for(episode.task), policy.checkpoint.text)
    step = builder.build_step({k: v[0] for k, v in episode.observations.items()})
    per_step = policy.embed_tokens(step).shape[1] + builder.action_size  # backbone inputs
    steps = max(1, int(policy.model.config.context_length * fraction) // per_step)
    history = policy.model.config.history_for(builder.spec.action.kind)
    if history:
        steps = min(steps, history)
    return {k: v[-steps:] for k, v in episode.observations.items()}, episode.actions[-steps:]


def write_card(
    loaded: Checkpoint,
    checkpoint: str | Path,
    results: dict[str, Any],
    path: Path,
    run_name: str | None = None,
) -> Path:
    """Render ``model_cards/card.md.j2`` with the checkpoint's meta and config and the evaluation."""
    import jinja2

    from gato_like.model_cards import template_text

    def fmt(value: Any) -> str:
        return "-" if value is None or isinstance(value, jinja2.Undefined) else f"{value:,.2f}"

    def minutes(seconds: Any) -> str:
        missing = seconds is None or isinstance(seconds, jinja2.Undefined)
        return "?" if missing else f"{float(seconds) / 60:.1f} min"

    environment = jinja2.Environment(undefined=jinja2.ChainableUndefined, keep_trailing_newline=True)
    meta = loaded.meta
    weak = [
        name
        for name, r in sorted(results["tasks"].items())
        if r["expert_normalized_score"] is not None and r["expert_normalized_score"] < 0.5
    ]
    text = environment.from_string(template_text()).render(
        meta=meta,
        config=loaded.model.config,
        tasks=loaded.tasks,
        results=results,
        checkpoint=str(checkpoint),
        run_name=run_name,
        weak=weak,
        fmt=fmt,
        minutes=minutes,
    )
    atomic_write_bytes(path, text.encode())
    return path


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    scores = [results[n]["expert_normalized_score"] or 0.0 for n in names]
    figure, axis = plt.subplots(figsize=(max(4, 1.2 * len(names)), 3.5))
    axis.bar(range(len(names)), scores, color="#4c72b0")
    axis.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="expert")
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    axis.set_ylabel("expert-normalized score")
    axis.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
