"""Small real episodes for the demo and the tests: dm_control's cartpole (proprioception + rendered
pixels, continuous action) and a BabyAI level driven by minigrid's BabyAI bot (text mission,
symbolic view, discrete action). Rendering is headless (``MUJOCO_GL=egl`` unless set).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from gato_like.tokenizers.spec import EmbodimentSpec

Episode = tuple[EmbodimentSpec, dict[str, np.ndarray], np.ndarray]

CARTPOLE_SPEC = {
    "name": "dmc-cartpole",
    "description": "dm_control cartpole: cart position, pole angle (cos, sin) and velocities; push the cart",
    "control_hz": 100.0,
    "observations": {
        "position": {"kind": "proprio", "shape": [3]},
        "velocity": {"kind": "proprio", "shape": [2]},
        "pixels": {"kind": "image", "shape": [64, 64, 3]},
    },
    "action": {"kind": "continuous", "shape": [1], "low": -1.0, "high": 1.0},
}

BABYAI_SPEC = {
    "name": "babyai",
    "description": "BabyAI (minigrid): text mission, 7x7 symbolic egocentric view (object, colour, state), heading",
    "control_hz": 10.0,
    "observations": {
        "mission": {"kind": "text"},
        "image": {"kind": "discrete", "shape": [7, 7, 3], "num_values": 11, "dtype": "uint8"},
        "direction": {"kind": "discrete", "shape": [], "num_values": 4},
    },
    "action": {"kind": "discrete", "shape": [1], "num_choices": 7},
}


def cartpole_episode(steps: int = 10, seed: int = 0, task: str = "swingup") -> Episode:
    """``steps`` timesteps of dm_control cartpole under a seeded uniform-random policy."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    from dm_control import suite

    spec = EmbodimentSpec.from_dict(CARTPOLE_SPEC)
    env = suite.load("cartpole", task, task_kwargs={"random": seed})
    rng = np.random.default_rng(seed)
    timestep = env.reset()
    observations: dict[str, list[Any]] = {key: [] for key in spec.observations}
    actions = []
    for _ in range(steps):
        observations["position"].append(np.asarray(timestep.observation["position"], np.float32))
        observations["velocity"].append(np.asarray(timestep.observation["velocity"], np.float32))
        observations["pixels"].append(env.physics.render(height=64, width=64, camera_id=0))
        action = rng.uniform(-1.0, 1.0, size=(1,)).astype(np.float32)
        actions.append(action)
        timestep = env.step(action)
    return spec, {k: np.stack(v) for k, v in observations.items()}, np.stack(actions)


def babyai_episode(level: str = "BabyAI-GoToRedBall-v0", steps: int = 10, seed: int = 0) -> Episode:
    """Up to ``steps`` timesteps of a BabyAI level acted by minigrid's BabyAI bot."""
    import gymnasium as gym
    import minigrid  # noqa: F401  (registers the BabyAI levels)
    from minigrid.utils.baby_ai_bot import BabyAIBot

    spec = EmbodimentSpec.from_dict(BABYAI_SPEC)
    env = gym.make(level)
    obs, _ = env.reset(seed=seed)
    bot = BabyAIBot(env.unwrapped)
    observations: dict[str, list[Any]] = {key: [] for key in spec.observations}
    actions = []
    for _ in range(steps):
        observations["mission"].append(obs["mission"])
        observations["image"].append(obs["image"])
        observations["direction"].append(np.int64(obs["direction"]))
        action = int(bot.replan())
        actions.append([action])
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            break
    arrays = {k: np.stack(v) if k != "mission" else np.asarray(v) for k, v in observations.items()}
    return spec, arrays, np.asarray(actions, dtype=np.int64)
