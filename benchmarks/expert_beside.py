"""A checkpoint's policy driving a control task, with the task's scripted expert asked for its
action at the same physics on every step: what ``benchmarks/pendulum_energy.py`` and
``benchmarks/cartpole_top.py`` read a policy's departures from. Not a script of its own."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from gato_like.envs.registry import get_task
from gato_like.policy import Policy
from gato_like.training.evaluate import eval_seed

#: what a script keeps of one step: ``row(physics, the expert, the policy's action, the expert's action)``
Row = Callable[[Any, Any, np.ndarray, float], tuple[float, ...]]


class ExpertBeside:
    """``policy`` as the simulator's actor in task ``name``, keeping ``row(...)`` per step in ``rows``;
    ``expert_class(physics)`` builds the task's scripted expert from the episode's own physics."""

    def __init__(self, policy: Policy, name: str, expert_class: Callable[[Any], Any], row: Row) -> None:
        self.policy, self.name, self.expert_class, self.row = policy, name, expert_class, row
        self.task = get_task(name)
        self.keys = frozenset(policy.checkpoint.spec_for(name).observations)
        self.expert: Any = None
        self.rows: list[tuple[float, ...]] = []

    def __call__(self, observation: dict[str, np.ndarray]) -> np.ndarray:
        physics = self.task._envs[os.getpid()].physics  # the simulator reuses one environment a process
        if self.expert is None:
            self.expert = self.expert_class(physics)
        action = self.policy.act({k: v for k, v in observation.items() if k in self.keys})
        self.rows.append(self.row(physics, self.expert, action, float(self.expert(physics)[0])))
        return action

    def episode(self, seed: int, index: int) -> tuple[Any, np.ndarray]:
        """The evaluation's ``index``-th unseen episode under ``seed`` (as ``gato-like eval --seed``):
        the played episode and its rows ``(T, len(row))``."""
        self.rows = []
        self.policy.reset(self.name)
        played = self.task.rollout(eval_seed(self.name, seed, index), self, render=False)
        return played, np.array(self.rows)
