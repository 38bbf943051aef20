"""``gato-like data convert``: bring your own demonstrations.

Input: a folder of ``.npz`` files, one per episode, each with ``obs.<key>`` arrays ``(T, ...)``
for every observation key of the embodiment spec, ``actions`` ``(T, ...)`` and optionally
``rewards`` ``(T,)`` (zeros when absent) and ``success`` (a 0-d bool). Every file is checked
against the spec before anything is written; the errors name the file and the key.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from gato_like.data_pipelines.episodes import Episode
from gato_like.data_pipelines.shards import (
    INDEX_FILE,
    DatasetError,
    TaskShardWriter,
    check_task_name,
    read_index,
    returns_summary,
    write_index,
)
from gato_like.tokenizers.spec import EmbodimentSpec, SpecMismatchError


@dataclass
class ConvertConfig:
    """How to read demonstrations.

    The flags of ``gato-like data convert`` besides the source and ``--out``."""

    from_: str = "npz"
    """The source's format (--from): npz (a folder of .npz episodes), minari or lerobot."""
    spec: Path | None = None
    """The embodiment spec (JSON) the episodes follow; required for npz; for minari and lerobot it is derived from the dataset and this replaces it."""
    task: str | None = None
    """Task name (default: the spec's name)."""
    instruction: str = ""
    """Text instruction of the task, stored with every episode (lerobot: default each episode's task text)."""
    episodes_per_shard: int = 16
    """Episodes per tar shard."""
    overwrite: bool = False
    """Replace the task if the dataset already has it."""
    max_episodes: int | None = None
    """Convert at most this many episodes (minari, lerobot)."""


#: The formats ``convert`` reads.
FORMATS = ("npz", "minari", "lerobot")


def convert(
    source: str | Path, out: str | Path, config: ConvertConfig | None = None
) -> tuple[dict[str, Any], str]:
    """Convert ``source`` (in ``config.from_``'s format) into shards of one task under ``out``;
    the dataset index and the task's name."""
    c = config or ConvertConfig()
    if c.from_ not in FORMATS:
        raise ValueError(f"--from: expected one of {', '.join(FORMATS)}, got {c.from_!r}")
    random_returns = None
    if c.from_ == "npz":
        if c.spec is None:
            raise ValueError("--spec: a folder of .npz episodes needs the embodiment spec (JSON) they follow")
        spec, episodes = load_npz(source, c.spec, c.task)
    elif c.from_ == "minari":
        from gato_like.data_pipelines.minari_import import load_minari

        spec, episodes, meta = load_minari(source, c.task, c.spec, c.max_episodes)
        if meta.get("ref_min_score") is not None:  # the dataset's own random-policy reference
            random_returns = {"mean": round(float(meta["ref_min_score"]), 4), "std": 0.0, "episodes": 0}
    else:
        from gato_like.data_pipelines.lerobot_import import load_lerobot

        spec, episodes = load_lerobot(source, c.task, c.spec, c.max_episodes)
    for episode in episodes:  # lerobot: each episode keeps its own task text unless one is given
        episode.instruction = c.instruction or episode.instruction
    task = episodes[0].task
    return write_task(
        Path(out), task, spec, episodes, c.episodes_per_shard, c.overwrite, random_returns
    ), task


class ConversionError(ValueError):
    """Demonstrations that cannot be converted; ``problems`` has one line per file."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            f"{len(problems)} demonstration file(s) cannot be converted:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


def gather(loaders: Iterable[tuple[str, Callable[[], Episode]]]) -> list[Episode]:
    """Run every ``(label, load)``; raise :class:`ConversionError` listing each one that fails
    (labelled: a file name, ``episode 3``), so a user sees every problem at once, before anything
    is written. ``KeyError``/``IndexError`` count as malformed input too."""
    episodes, problems = [], []
    for label, load in loaders:
        try:
            episodes.append(load())
        except SpecMismatchError as error:
            problems.append(f"{label}: " + "; ".join(str(v) for v in error.violations))
        except (ValueError, KeyError, IndexError) as error:
            problems.append(f"{label}: {error}")
    if problems:
        raise ConversionError(problems)
    return episodes


def _success(value: np.ndarray | None) -> bool:
    if value is None:
        return False
    if value.shape != () or value.dtype.kind not in "biu":
        raise ValueError(f"success: expected a 0-d bool or integer, got {value.dtype} of shape {value.shape}")
    return bool(value)


def load_npz_episode(path: Path, spec: EmbodimentSpec, task: str) -> Episode:
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            raise ValueError("a single .npy array, not an .npz archive of named arrays")
        with loaded as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise ValueError(
            f"not a readable .npz without pickled objects ({type(error).__name__}: {error})"
        ) from error
    if "actions" not in arrays:
        raise ValueError(f"no 'actions' array (found {sorted(arrays)})")
    observations = {k[4:]: v for k, v in arrays.items() if k.startswith("obs.")}
    unknown = sorted(
        k for k in arrays if not k.startswith("obs.") and k not in ("actions", "rewards", "success")
    )
    if unknown:
        raise ValueError(f"unexpected arrays {unknown}; expected obs.<key>, actions, rewards, success")
    steps = spec.check_episode(observations, arrays["actions"])
    if len(arrays["actions"]) != steps:
        raise ValueError(f"actions: expected {steps} rows (one per timestep), got {len(arrays['actions'])}")
    rewards = arrays.get("rewards", np.zeros(steps, dtype=np.float32))
    if rewards.shape != (steps,) or rewards.dtype.kind not in "fiu":
        raise ValueError(
            f"rewards: expected a numeric array of shape ({steps},), got {rewards.dtype} {rewards.shape}"
        )
    if not np.isfinite(rewards.astype(np.float32)).all():
        raise ValueError("rewards: expected finite float32 values, got NaN, Inf or a value beyond float32")
    episode = Episode(
        task=task,
        embodiment=spec.name,
        observations=observations,
        actions=arrays["actions"],
        rewards=rewards.astype(np.float32),
        success=_success(arrays.get("success")),
        source=f"converted from {path.name}",
    )
    return episode


def load_npz(
    source: str | Path, spec_file: str | Path, task: str | None = None
) -> tuple[EmbodimentSpec, list[Episode]]:
    """The spec and the checked episodes of a folder of ``.npz`` files (task: ``task``, default
    the spec's name). Raises :class:`ConversionError` listing every file that fails."""
    source = Path(source)
    spec = EmbodimentSpec.from_file(spec_file)
    task = check_task_name(task or spec.name)
    files = sorted(source.glob("*.npz")) if source.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{source}: no .npz episode files found")
    return spec, gather((path.name, partial(load_npz_episode, path, spec, task)) for path in files)


def convert_npz(
    source: str | Path,
    spec_file: str | Path,
    out: str | Path,
    task: str | None = None,
    instruction: str = "",
    episodes_per_shard: int = 16,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert a folder of ``.npz`` episodes into shards of ``task`` under ``out`` (added to its index).

    Returns the dataset index.
    """
    config = ConvertConfig("npz", Path(spec_file), task, instruction, episodes_per_shard, overwrite)
    return convert(source, out, config)[0]


def write_task(
    out: Path,
    task: str,
    spec: EmbodimentSpec,
    episodes: list[Episode],
    episodes_per_shard: int = 16,
    overwrite: bool = False,
    random_returns: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write checked ``episodes`` of ``task`` as shards under ``out`` and add the task to its index
    (the demos' returns are the task's expert normalizer; ``random_returns``, when the source
    knows it, the random one). Returns the index.

    A task already in the index is refused unless ``overwrite``; it is then taken out of the index
    before its shards are touched, so a failure leaves a consistent dataset without it."""
    if not episodes:
        raise ValueError(f"{task}: no episodes to write")
    index: dict[str, Any] = {"tasks": {}}
    if (out / INDEX_FILE).exists():
        index = read_index(out)
        if task in index["tasks"] and not overwrite:
            raise DatasetError(f"{out} already has task {task!r}; pass --overwrite to replace it")
    if task in index["tasks"]:
        # take the task out of the index before touching its shards: a failure below leaves a
        # consistent dataset without it, never an index that lists missing shards
        del index["tasks"][task]
        extra = {k: v for k, v in index.items() if k not in ("tasks", "format_version", "created_by")}
        if index["tasks"]:
            write_index(out, index["tasks"], **extra)
        else:
            (out / INDEX_FILE).unlink()
    writer = TaskShardWriter(out, task, spec, episodes_per_shard)
    for stale in writer.directory.glob("shard-*.tar"):
        stale.unlink()
    for episode in episodes:
        writer.add(episode)
    writer.flush()
    returns = [e.episode_return for e in episodes]
    index["tasks"][task] = {
        "embodiment": spec.name,
        "spec": f"{task}/embodiment.json",
        "episodes": len(episodes),
        "timesteps": sum(e.length for e in episodes),
        "success_rate": round(sum(e.success for e in episodes) / len(episodes), 4),
        "max_steps": max(e.length for e in episodes),
        # the demos are the expert; a random baseline is unknown for user data
        "returns": {
            "dataset": returns_summary(returns),
            "expert": returns_summary(returns),
            "random": random_returns,
        },
        "shards": [vars(s) for s in writer.shards],
    }
    extra = {k: v for k, v in index.items() if k not in ("tasks", "format_version", "created_by")}
    return write_index(out, index["tasks"], **extra)
