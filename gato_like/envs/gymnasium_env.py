"""A user's gymnasium environment as an :class:`~gato_like.envs.base.Env`: roll a policy (or uniform-random actions) out in it,
with observations and actions in the embodiment spec derived from its spaces
(:class:`~gato_like.tokenizers.gym_spaces.SpaceMapping`).

    task = GymTask("InvertedPendulum-v5")          # any registered id, or a factory
    episode = task.rollout(seed=0, policy=policy.act)   # Policy.act of a fine-tuned checkpoint

It has no scripted expert: ``rollout(policy="expert")`` is refused, and ``gato-like eval --gym``
reports raw returns beside a uniform-random policy's instead of an expert-normalized score.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from gato_like.data_pipelines.episodes import Episode
from gato_like.envs.base import Actor, Perturbation
from gato_like.tokenizers.gym_spaces import SpaceMapping
from gato_like.tokenizers.spec import EmbodimentSpec

#: Episode length when the environment's registration states none.
DEFAULT_MAX_STEPS = 1000


class GymTask:
    """A gymnasium environment behind the :class:`~gato_like.envs.base.Env` interface.

    ``env``: a registered id (``"CartPole-v1"``) or a callable ``render_mode -> env``.
    ``name``: the task and embodiment name (default ``gym-<id>``); ``make_kwargs`` go to
    ``gymnasium.make``; ``control_hz`` overrides the rate read from the environment.
    """

    def __init__(
        self,
        env: str | Callable[..., Any],
        name: str | None = None,
        control_hz: float | None = None,
        **make_kwargs: Any,
    ) -> None:
        self._env_id = env if isinstance(env, str) else None
        self._factory = env if callable(env) else None
        self._make_kwargs = make_kwargs
        probe = self._make(None)
        try:
            self.mapping = SpaceMapping.of(probe, name=name, control_hz=control_hz)
            registered = getattr(getattr(probe, "spec", None), "max_episode_steps", None)
        finally:
            probe.close()
        self.name = self.mapping.spec.name
        self.max_steps = int(registered or DEFAULT_MAX_STEPS)

    def _make(self, render_mode: str | None) -> Any:
        if render_mode == "rgb_array" and not (
            os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
        ):
            # offscreen frames need no display; without this, pygame-drawn environments (CartPole)
            # print SDL's "error: XDG_RUNTIME_DIR is invalid" on a headless machine
            os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
        if self._factory is not None:
            return self._factory(render_mode=render_mode)
        import gymnasium as gym

        assert self._env_id is not None  # an id whenever there is no factory

        try:
            return gym.make(self._env_id, render_mode=render_mode, **self._make_kwargs)
        except gym.error.Error as error:  # unknown id, missing extra (e.g. gymnasium[mujoco]), ...
            raise ValueError(f"gymnasium environment {self._env_id!r}: {error}") from error

    @property
    def spec(self) -> EmbodimentSpec:
        return self.mapping.spec

    @property
    def embodiment(self) -> str:
        return self.mapping.spec.name

    def rollout(
        self,
        seed: int,
        policy: str | Actor = "random",
        render: bool = False,
        max_steps: int | None = None,
        perturbation: Perturbation | None = None,
        record: bool = False,
    ) -> Episode:
        """One episode from ``seed``: ``policy`` is ``random`` (the action space's own uniform
        samples) or a callable from the spec's observation ``{key: array}`` to the spec's action.
        ``record``: keep the environment's RGB frames in ``extra["frames"]`` (for a GIF;
        ``render`` is ignored: the observations are what the spaces give). Ends at termination,
        truncation or ``max_steps``."""
        if policy == "expert":
            raise ValueError(
                f"{self.name}: a gymnasium environment has no scripted expert; roll out a policy or 'random'"
            )
        if perturbation is not None and perturbation.active:
            raise ValueError(f"{self.name}: perturbations apply to scripted experts only")
        env = self._make("rgb_array" if record else None)
        try:
            observation, info = env.reset(seed=seed)
            env.action_space.seed(seed)
            observations: dict[str, list[Any]] = {k: [] for k in self.spec.observations}
            actions, rewards, frames = [], [], []
            success = False
            for _ in range(max_steps or self.max_steps):
                converted = self.mapping.observation(observation)
                for key, value in converted.items():
                    observations[key].append(value)
                if record:
                    frames.append(np.asarray(env.render(), dtype=np.uint8))
                if callable(policy):
                    action = np.asarray(policy(converted)).reshape(self.spec.action.shape)
                    env_action = self.mapping.action(action)
                else:
                    env_action = env.action_space.sample()
                    action = self.mapping.recorded_action(env_action)
                actions.append(action)
                observation, reward, terminated, truncated, info = env.step(env_action)
                rewards.append(float(reward))
                success = success or bool(info.get("is_success", False))
                if terminated or truncated:
                    break
        finally:
            env.close()
        stacked = {
            k: np.asarray(v, dtype=str) if self.spec.observations[k].kind == "text" else np.stack(v)
            for k, v in observations.items()
        }
        return Episode(
            task=self.name,
            embodiment=self.embodiment,
            observations=stacked,
            actions=np.stack(actions).astype(self.spec.action.dtype),
            rewards=np.asarray(rewards, np.float32),
            success=success,
            source="gymnasium",
            seed=seed,
            extra={"frames": np.stack(frames)} if frames else {},
        )
