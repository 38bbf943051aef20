"""Simulators and their scripted experts behind one small interface, :class:`Env` (see
:mod:`gato_like.envs.base`): MuJoCo control (dm_control suite and our 3-link arm), BabyAI
(minigrid), captioned frames, and any gymnasium environment (:func:`from_gymnasium`).

Data generation, evaluation, the benchmarks and the gymnasium adapter use only this interface;
none of them knows a simulator by its class. Importing this package imports no simulator: each
loads on a task's first rollout.
"""

from __future__ import annotations

from typing import Any

from gato_like.envs.base import Actor, Env, Perturbation
from gato_like.envs.registry import HELDOUT_TASKS, SUITES, TASKS, get_task, resolve_tasks


def from_gymnasium(env: Any, name: str | None = None, **make_kwargs: Any) -> Env:
    """A gymnasium environment (a registered id such as ``"Pendulum-v1"``, or a factory
    ``render_mode -> env``) as an :class:`Env`; its spaces give the embodiment spec."""
    from gato_like.envs.gymnasium_env import GymTask

    return GymTask(env, name=name, **make_kwargs)


__all__ = [
    "HELDOUT_TASKS",
    "SUITES",
    "TASKS",
    "Actor",
    "Env",
    "Perturbation",
    "from_gymnasium",
    "get_task",
    "resolve_tasks",
]
