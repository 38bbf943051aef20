"""``gato-like data convert --from lerobot PATH``: a LeRobot dataset (format v3.0: parquet frames,
mp4 videos, ``meta/info.json``) as shards of one task. Read with pyarrow and PyAV; the ``lerobot``
package is not needed.

The embodiment spec is derived from ``meta/info.json``'s features:

- ``observation.images.<camera>`` (``video`` or ``image``, ``[H, W, 3]``): an image key
  ``<camera>``; videos are decoded frame by frame and matched to each episode's timestamps, images
  (PNG or JPEG bytes in the data parquet) decoded with Pillow;
- any other ``observation.<name>`` of floats with one dimension: a proprio key ``<name>``;
- ``action`` (floats, one dimension): a continuous action, bounded by the dataset's own min and
  max (``meta/stats.json``);
- ``next.reward`` and ``next.success``/``next.done``: the rewards and the success flag;
- the task text of each episode (``meta/tasks.parquet``): its instruction.

Anything else under ``observation.`` (strings, nested shapes, integers of unknown range) is refused
with its name. ``--spec`` replaces the derived spec: each of its keys is read from
``observation.<key>``, from ``observation.images.<key>`` (or the one camera for its one image
key), or from the entries of ``observation.state`` whose ``names`` start with ``<key>.`` (so a
state vector splits into the keys of a simulator's body). Every episode is converted and checked
before anything is written.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from gato_like.data_pipelines.convert import gather
from gato_like.data_pipelines.episodes import Episode
from gato_like.data_pipelines.shards import check_task_name
from gato_like.tokenizers.spec import EmbodimentSpec

#: The LeRobot dataset format versions this reader knows.
SUPPORTED_VERSIONS = ("v3.0",)
#: Columns of every LeRobot frame that are bookkeeping, not observations.
BOOKKEEPING = ("timestamp", "frame_index", "episode_index", "index", "task_index")
#: Seconds within which a decoded frame's time must match the timestamp it stands for.
TOLERANCE_S = 1e-3


def _imports() -> tuple[Any, Any]:
    try:
        import av
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ImportError(
            f"--from lerobot needs pyarrow and PyAV: pip install 'gato-like[lerobot]'; import failed: {error}"
        ) from error
    return pq, av


class LeRobotDataset:
    """The parts of a LeRobot v3.0 dataset folder the importer reads."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        info_path = self.root / "meta" / "info.json"
        if not info_path.is_file():
            raise FileNotFoundError(f"{self.root}: not a LeRobot dataset (no meta/info.json)")
        self.info = json.loads(info_path.read_text())
        version = self.info.get("codebase_version")
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"{self.root}: LeRobot format {version!r} is not read here (supported: {', '.join(SUPPORTED_VERSIONS)}); "
                "convert it with lerobot's own upgrade script first"
            )
        self.features: dict[str, dict[str, Any]] = self.info["features"]
        self.fps = float(self.info["fps"])
        pq, _ = _imports()
        self._pq = pq
        episodes = sorted((self.root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
        if not episodes:
            raise FileNotFoundError(f"{self.root}: no meta/episodes/chunk-*/file-*.parquet")
        self.episodes = [row for path in episodes for row in pq.read_table(path).to_pylist()]
        self.episodes.sort(key=lambda row: row["episode_index"])
        stats_path = self.root / "meta" / "stats.json"
        self.stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}

    def frames(self, chunk: int, file: int) -> dict[str, np.ndarray]:
        """The data parquet ``(chunk, file)`` as column arrays."""
        path = self.root / self.info["data_path"].format(chunk_index=chunk, file_index=file)
        table = self._pq.read_table(path)
        return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}

    def tasks(self) -> dict[int, str]:
        path = self.root / "meta" / "tasks.parquet"
        if not path.is_file():
            return {}
        rows = self._pq.read_table(path).to_pylist()
        text = next((k for k in (rows[0] if rows else {}) if k not in ("task_index",)), None)
        return {int(r["task_index"]): str(r[text]) for r in rows} if text else {}


def _video_frames(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every frame of an mp4 as ``(N, H, W, 3)`` uint8 and its times in seconds ``(N,)``."""
    _, av = _imports()
    frames, times = [], []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            times.append(float(frame.pts * stream.time_base))
    return np.stack(frames), np.asarray(times)


def _picture(cell: Any, feature: str) -> np.ndarray:
    """One image cell of a data parquet (``{"bytes": PNG or JPEG, "path": ...}``) as uint8 RGB."""
    import io

    from PIL import Image

    data = cell.get("bytes") if isinstance(cell, dict) else None
    if not data:
        raise ValueError(f"{feature}: an image cell without bytes ({str(cell)[:80]})")
    with Image.open(io.BytesIO(data)) as picture:
        return np.asarray(picture.convert("RGB"), dtype=np.uint8)


def derive_spec(data: LeRobotDataset, name: str) -> tuple[EmbodimentSpec, dict[str, str]]:
    """The spec the features give, and for each spec key the feature it reads."""
    observations: dict[str, Any] = {}
    source: dict[str, str] = {}
    problems = []
    for feature, meta in data.features.items():
        shape, dtype = list(meta.get("shape") or []), meta.get("dtype")
        if feature in BOOKKEEPING or feature.startswith("next.") or feature == "action":
            continue
        if not feature.startswith("observation."):
            problems.append(f"{feature} ({dtype} {shape}): not an observation, action or next.* feature")
            continue
        if dtype in ("video", "image"):
            if len(shape) != 3 or 3 not in (shape[0], shape[-1]):
                problems.append(f"{feature}: expected an RGB image [H, W, 3], got shape {shape}")
                continue
            height, width = (shape[1], shape[2]) if shape[0] == 3 and shape[-1] != 3 else (shape[0], shape[1])
            key = feature.removeprefix("observation.images.").removeprefix("observation.")
            observations[key] = {"kind": "image", "shape": [height, width, 3]}
        elif dtype in ("float32", "float64") and len(shape) == 1:
            key = feature.removeprefix("observation.")
            observations[key] = {"kind": "proprio", "shape": shape}
        else:
            problems.append(
                f"{feature} ({dtype} {shape}): supported observations are images [H, W, 3] (video or image) and "
                "1-d float vectors; give --spec to leave it out"
            )
            continue
        source[key] = feature
    action = data.features.get("action")
    if (
        action is None
        or action.get("dtype") not in ("float32", "float64")
        or len(action.get("shape", [])) != 1
    ):
        problems.append(f"action: expected a 1-d float vector, got {action}")
    if problems:
        raise ValueError(f"{data.root}: features that cannot map to an embodiment spec:\n" + "\n".join(f"  - {p}" for p in problems))  # fmt: skip
    assert action is not None
    size = int(action["shape"][0])
    low = np.asarray(data.stats.get("action", {}).get("min", [-1.0] * size), np.float64)
    high = np.asarray(data.stats.get("action", {}).get("max", [1.0] * size), np.float64)
    high = np.where(high > low, high, low + 1.0)
    spec = EmbodimentSpec.from_dict(
        {
            "name": name,
            "control_hz": data.fps,
            "description": f"derived from LeRobot dataset {data.root.name} (robot_type {data.info.get('robot_type')})",
            "observations": observations,
            "action": {"kind": "continuous", "shape": [size], "low": low.tolist(), "high": high.tolist()},
        }
    )
    return spec, source


def _sources_for(spec: EmbodimentSpec, data: LeRobotDataset) -> dict[str, tuple[str, list[int] | None]]:
    """For a given spec: each key's feature and, for a slice of ``observation.state``, its indices."""
    cameras = [f for f, m in data.features.items() if m.get("dtype") in ("video", "image")]
    images = [k for k, o in spec.observations.items() if o.kind == "image"]
    state_names = list((data.features.get("observation.state") or {}).get("names") or [])
    out: dict[str, tuple[str, list[int] | None]] = {}
    problems = []
    for key, entry in spec.observations.items():
        if f"observation.{key}" in data.features:
            out[key] = (f"observation.{key}", None)
        elif f"observation.images.{key}" in data.features:
            out[key] = (f"observation.images.{key}", None)
        elif entry.kind == "image" and len(images) == 1 and len(cameras) == 1:
            out[key] = (cameras[0], None)
        elif rows := [i for i, n in enumerate(state_names) if str(n).startswith(f"{key}.")]:
            out[key] = ("observation.state", rows)
        else:
            problems.append(
                f"{key}: no feature observation.{key} or observation.images.{key}, and no observation.state "
                f"names starting with '{key}.' (features: {sorted(data.features)})"
            )
    if problems:
        raise ValueError("--spec does not fit the dataset:\n" + "\n".join(f"  - {p}" for p in problems))
    return out


class _Reader:
    """Episodes of one dataset in a spec, each data file and video decoded once."""

    def __init__(self, data: LeRobotDataset, spec: EmbodimentSpec, sources: dict[str, tuple[str, list[int] | None]], task: str) -> None:  # fmt: skip
        self.data, self.spec, self.sources, self.task = data, spec, sources, task
        self.texts = data.tasks()
        self.files: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self.videos: dict[Path, tuple[np.ndarray, np.ndarray]] = {}

    def episode(self, meta: dict[str, Any]) -> Episode:
        index = int(meta["episode_index"])
        where = (int(meta["data/chunk_index"]), int(meta["data/file_index"]))
        if where not in self.files:
            self.files[where] = self.data.frames(*where)
        columns = self.files[where]
        rows = np.flatnonzero(columns["episode_index"] == index)
        if len(rows) == 0:
            raise ValueError("no frames in its data file")
        rows = rows[np.argsort(columns["frame_index"][rows])]

        def column(name: str) -> np.ndarray:
            return np.stack(list(columns[name][rows]))

        observations: dict[str, np.ndarray] = {}
        for key, (feature, part) in self.sources.items():
            if self.spec.observations[key].kind != "image":
                values = column(feature).astype(np.float32)
                observations[key] = values[:, part] if part is not None else values
            elif self.data.features[feature].get("dtype") == "image":  # PNG/JPEG in the parquet
                observations[key] = np.stack([_picture(cell, feature) for cell in columns[feature][rows]])
            else:
                observations[key] = self._video(feature, meta, columns["timestamp"][rows].astype(np.float64))
        actions = column("action").astype(np.float32).reshape(len(rows), *self.spec.action.shape)
        rewards = (
            column("next.reward").astype(np.float32).reshape(len(rows))
            if "next.reward" in columns
            else np.zeros(len(rows), np.float32)
        )
        flag = next((f for f in ("next.success", "next.done") if f in columns), None)
        success = bool(column(flag).reshape(-1)[-1]) if flag is not None else False
        self.spec.check_episode(observations, actions)
        task_index = int(columns["task_index"][rows[0]]) if "task_index" in columns else None
        return Episode(
            task=self.task,
            embodiment=self.spec.name,
            observations=observations,
            actions=actions,
            rewards=rewards,
            instruction=self.texts.get(task_index, "") if task_index is not None else "",
            success=success,
            source=f"lerobot {self.data.root.name} episode {index}",
            seed=index,
        )

    def _video(self, feature: str, meta: dict[str, Any], timestamps: np.ndarray) -> np.ndarray:
        """The frames of ``feature`` at an episode's ``timestamps`` (seconds from its start)."""
        prefix = f"videos/{feature}/"
        chunk, file = int(meta[prefix + "chunk_index"]), int(meta[prefix + "file_index"])
        path = self.data.root / self.data.info["video_path"].format(video_key=feature, chunk_index=chunk, file_index=file)  # fmt: skip
        if path not in self.videos:
            self.videos[path] = _video_frames(path)
        pictures, times = self.videos[path]
        wanted = float(meta[prefix + "from_timestamp"]) + timestamps  # episodes share one file
        nearest = np.abs(times[None, :] - wanted[:, None]).argmin(axis=1)
        off = np.abs(times[nearest] - wanted).max()
        if off > max(TOLERANCE_S, 0.5 / self.data.fps):
            raise ValueError(
                f"{feature}: no video frame within {off:.4f} s of a frame's timestamp ({path.name})"
            )
        return pictures[nearest]


def load_lerobot(
    root: str | Path,
    task: str | None = None,
    spec_file: str | Path | None = None,
    max_episodes: int | None = None,
) -> tuple[EmbodimentSpec, list[Episode]]:
    """The spec and the converted, checked episodes. Raises
    :class:`~gato_like.data_pipelines.convert.ConversionError` listing every episode that fails,
    ``ValueError`` for features that cannot map to a spec."""
    data = LeRobotDataset(root)
    derived_name = str(data.info.get("robot_type") or data.root.name)
    if spec_file is not None:
        spec = EmbodimentSpec.from_file(spec_file)
        sources = _sources_for(spec, data)
    else:
        spec, plain = derive_spec(data, derived_name)
        sources = {k: (f, None) for k, f in plain.items()}
    task = check_task_name(task or spec.name)
    reader = _Reader(data, spec, sources, task)
    chosen = data.episodes[:max_episodes]
    episodes = gather((f"episode {m['episode_index']}", partial(reader.episode, m)) for m in chosen)
    if not episodes:
        raise ValueError(f"{data.root}: no episodes")
    return spec, episodes
