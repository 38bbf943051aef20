"""BabyAI levels (the ``minigrid`` package) with its BabyAI bot as the expert.

Observations: the text mission, the 7x7 egocentric symbolic view (object, colour, state ids, all
< 11; one token per cell: ``cell_values``) and the agent's heading; 7 discrete actions. Return is minigrid's ``1 - 0.9 * steps / max_steps``
on success, 0 otherwise.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from gato_like.data_pipelines.episodes import Episode
from gato_like.envs.base import Actor, Perturbation
from gato_like.tokenizers.spec import EmbodimentSpec

BABYAI_SPEC: dict[str, Any] = {
    "name": "babyai",
    "description": "BabyAI (minigrid): text mission, 7x7 symbolic egocentric view (object, colour, state), heading",
    "control_hz": 10.0,
    "observations": {
        "mission": {"kind": "text"},
        # one token per cell (object < 11, colour < 6, state < 3): "a purple key" is one token,
        # which a model need not assemble from three (docs/model.md, "Symbols: one token per cell")
        "image": {
            "kind": "discrete",
            "shape": [7, 7, 3],
            "num_values": 11,
            "cell_values": [11, 6, 3],
            "dtype": "uint8",
        },
        "direction": {"kind": "discrete", "shape": [], "num_values": 4},
    },
    "action": {"kind": "discrete", "shape": [1], "num_choices": 7},
}


@dataclass
class BabyAITask:
    """One BabyAI level."""

    name: str
    level: str
    max_steps: int = 64

    @property
    def spec(self) -> EmbodimentSpec:
        return EmbodimentSpec.from_dict(BABYAI_SPEC)

    @property
    def embodiment(self) -> str:
        return "babyai"

    def rollout(
        self,
        seed: int,
        policy: str | Actor = "expert",
        render: bool = True,
        max_steps: int | None = None,
        perturbation: Perturbation | None = None,
        record: bool = False,
    ) -> Episode:
        """One episode; ``render`` is ignored (the view is symbolic). ``record`` puts a
        top-down RGB frame of the whole grid per step in ``extra["frames"]`` (T, H, W, 3) uint8,
        for videos; those frames are never written to a shard.

        ``perturbation`` (expert only): with probability ``random_prob`` a random move (left,
        right or forward) is executed instead of the bot's action; the bot's own action is recorded as the label, and the
        bot replans from wherever the agent ends up."""
        import gymnasium as gym
        import minigrid  # noqa: F401  (registers the BabyAI levels)
        from minigrid.utils.baby_ai_bot import BabyAIBot

        env = gym.make(self.level, max_steps=max_steps or self.max_steps)
        with contextlib.redirect_stdout(io.StringIO()):  # level generation prints its rejections
            obs, _ = env.reset(seed=seed)
        bot = BabyAIBot(env.unwrapped) if policy == "expert" else None
        rng = np.random.default_rng([seed, 2])
        perturb_prob = perturbation.random_prob if (perturbation is not None and bot is not None) else 0.0
        noise_rng = np.random.default_rng([seed, 3])
        mission = obs["mission"]
        observations: dict[str, list[Any]] = {"mission": [], "image": [], "direction": []}
        actions, rewards, executed_actions = [], [], []
        terminated = False
        frames: list[np.ndarray] = []
        last_executed: int | None = None
        while True:
            if record:
                frame = env.unwrapped.get_frame(highlight=True, tile_size=8)  # type: ignore[attr-defined]
                frames.append(np.asarray(frame, dtype=np.uint8))
            observations["mission"].append(obs["mission"])
            observations["image"].append(np.asarray(obs["image"], dtype=np.uint8))
            observations["direction"].append(int(obs["direction"]))
            if callable(policy):
                action = int(np.asarray(policy({k: v[-1] for k, v in observations.items()})).reshape(-1)[0])
            else:
                # the bot is told what was executed last, so it replans after a random action
                action = int(bot.replan(last_executed)) if bot is not None else int(rng.integers(0, 7))
            actions.append([action])
            executed = action
            if perturb_prob and noise_rng.random() < perturb_prob:
                # a random move (left, right, forward): pickup/drop/toggle can leave states the
                # bot gives up on (e.g. an opened box: DisappearedBoxError)
                executed = int(noise_rng.integers(0, 3))
            last_executed = executed
            executed_actions.append([executed])
            obs, reward, terminated, truncated, _ = env.step(executed)
            rewards.append(float(reward))
            if terminated or truncated:
                break
        env.close()
        return Episode(
            task=self.name,
            embodiment="babyai",
            observations={
                "mission": np.asarray(observations["mission"], dtype=str),
                "image": np.stack(observations["image"]),
                "direction": np.asarray(observations["direction"], dtype=np.int64),
            },
            actions=np.asarray(actions, dtype=np.int64),
            rewards=np.asarray(rewards, dtype=np.float32),
            instruction=mission,
            success=bool(terminated and rewards[-1] > 0),
            source=f"{policy if isinstance(policy, str) else 'learned'} policy in minigrid ({self.level})",
            seed=seed,
            extra={"frames": np.stack(frames)} if frames else {},
            executed_actions=np.asarray(executed_actions, dtype=np.int64) if perturb_prob else None,
        )


BABYAI_TASKS = [
    BabyAITask("babyai-GoToRedBall", "BabyAI-GoToRedBall-v0"),
    BabyAITask("babyai-GoToLocal", "BabyAI-GoToLocal-v0"),
    BabyAITask("babyai-PickupLoc", "BabyAI-PickupLoc-v0"),
]
