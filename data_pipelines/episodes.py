"""The episode format on disk: one WebDataset sample per episode.

``<key>.json``: metadata: embodiment, task, instruction, length, return, success, source, seed.
``<key>.npz``:  arrays: ``obs.<key>`` ``(T, ...)`` per observation key (images uint8 ``(T, H, W, C)``,
text as unicode strings ``(T,)``), ``actions`` ``(T, ...)``, ``rewards`` ``(T,)`` float32.

The npz is written with fixed zip timestamps so the same episode always gives the same bytes, and
read with ``allow_pickle=False``: nothing is ever unpickled.
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gato_like.tokenizers.spec import EmbodimentSpec, SpecMismatchError

FORMAT_VERSION = 1
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class EpisodeFormatError(ValueError):
    """An episode sample that cannot be read; the message names the sample and what is wrong."""


@dataclass
class Episode:
    """One episode in memory. T = timesteps.

    Attributes:
        task: task name (``dmc-cartpole-swingup``).
        embodiment: embodiment spec name.
        observations: per key ``(T, *shape)`` (text: ``(T,)`` str).
        actions: ``(T, *action.shape)``.
        rewards: float32 ``(T,)``: reward received after each action.
        executed_actions: ``(T, *action.shape)`` or None: the actions the environment executed,
            where they differ from the recorded labels (a perturbed expert rollout records the
            expert's clean action in ``actions``); the dynamics head reads these as its inputs.
            Stored as the optional ``executed_actions`` array of the ``.npz``.
    """

    task: str
    embodiment: str
    observations: dict[str, np.ndarray]
    actions: np.ndarray
    rewards: np.ndarray
    instruction: str = ""
    success: bool = False
    source: str = "generated"
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    key: str = ""
    """The sample key in its shard (set when read back)."""
    executed_actions: np.ndarray | None = None

    @property
    def length(self) -> int:
        return len(self.actions)

    @property
    def episode_return(self) -> float:
        return float(np.sum(self.rewards, dtype=np.float64))

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "task": self.task,
            "embodiment": self.embodiment,
            "instruction": self.instruction,
            "length": self.length,
            "return": round(self.episode_return, 6),
            "success": bool(self.success),
            "source": self.source,
            "seed": self.seed,
            **({"extra": self.extra} if self.extra else {}),
        }

    def check(self, spec: EmbodimentSpec) -> None:
        """Validate against the embodiment spec (raises ``SpecMismatchError`` naming each key)."""
        spec.check_episode(self.observations, self.actions)
        if self.rewards.shape != (self.length,):
            raise ValueError(f"rewards: expected shape ({self.length},), got {self.rewards.shape}")
        if self.executed_actions is not None:
            problems = spec.action.violations(self.executed_actions, (self.length,), key="executed_actions")
            if problems:
                raise SpecMismatchError(spec.name, problems)

    # -- bytes -----------------------------------------------------------------------------------

    def to_sample(self, key: str) -> dict[str, bytes | str]:
        """The WebDataset sample: ``{"__key__", "json", "npz"}`` with deterministic bytes."""
        arrays = {f"obs.{k}": _storable(v) for k, v in sorted(self.observations.items())}
        arrays["actions"] = np.asarray(self.actions)
        arrays["rewards"] = np.asarray(self.rewards, dtype=np.float32)
        if self.executed_actions is not None:
            arrays["executed_actions"] = np.asarray(self.executed_actions)
        return {
            "__key__": key,
            "json": json.dumps(self.metadata(), sort_keys=True).encode(),
            "npz": write_npz(arrays),
        }

    @classmethod
    def from_sample(cls, sample: dict[str, Any], where: str = "?") -> Episode:
        """Parse a sample read back from a shard; ``where`` (shard and key) goes into any error."""
        key = sample.get("__key__", "?")
        location = f"{where}: sample {key!r}"
        for part in ("json", "npz"):
            if part not in sample:
                present = sorted(k for k in sample if not k.startswith("__"))
                raise EpisodeFormatError(f"{location}: missing '{part}' member (found {present})")
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise EpisodeFormatError(f"{location}: .json is not valid JSON ({error})") from error
        arrays = read_npz(sample["npz"], location)
        for required in ("actions", "rewards"):
            if required not in arrays:
                raise EpisodeFormatError(
                    f"{location}: .npz has no '{required}' array (found {sorted(arrays)})"
                )
        for required in ("task", "embodiment"):
            if required not in meta:
                raise EpisodeFormatError(f"{location}: .json has no '{required}' field")
        observations = {k[4:]: v for k, v in arrays.items() if k.startswith("obs.")}
        return cls(
            task=meta["task"],
            embodiment=meta["embodiment"],
            observations=observations,
            actions=arrays["actions"],
            rewards=arrays["rewards"],
            instruction=meta.get("instruction", ""),
            success=bool(meta.get("success", False)),
            source=meta.get("source", "?"),
            seed=meta.get("seed"),
            extra=meta.get("extra", {}),
            key=str(key),
            executed_actions=arrays.get("executed_actions"),
        )


def _storable(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == object:  # text: unicode, never object arrays (those would need pickle)
        return array.astype(str)
    return array


def write_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` (readable by ``np.load``) with fixed timestamps: same arrays, same bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            archive.writestr(info, member.getvalue(), compresslevel=6)
    return buffer.getvalue()


def read_npz(data: bytes, location: str = "?") -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` payload, without unpickling anything."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise EpisodeFormatError(
            f"{location}: .npz is corrupt or not an npz ({type(error).__name__}: {error})"
        ) from error
