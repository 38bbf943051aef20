"""The task registry and the named suites: every built-in :class:`~gato_like.envs.base.Env` by
its task name (``dmc-*`` MuJoCo control, ``arm3-reach``, ``babyai-*``, ``captions``).
"""

from __future__ import annotations

import difflib

from gato_like.envs.babyai import BABYAI_TASKS
from gato_like.envs.base import Env
from gato_like.envs.captions import CaptionTask
from gato_like.envs.control import CONTROL_TASKS, GOAL_TASKS

_BUILT_IN: list[Env] = [*CONTROL_TASKS, *GOAL_TASKS, *BABYAI_TASKS, CaptionTask()]
TASKS: dict[str, Env] = {task.name: task for task in _BUILT_IN}

#: The held-out embodiment for few-shot adaptation: never in a pretraining suite.
HELDOUT_TASKS = ("arm3-reach",)

SUITES: dict[str, tuple[str, ...]] = {
    "default": (
        "dmc-point_mass-easy",
        "dmc-reacher-easy",
        "dmc-cartpole-balance",
        "dmc-cartpole-swingup",
        "dmc-pendulum-swingup",
        "babyai-GoToRedBall",
        "babyai-GoToLocal",
        "babyai-PickupLoc",
        "captions",
    ),
    "control": (
        "dmc-point_mass-easy",
        "dmc-reacher-easy",
        "dmc-cartpole-balance",
        "dmc-cartpole-swingup",
        "dmc-pendulum-swingup",
    ),
    "babyai": ("babyai-GoToRedBall", "babyai-GoToLocal", "babyai-PickupLoc"),
    "heldout": HELDOUT_TASKS,
    "goals": tuple(t.name for t in GOAL_TASKS),
    "smoke": ("dmc-point_mass-easy", "babyai-GoToRedBall", "captions"),
}


def _unknown(kind: str, name: str, known: list[str]) -> KeyError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return KeyError(f"unknown {kind} {name!r}{hint} (known: {', '.join(known)})")


def get_task(name: str) -> Env:
    if name not in TASKS:
        raise _unknown("task", name, sorted(TASKS))
    return TASKS[name]


def split_names(value: str | list[str] | None) -> list[str] | None:
    """Task names given as ``"a, b"`` or ``["a", "b"]`` -> ``["a", "b"]``; empty or None -> None
    (every task)."""
    if isinstance(value, str):
        return [n.strip() for n in value.split(",") if n.strip()] or None
    return list(value) if value else None


def resolve_tasks(suite: str | None = None, tasks: str | list[str] | None = None) -> list[Env]:
    """Tasks of a named suite, or of explicit task names (a list or comma-separated; not both)."""
    names = split_names(tasks)
    if names:
        return [get_task(name) for name in names]
    name = suite or "default"
    if name not in SUITES:
        raise _unknown("suite", name, sorted(SUITES))
    return [TASKS[task] for task in SUITES[name]]
