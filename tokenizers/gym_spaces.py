"""Gymnasium spaces as embodiment specs.

:class:`SpaceMapping` reads a gymnasium environment's observation and action spaces once and
knows three things: the :class:`~gato_like.tokenizers.spec.EmbodimentSpec` they describe, how an
observation of the space becomes the spec's ``{key: array}``, and how the spec's action becomes
the action the environment takes.

==================================  =======================================================
gymnasium space                     spec entry
==================================  =======================================================
``Box`` uint8 ``(H, W, 1|3)``       ``image`` (key ``pixels`` at the top level)
``Box`` float                       ``proprio``; ``low``/``high`` where every bound is finite
``Box`` integer in ``[0, 1024)``    ``discrete`` with ``num_values = max(high) + 1``
``Discrete(n, start)``              ``discrete`` ``[1]``, ``num_values = n`` (``start`` subtracted)
``MultiDiscrete(nvec, start)``      ``discrete`` of ``nvec``'s shape, ``num_values = max(nvec)``
``MultiBinary(n)``                  ``discrete``, ``num_values = 2``
``Text``                            ``text``
``Dict`` / ``Tuple``                one key per leaf: ``outer/inner``, ``0``, ``1``, ...
action ``Box`` float, finite        ``continuous`` with the space's bounds
action ``Discrete(n, start)``       ``discrete`` ``[1]``, ``num_choices = n``
action ``MultiDiscrete`` (one n)    ``discrete`` of its shape, ``num_choices = n``
action ``MultiBinary(n)``           ``discrete`` ``[n]``, ``num_choices = 2``
==================================  =======================================================

Anything else (``Graph``, ``Sequence``, ``OneOf``, an action ``Box`` with infinite bounds, a
``Dict`` action, more than 1024 values) raises :class:`~gato_like.tokenizers.spec.SpecError`
that names the space and where it sits, with every problem at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from gato_like.tokenizers.spec import KEY_PATTERN, MAX_BOUND, EmbodimentSpec, SpecError
from gato_like.tokenizers.vocab import DISCRETE_VALUES

_SUPPORTED = "Box, Discrete, MultiDiscrete, MultiBinary, Text, or a Dict/Tuple of them"


@dataclass(frozen=True)
class _Leaf:
    """One spec key: where its value sits in the gymnasium observation and how to convert it."""

    key: str
    path: tuple[str | int, ...]
    entry: dict[str, Any]
    offset: Any = 0  # Discrete/MultiDiscrete ``start``, subtracted
    scalar: bool = False  # a () value, stored as shape (1,)


def _where(path: tuple[str | int, ...], what: str = "observation space") -> str:
    return what + "".join(f"[{p!r}]" for p in path)


def _key(parts: tuple[str | int, ...], leaf_default: str) -> str:
    if not parts:
        return leaf_default
    key = "/".join(re.sub(r"[^A-Za-z0-9_\-]", "_", str(p)) for p in parts)
    return key if KEY_PATTERN.match(key) else "_" + key


def control_hz_of(env: Any) -> float | None:
    """A gymnasium environment's control rate: ``1 / dt`` (or ``1 / tau``), else its metadata's
    ``render_fps``; None when it states neither."""
    unwrapped = getattr(env, "unwrapped", env)
    dt = getattr(unwrapped, "dt", None) or getattr(unwrapped, "tau", None)
    if isinstance(dt, (int, float)) and dt > 0:
        return 1.0 / float(dt)
    fps = (getattr(env, "metadata", {}) or {}).get("render_fps")
    return float(fps) if fps else None


class SpaceMapping:
    """A gymnasium observation and action space, read as an embodiment spec (module doc)."""

    def __init__(self, observation_space: Any, action_space: Any, name: str, control_hz: float) -> None:
        self.observation_space = observation_space
        self.action_space = action_space
        problems: list[str] = []
        self.leaves: list[_Leaf] = []
        self._observation(observation_space, (), problems)
        keys = [leaf.key for leaf in self.leaves]
        for key in sorted({k for k in keys if keys.count(k) > 1}):
            problems.append(f"observation space: two leaves map to the key {key!r}; rename one")
        action = self._action(action_space, problems)
        if problems:
            raise SpecError(name, problems)
        self.action_offset = action.pop("_offset", 0)
        self.spec = EmbodimentSpec.from_dict(
            {
                "name": name,
                "control_hz": control_hz,
                "observations": {leaf.key: leaf.entry for leaf in self.leaves},
                "action": action,
                "description": f"derived from gymnasium spaces {observation_space} -> {action_space}",
            }
        )

    @classmethod
    def of(cls, env: Any, name: str | None = None, control_hz: float | None = None) -> SpaceMapping:
        """From an environment (or a ``(observation_space, action_space)`` pair). ``name``: the
        embodiment name (default ``gym-<env id>``); ``control_hz`` (default: ``1 / env.dt``, else
        the metadata's ``render_fps``)."""
        if isinstance(env, tuple) and len(env) == 2:
            observation_space, action_space, env_id, hz = env[0], env[1], None, None
        else:
            observation_space, action_space = env.observation_space, env.action_space
            env_id = getattr(getattr(env, "spec", None), "id", None)
            hz = control_hz_of(env)
        name = name or (f"gym-{env_id}" if env_id else None)
        if not name:
            raise ValueError("SpaceMapping.of: the environment has no id; pass name=")
        control_hz = control_hz or hz
        if not control_hz:
            raise ValueError(
                f"{name}: the environment states no control rate (no dt, no metadata render_fps); pass control_hz="
            )
        return cls(observation_space, action_space, name, float(control_hz))

    # -- the spec -------------------------------------------------------------------------------

    def _observation(self, space: Any, path: tuple[str | int, ...], problems: list[str]) -> None:
        from gymnasium import spaces

        where = _where(path)
        if isinstance(space, spaces.Dict):
            for k, sub in space.spaces.items():
                self._observation(sub, (*path, k), problems)
            return
        if isinstance(space, spaces.Tuple):
            for i, sub in enumerate(space.spaces):
                self._observation(sub, (*path, i), problems)
            return
        if isinstance(space, spaces.Box):
            shape = tuple(int(n) for n in space.shape)
            dtype = np.dtype(space.dtype)
            if dtype == np.uint8 and len(shape) == 3 and shape[2] in (1, 3):
                self.leaves.append(_Leaf(_key(path, "pixels"), path, {"kind": "image", "shape": list(shape)}))
                return
            scalar = shape == ()
            shape = shape or (1,)
            if dtype.kind == "f":
                entry: dict[str, Any] = {"kind": "proprio", "shape": list(shape)}
                low, high = np.asarray(space.low, np.float64), np.asarray(space.high, np.float64)
                if (
                    (np.abs(low) <= MAX_BOUND).all()
                    and (np.abs(high) <= MAX_BOUND).all()
                    and (low < high).all()
                ):
                    entry["low"] = np.broadcast_to(low, shape).tolist()
                    entry["high"] = np.broadcast_to(high, shape).tolist()
                self.leaves.append(_Leaf(_key(path, "observation"), path, entry, scalar=scalar))
                return
            if dtype.kind in "iub":
                low, high = np.asarray(space.low), np.asarray(space.high)
                if (low < 0).any() or (high >= DISCRETE_VALUES).any():
                    problems.append(
                        f"{where}: {space!r}: integer values in [{low.min()}, {high.max()}] cannot be "
                        f"discrete tokens; expected values in [0, {DISCRETE_VALUES})"
                    )
                    return
                entry = {"kind": "discrete", "shape": list(shape), "num_values": int(high.max()) + 1}
                self.leaves.append(_Leaf(_key(path, "observation"), path, entry, scalar=scalar))
                return
            problems.append(f"{where}: {space!r}: unsupported dtype {dtype}")
            return
        if isinstance(space, spaces.Discrete):
            n = int(space.n)
            if n > DISCRETE_VALUES:
                problems.append(f"{where}: {space!r}: {n} values; expected at most {DISCRETE_VALUES}")
                return
            entry = {"kind": "discrete", "shape": [1], "num_values": n}
            self.leaves.append(_Leaf(_key(path, "observation"), path, entry, int(space.start), scalar=True))
            return
        if isinstance(space, spaces.MultiDiscrete):
            n = int(np.max(space.nvec))
            if n > DISCRETE_VALUES:
                problems.append(f"{where}: {space!r}: up to {n} values; expected at most {DISCRETE_VALUES}")
                return
            entry = {"kind": "discrete", "shape": [int(n) for n in space.nvec.shape], "num_values": n}
            self.leaves.append(_Leaf(_key(path, "observation"), path, entry, np.asarray(space.start)))
            return
        if isinstance(space, spaces.MultiBinary):
            entry = {
                "kind": "discrete",
                "shape": [int(n) for n in np.atleast_1d(space.shape)],
                "num_values": 2,
            }
            self.leaves.append(_Leaf(_key(path, "observation"), path, entry))
            return
        if isinstance(space, spaces.Text):
            self.leaves.append(_Leaf(_key(path, "mission"), path, {"kind": "text"}))
            return
        problems.append(
            f"{where}: {space!r} cannot be expressed as an embodiment spec; expected {_SUPPORTED}"
        )

    def _action(self, space: Any, problems: list[str]) -> dict[str, Any]:
        from gymnasium import spaces

        where = "action space"
        if isinstance(space, spaces.Box) and np.dtype(space.dtype).kind == "f":
            low, high = np.asarray(space.low, np.float64), np.asarray(space.high, np.float64)
            if not (np.isfinite(low).all() and np.isfinite(high).all() and (low < high).all()):
                problems.append(
                    f"{where}: {space!r}: continuous actions are binned between finite bounds; wrap the "
                    "environment in a gymnasium.ActionWrapper whose action space has them"
                )
                return {}
            shape = tuple(int(n) for n in space.shape) or (1,)
            return {
                "kind": "continuous",
                "shape": list(shape),
                "low": np.broadcast_to(low, shape).tolist(),
                "high": np.broadcast_to(high, shape).tolist(),
            }
        if isinstance(space, spaces.Discrete):
            if int(space.n) > DISCRETE_VALUES:
                problems.append(f"{where}: {space!r}: expected at most {DISCRETE_VALUES} choices")
                return {}
            return {
                "kind": "discrete",
                "shape": [1],
                "num_choices": int(space.n),
                "_offset": int(space.start),
            }
        if isinstance(space, spaces.MultiDiscrete):
            nvec = np.asarray(space.nvec)
            if (nvec != nvec.flat[0]).any() or int(nvec.flat[0]) > DISCRETE_VALUES:
                problems.append(
                    f"{where}: {space!r}: a discrete action has one number of choices for every element "
                    f"(at most {DISCRETE_VALUES}); got {nvec.tolist()}"
                )
                return {}
            return {
                "kind": "discrete",
                "shape": [int(n) for n in nvec.shape],
                "num_choices": int(nvec.flat[0]),
                "_offset": np.asarray(space.start),
            }
        if isinstance(space, spaces.MultiBinary):
            return {
                "kind": "discrete",
                "shape": [int(n) for n in np.atleast_1d(space.shape)],
                "num_choices": 2,
            }
        problems.append(
            f"{where}: {space!r} cannot be expressed as an embodiment spec; expected a Box with finite "
            "bounds, Discrete, MultiDiscrete or MultiBinary (one action per timestep)"
        )
        return {}

    # -- conversion -----------------------------------------------------------------------------

    def observation(self, observation: Any) -> dict[str, Any]:
        """A gymnasium observation -> the spec's ``{key: array}`` (text: a ``str``)."""
        out: dict[str, Any] = {}
        for leaf in self.leaves:
            value = observation
            for part in leaf.path:
                value = value[part]
            if leaf.entry["kind"] == "text":
                out[leaf.key] = str(value)
                continue
            array = np.asarray(value)
            if leaf.entry["kind"] == "discrete":
                array = array.astype(np.int64) - leaf.offset
            elif leaf.entry["kind"] == "proprio":
                array = array.astype(np.float32)
            out[leaf.key] = array.reshape(leaf.entry["shape"]) if leaf.scalar else array
        return out

    def action(self, action: Any) -> Any:
        """The spec's action (an array of ``spec.action.shape``) -> what ``env.step`` takes."""
        from gymnasium import spaces

        array = np.asarray(action)
        space = self.action_space
        if isinstance(space, spaces.Discrete):
            return int(array.reshape(-1)[0]) + int(self.action_offset)
        if isinstance(space, (spaces.MultiDiscrete, spaces.MultiBinary)):
            return (array.astype(np.int64) + self.action_offset).reshape(space.shape).astype(space.dtype)
        return array.astype(space.dtype).reshape(space.shape)

    def recorded_action(self, env_action: Any) -> np.ndarray:
        """What ``env.step`` took -> the spec's action array (the inverse of :meth:`action`)."""
        shape = self.spec.action.shape
        if self.spec.action.kind == "discrete":
            return (np.asarray(env_action, np.int64) - self.action_offset).reshape(shape)
        return np.asarray(env_action, np.float32).reshape(shape)
