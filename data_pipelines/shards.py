"""Shards on disk: WebDataset tar files of episodes, an embodiment spec per task, one index.

::

    DIR/index.json                          counts, sha256 checksums, return normalizers
    DIR/<task>/embodiment.json
    DIR/<task>/shard-000000.tar             one sample per episode: <key>.json + <key>.npz

Every file is written to a temporary name and renamed into place, so an interrupted run leaves no
half-written shard; the index is written last, so a dataset without ``index.json`` is incomplete.
Tar members carry fixed times and owners: the same episodes always give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gato_like import __version__
from gato_like.data_pipelines.episodes import Episode, EpisodeFormatError
from gato_like.tokenizers.spec import EmbodimentSpec

INDEX_FILE = "index.json"
SPEC_FILE = "embodiment.json"
INDEX_VERSION = 1
TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ShardInfo:
    path: str
    episodes: int
    timesteps: int
    bytes: int
    sha256: str


@dataclass
class TaskShardWriter:
    """Writes one task's episodes into ``shard-NNNNNN.tar`` files of ``episodes_per_shard`` episodes."""

    root: Path
    task: str
    spec: EmbodimentSpec
    episodes_per_shard: int = 16
    shards: list[ShardInfo] = field(default_factory=list)
    _pending: list[tuple[str, Episode]] = field(default_factory=list)
    _count: int = 0

    def __post_init__(self) -> None:
        if self.episodes_per_shard < 1:
            raise ValueError(f"episodes_per_shard: expected >= 1, got {self.episodes_per_shard}")
        self.directory = self.root / check_task_name(self.task)
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(".*.tmp"):
            stale.unlink()
        atomic_write_bytes(self.directory / SPEC_FILE, self.spec.to_json().encode())

    def add(self, episode: Episode) -> None:
        episode.check(self.spec)
        self._pending.append((f"{self.task}-{self._count:06d}", episode))
        self._count += 1
        if len(self._pending) >= self.episodes_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        path = self.directory / f"shard-{len(self.shards):06d}.tar"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for key, episode in self._pending:
                    for suffix, data in sorted(episode.to_sample(key).items()):
                        if suffix.startswith("__"):
                            continue
                        assert isinstance(data, bytes)
                        info = tarfile.TarInfo(f"{key}.{suffix}")
                        info.size, info.mtime, info.mode = len(data), 0, 0o444
                        info.uname = info.gname = "gato-like"
                        tar.addfile(info, fileobj=_BytesReader(data))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.shards.append(
            ShardInfo(
                path=str(path.relative_to(self.root)),
                episodes=len(self._pending),
                timesteps=sum(e.length for _, e in self._pending),
                bytes=path.stat().st_size,
                sha256=sha256_file(path),
            )
        )
        self._pending = []


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self._at = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size < 0 else min(self._at + size, len(self._view))
        chunk = self._view[self._at : end].tobytes()
        self._at = end
        return chunk


# -- the index ---------------------------------------------------------------------------------------


def write_index(root: Path, tasks: dict[str, dict[str, Any]], **extra: Any) -> dict[str, Any]:
    index = {
        "format_version": INDEX_VERSION,
        "created_by": f"gato-like {__version__}",
        **extra,
        "tasks": tasks,
    }
    atomic_write_bytes(root / INDEX_FILE, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    return index


class DatasetError(ValueError):
    """A dataset directory that cannot be used as it is; the message says what and where."""


def read_index(root: str | Path) -> dict[str, Any]:
    """The dataset's ``index.json`` (local folders; remote datasets read theirs through fsspec/URL)."""
    path = Path(root) / INDEX_FILE
    if not path.is_file():
        hint = (
            " (generation interrupted? shards without an index are incomplete)" if Path(root).is_dir() else ""
        )
        raise DatasetError(
            f"{root}: no {INDEX_FILE}{hint}; make one with `gato-like data generate` or `data convert`"
        )
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not valid UTF-8 JSON ({error})") from error
    return check_index(index, str(path))


def check_index(index: Any, where: str) -> dict[str, Any]:
    """The index if it has the expected structure, else a DatasetError naming ``where``."""
    if not isinstance(index, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(index).__name__}")
    if index.get("format_version") != INDEX_VERSION:
        raise DatasetError(
            f"{where}: format_version {index.get('format_version')!r}, expected {INDEX_VERSION}"
        )
    tasks = index.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise DatasetError(f"{where}: expected a non-empty 'tasks' object")
    for task, entry in tasks.items():
        missing = [
            k
            for k in ("spec", "episodes", "shards", "returns")
            if not isinstance(entry, dict) or k not in entry
        ]
        if missing:
            raise DatasetError(f"{where}: task {task!r} lacks {missing}")
    return index


def check_task_name(task: str) -> str:
    """Task names become folder names and WebDataset keys: letters, digits, '_' and '-' only."""
    if not TASK_NAME.fullmatch(task):
        raise ValueError(
            f"task name {task!r}: expected letters, digits, '_' and '-' only (no dots or slashes)"
        )
    return task


def load_spec(root: str | Path, task: str) -> EmbodimentSpec:
    return EmbodimentSpec.from_file(Path(root) / task / SPEC_FILE)


def verify(root: str | Path) -> list[str]:
    """Problems found by re-hashing every shard listed in the index (empty when all is well)."""
    root = Path(root)
    problems = []
    for task, entry in read_index(root)["tasks"].items():
        for shard in entry["shards"]:
            path = root / shard["path"]
            if not path.is_file():
                problems.append(f"{task}: {shard['path']} is missing")
            elif sha256_file(path) != shard["sha256"]:
                problems.append(f"{task}: {shard['path']} does not match its sha256 in {INDEX_FILE}")
    return problems


def iter_shard(path: str | Path) -> Iterator[Episode]:
    """Episodes of one local shard, in order, without webdataset (for tools and tests)."""
    path = Path(path)
    try:
        with tarfile.open(path, "r") as tar:
            samples: dict[str, dict[str, Any]] = {}
            order: list[str] = []
            for member in tar:
                if not member.isfile():
                    continue
                key, _, suffix = member.name.partition(".")
                if key not in samples:
                    samples[key] = {"__key__": key}
                    order.append(key)
                handle = tar.extractfile(member)
                assert handle is not None
                samples[key][suffix] = handle.read()
    except (tarfile.TarError, EOFError, OSError) as error:
        raise EpisodeFormatError(f"{path}: not a readable tar shard ({error})") from error
    for key in order:
        yield Episode.from_sample(samples[key], where=str(path))


def iter_task(root: str | Path, task: str) -> Iterator[Episode]:
    """Episodes of one task of a local dataset, shard by shard, in index order."""
    root = Path(root)
    for shard in read_index(root)["tasks"][task]["shards"]:
        yield from iter_shard(root / shard["path"])


def returns_summary(returns: list[float]) -> dict[str, float]:
    array = np.asarray(returns, dtype=np.float64)
    return {
        "mean": round(float(array.mean()), 4),
        "std": round(float(array.std()), 4),
        "episodes": len(returns),
    }
