"""``gato-like data inspect``: what a dataset holds, as a table, a frame montage and an animation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gato_like.data_pipelines.shards import iter_shard, load_spec, read_index
from gato_like.tokenizers import SequenceBuilder, TextTokenizer


def summarize(root: str | Path) -> list[dict[str, Any]]:
    """One row per task: counts, lengths, returns, normalizers and tokens per timestep."""
    root = Path(root)
    index = read_index(root)
    text = TextTokenizer()
    rows = []
    for task, entry in sorted(index["tasks"].items()):
        builder = SequenceBuilder(load_spec(root, task), text)
        first = next(iter_shard(root / entry["shards"][0]["path"]))
        tokens = len(builder.build(first.observations, first.actions)) / first.length
        returns = entry["returns"]
        rows.append(
            {
                "task": task,
                "episodes": entry["episodes"],
                "timesteps": entry["timesteps"],
                "mean length": entry["timesteps"] / entry["episodes"],
                "dataset return": returns["dataset"]["mean"],
                "expert return": returns["expert"]["mean"] if returns.get("expert") else None,
                "random return": returns["random"]["mean"] if returns.get("random") else None,
                "success": entry["success_rate"],
                "tokens/timestep": tokens,
                "tokens": int(tokens * entry["timesteps"]),
            }
        )
    return rows


def frames_of(root: str | Path, task: str, episodes: int = 1) -> list[np.ndarray]:
    """The image frames ``(T, H, W, 3)`` of the first ``episodes`` episodes of ``task`` (empty if none)."""
    root = Path(root)
    spec = load_spec(root, task)
    keys = spec.keys_by_kind("image")
    if not keys:
        return []
    out = []
    for shard in read_index(root)["tasks"][task]["shards"]:
        for episode in iter_shard(root / shard["path"]):
            frames = episode.observations[keys[0]]
            out.append(np.repeat(frames, 3, axis=-1) if frames.shape[-1] == 1 else frames)
            if len(out) == episodes:
                return out
    return out


def write_montage(root: str | Path, path: str | Path, per_task: int = 6) -> Path:
    """A PNG grid: one row per image task, ``per_task`` frames evenly spaced through its first episode."""
    from PIL import Image

    rows = []
    for task in sorted(read_index(root)["tasks"]):
        frames = frames_of(root, task)
        if frames:
            episode = frames[0]
            picks = np.linspace(0, len(episode) - 1, per_task).round().astype(int)
            rows.append(np.concatenate([episode[i] for i in picks], axis=1))
    if not rows:
        raise ValueError(f"{root}: no task has image observations to show")
    width = max(r.shape[1] for r in rows)
    grid = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)
    path = Path(path)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.Resampling.NEAREST).save(path)
    return path


def save_gif(frames: np.ndarray, path: str | Path, fps: int = 25, max_frames: int = 250) -> Path:
    """Frames ``(T, H, W, 3)`` uint8 as a looping GIF, each pixel scaled up 3x."""
    from PIL import Image

    images = [
        Image.fromarray(f).resize((f.shape[1] * 3, f.shape[0] * 3), Image.Resampling.NEAREST)
        for f in frames[:max_frames]
    ]
    path = Path(path)
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def write_animation(
    root: str | Path, task: str, path: str | Path, fps: int = 25, max_frames: int = 250
) -> Path:
    """A GIF of the first episode of ``task``."""
    frames = frames_of(root, task)
    if not frames:
        raise ValueError(f"{task}: no image observations to animate")
    return save_gif(frames[0], path, fps, max_frames)
