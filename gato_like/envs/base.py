"""The environment interface every simulator of the project implements.

An :class:`Env` is one task of one embodiment with, where it has one, a scripted expert. Data
generation (``gato-like data generate``), evaluation (``gato-like eval``, the rollouts during
training), the benchmarks and the gymnasium adapter all go through this interface only:

    env = get_task("dmc-cartpole-balance")       # or from_gymnasium("Pendulum-v1")
    episode = env.rollout(seed=0, policy="expert")            # an Episode (data_pipelines.episodes)
    episode = env.rollout(seed=1, policy=policy.act, record=True)

``policy``: ``"expert"``, ``"random"`` or a callable from the observation ``{key: array}`` (the
keys of ``env.spec``) to the action. ``render``: include camera observations (``pixels``) where
the body has a camera. ``record``: keep frames for a video (the camera's, or a view of the scene
where the observation has none) in ``episode.observations["pixels"]`` or ``episode.extra["frames"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from gato_like.data_pipelines.episodes import Episode
from gato_like.tokenizers.spec import EmbodimentSpec

#: A policy to roll out: observation ``{key: array}`` -> action array.
Actor = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class Perturbation:
    """DART-style perturbation of an expert rollout (Laskey et al., 2017).

    The environment executes a perturbed action, the episode records the expert's clean action as
    the label. The data then shows states off the expert's own path and how the expert recovers
    from them.

    Attributes:
        noise: standard deviation of the Gaussian noise added to a continuous expert action, in
            units of the action range scaled to [-1, 1] (the executed action is clipped to the bounds).
        random_prob: probability of executing a uniformly random action instead of the expert's
            (continuous and discrete tasks alike; BabyAI's bot replans from wherever it ends up).
        hold: a random action, once drawn, is held for a uniform 1..``hold`` steps (continuous
            tasks): a push long enough to leave the expert's neighbourhood, so the data holds
            whole recoveries (point mass otherwise spends ~94 % of its steps at the target).
    """

    noise: float = 0.0
    random_prob: float = 0.0
    hold: int = 1

    def __post_init__(self) -> None:
        problems = []
        if not (
            isinstance(self.noise, (int, float)) and np.isfinite(self.noise) and 0.0 <= self.noise <= 2.0
        ):
            problems.append(
                f"noise: expected a standard deviation in [0, 2] (action range [-1, 1]), got {self.noise!r}"
            )
        if not (isinstance(self.random_prob, (int, float)) and 0.0 <= self.random_prob < 1.0):
            problems.append(f"random_prob: expected a probability in [0, 1), got {self.random_prob!r}")
        if not (isinstance(self.hold, int) and not isinstance(self.hold, bool) and 1 <= self.hold <= 1000):
            problems.append(f"hold: expected an integer number of steps in [1, 1000], got {self.hold!r}")
        if problems:
            raise ValueError("perturbation: " + "; ".join(problems))

    @property
    def active(self) -> bool:
        return self.noise > 0 or self.random_prob > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": "dart",
            "noise": float(self.noise),
            "random_prob": float(self.random_prob),
            "hold": int(self.hold),
        }


class Env(Protocol):
    """One task of one embodiment: ``name`` (the task), ``embodiment``, ``spec``, ``max_steps``
    (the episode length of its data), and :meth:`rollout`."""

    name: str
    max_steps: int

    @property
    def spec(self) -> EmbodimentSpec: ...

    @property
    def embodiment(self) -> str: ...

    def rollout(
        self,
        seed: int,
        policy: str | Actor = "expert",
        render: bool = True,
        max_steps: int | None = None,
        perturbation: Perturbation | None = None,
        record: bool = False,
    ) -> Episode: ...
