"""``gato-like data generate``: episodes of a suite, sharded, with return normalizers, in parallel.

Every episode's seed is derived from (seed, task, kind, index), so the output depends only on the
arguments, never on the number of workers or the order in which they finish: the same seed gives
the same bytes.
"""

from __future__ import annotations

import multiprocessing
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from gato_like.data_pipelines.episodes import Episode
from gato_like.data_pipelines.shards import INDEX_FILE, TaskShardWriter, returns_summary, write_index
from gato_like.envs.control import DEFAULT_PERTURBATION, Perturbation
from gato_like.envs.registry import get_task, resolve_tasks, split_names
from gato_like.tokenizers.spec import EmbodimentSpec

#: Episodes per policy used for the expert and random return normalizers.
NORMALIZER_EPISODES = 20


def episode_seed(seed: int, task: str, kind: str, index: int) -> int:
    """A 31-bit seed for one episode, independent of scheduling."""
    entropy = [seed, zlib.crc32(task.encode()), zlib.crc32(kind.encode()), index]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] & 0x7FFFFFFF)


@dataclass(frozen=True)
class Job:
    task: str
    kind: str  # "data" (expert, rendered), "expert" or "random" (returns only)
    index: int
    seed: int
    max_steps: int | None
    pixels: bool = True
    perturbation: Perturbation | None = None


def without_images(spec: EmbodimentSpec) -> EmbodimentSpec:
    """The spec with its image observations left out (a body observed by proprioception only)."""
    data = spec.to_dict()
    data["observations"] = {k: v for k, v in data["observations"].items() if v["kind"] != "image"}
    return EmbodimentSpec.from_dict(data)


def task_spec(task: str, pixels: bool = True) -> EmbodimentSpec:
    """The spec a task's episodes are written with (``pixels=False``: no image keys)."""
    spec = get_task(task).spec
    return spec if pixels else without_images(spec)


def _run(job: Job) -> tuple[Job, Episode | float]:
    task = get_task(job.task)
    if job.kind == "data":
        episode = task.rollout(
            job.seed, "expert", render=job.pixels, max_steps=job.max_steps, perturbation=job.perturbation
        )
        if not job.pixels:  # keep exactly the keys of the spec the episode is written with
            keys = task_spec(job.task, pixels=False).observations
            episode.observations = {k: v for k, v in episode.observations.items() if k in keys}
        return job, episode
    episode = task.rollout(job.seed, job.kind, render=False, max_steps=job.max_steps)
    return job, episode.episode_return


@dataclass
class GenerateConfig:
    """What to generate.

    The flags of ``gato-like data generate`` besides ``--out`` and the perturbation's ``--noise``,
    ``--random_prob`` and ``--hold``."""

    suite: str | None = "default"
    """A named suite: default, control, babyai, heldout, goals or smoke."""
    tasks: str | list[str] | None = None
    """Task names instead of a suite, comma-separated or a list (e.g. dmc-reacher-easy,captions)."""
    episodes: int = 20
    """Expert episodes per task."""
    max_steps: int | None = None
    """Cap on episode length (default: each task's own; dm_control 1000)."""
    seed: int = 0
    """Base seed; the same seed gives the same bytes."""
    workers: int = 2
    """Processes."""
    episodes_per_shard: int = 16
    """Episodes per tar shard."""
    normalizer_episodes: int = NORMALIZER_EPISODES
    """Expert and random episodes per task for the return normalizers."""
    overwrite: bool = False
    """Replace an existing dataset in the output folder."""
    pixels: bool = True
    """Render camera frames; false writes proprioception-only episodes (the specs lose their image
    keys), about 2.3x fewer tokens per control timestep."""
    task_episodes: str | dict[str, int] | None = None
    """Episodes of particular tasks instead of ``episodes``, e.g. "babyai-GoToLocal=200,babyai-PickupLoc=200"
    (more of the short BabyAI episodes than of the 1000-step control ones)."""
    task_hold: str | dict[str, int] | None = None
    """The perturbation's hold for particular tasks, e.g. "dmc-cartpole-balance=1" beside --hold 50."""


def _counts(value: str | dict[str, int] | None, name: str) -> dict[str, int] | None:
    """``"a=200, b=50"`` (or a dict) -> ``{"a": 200, "b": 50}``; a malformed entry is named."""
    if value is None or isinstance(value, dict):
        return value
    out = {}
    for part in (p.strip() for p in value.split(",") if p.strip()):
        task, _, count = part.partition("=")
        if not count.strip().isdigit():
            raise ValueError(f"{name}: expected TASK=COUNT, got {part!r}")
        out[task.strip()] = int(count)
    return out or None


def generate(
    out: str | Path,
    config: GenerateConfig | None = None,
    *,
    perturbation: Perturbation | None = DEFAULT_PERTURBATION,
    progress: bool = True,
    **fields: Any,
) -> dict[str, Any]:
    """Generate expert episodes of a suite into shards under ``out`` and write its index.

    ``config``: what to generate (:class:`GenerateConfig`; ``fields`` replace some of it, so
    ``generate(out, tasks=["captions"], episodes=2)`` works too). ``perturbation``: DART-style
    perturbation of the data episodes (executed action perturbed, the expert's clean action
    recorded); ``None`` or zeros for the expert's own path. The return normalizers are always the
    clean expert's and the uniform-random policy's. ``progress``: show a progress bar.

    Returns:
        The index written to ``out/index.json``.
    """
    c = replace(config or GenerateConfig(), **fields)
    suite, episodes, max_steps, seed, workers = c.suite, c.episodes, c.max_steps, c.seed, c.workers
    episodes_per_shard, normalizer_episodes, pixels = c.episodes_per_shard, c.normalizer_episodes, c.pixels
    task_episodes, task_hold = _counts(c.task_episodes, "task_episodes"), _counts(c.task_hold, "task_hold")
    root = Path(out)
    if (root / INDEX_FILE).exists() and not c.overwrite:
        raise FileExistsError(
            f"{root} already holds a dataset ({INDEX_FILE}); pass --overwrite to replace it"
        )
    if episodes < 1 or normalizer_episodes < 1:
        raise ValueError(
            f"episodes and normalizer_episodes: expected >= 1, got {episodes}, {normalizer_episodes}"
        )
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps: expected >= 1 (or unset for each task's own), got {max_steps}")
    if episodes_per_shard < 1:
        raise ValueError(f"episodes_per_shard: expected >= 1, got {episodes_per_shard}")
    perturbation = perturbation if perturbation is not None else Perturbation()
    selected = list({t.name: t for t in resolve_tasks(suite, c.tasks)}.values())  # each task once
    counts = {t.name: episodes for t in selected} | dict(task_episodes or {})
    unknown = sorted(set(counts) - {t.name for t in selected})
    if unknown or any(not isinstance(n, int) or n < 1 for n in counts.values()):
        raise ValueError(
            f"task_episodes: expected >= 1 episodes for tasks being generated, got {task_episodes} (tasks: {[t.name for t in selected]})"
        )
    holds = dict(task_hold or {})
    unknown = sorted(set(holds) - {t.name for t in selected})
    if unknown:
        raise ValueError(
            f"task_hold: {unknown} are not tasks being generated (tasks: {[t.name for t in selected]})"
        )
    continuous = {t.name for t in selected if t.spec.action.kind == "continuous"}
    discrete = sorted(n for n, h in holds.items() if n not in continuous and h != 1)
    if discrete:
        raise ValueError(
            f"task_hold: {discrete} act with discrete actions; a hold applies to continuous actions only"
        )
    # the index records what was done: a hold of 1 for tasks whose random actions are never held
    perturbations = {
        t.name: replace(
            perturbation, hold=holds.get(t.name, perturbation.hold) if t.name in continuous else 1
        )
        for t in selected
    }
    if not pixels and "captions" in {t.name for t in selected}:
        raise ValueError("pixels=False: the captions task describes camera frames; leave it out of the tasks")
    root.mkdir(parents=True, exist_ok=True)
    (root / INDEX_FILE).unlink(missing_ok=True)
    jobs = [
        Job(
            t.name,
            kind,
            i,
            episode_seed(seed, t.name, kind, i),
            max_steps,
            pixels,
            perturbations[t.name] if kind == "data" else None,
        )
        for t in selected
        for kind, count in (
            ("data", counts[t.name]),
            ("expert", normalizer_episodes),
            ("random", normalizer_episodes),
        )
        for i in range(count)
    ]
    writers = {
        t.name: TaskShardWriter(root, t.name, task_spec(t.name, pixels), episodes_per_shard) for t in selected
    }
    # results arrive in job order, so shards are filled in the same order on every run
    pending: dict[str, dict[int, Episode]] = {t.name: {} for t in selected}
    next_index = dict.fromkeys(pending, 0)
    returns: dict[str, dict[str, list[float]]] = {
        t.name: {"expert": [], "random": [], "data": []} for t in selected
    }
    stats = {t.name: {"timesteps": 0, "success": 0} for t in selected}
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with context.Pool(max(1, workers)) if workers > 1 else _InlinePool() as pool:
        bar = tqdm(total=len(jobs), desc="generating", unit="ep", disable=not progress)
        for job, result in pool.imap_unordered(_run, jobs, chunksize=1):
            bar.update()
            if isinstance(result, float):
                returns[job.task][job.kind].append(result)
                continue
            pending[job.task][job.index] = result
            while next_index[job.task] in pending[job.task]:
                episode = pending[job.task].pop(next_index[job.task])
                writers[job.task].add(episode)
                returns[job.task]["data"].append(episode.episode_return)
                stats[job.task]["timesteps"] += episode.length
                stats[job.task]["success"] += int(episode.success)
                next_index[job.task] += 1
        bar.close()
    elapsed = time.perf_counter() - started
    entries: dict[str, dict[str, Any]] = {}
    for task in selected:
        writers[task.name].flush()
        entries[task.name] = {
            "embodiment": task.embodiment,
            "spec": f"{task.name}/embodiment.json",
            "episodes": counts[task.name],
            "timesteps": stats[task.name]["timesteps"],
            "success_rate": round(stats[task.name]["success"] / counts[task.name], 4),
            "perturbation": perturbations[task.name].to_dict(),
            "max_steps": max_steps or task.max_steps,
            "returns": {
                "dataset": returns_summary(returns[task.name]["data"]),
                # sorted: float sums (and so the index's bytes) must not depend on arrival order
                "expert": returns_summary(sorted(returns[task.name]["expert"])),
                "random": returns_summary(sorted(returns[task.name]["random"])),
            },
            "shards": [vars(s) for s in writers[task.name].shards],
        }
    frames = sum(
        e["timesteps"] for name, e in entries.items() if "pixels" in task_spec(name, pixels).observations
    )
    index = write_index(root, entries, seed=seed, suite=suite if not split_names(c.tasks) else None)
    # timings vary from run to run, so they stay out of the index (whose bytes are reproducible)
    index["timing"] = {"seconds": round(elapsed, 2), "rendered_frames": frames, "workers": workers}
    return index


class _InlinePool:
    """The Pool interface, in this process (workers=1: easier to debug and profile)."""

    def __enter__(self) -> _InlinePool:
        return self

    def __exit__(self, *args: object) -> None:
        pass

    def imap_unordered(self, fn: Any, items: list[Job], chunksize: int = 1) -> Any:
        return map(fn, items)
