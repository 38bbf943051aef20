"""Image-text data: rendered control-suite frames with captions generated from simulator state.

The token order puts a timestep's text before its image, so a caption describes the frame of the
*previous* timestep: the model reads frame t, then predicts the caption of frame t at step t + 1
(the first caption is empty). Frames come from a random policy on the cartpole, pendulum, point
mass and reacher bodies. The action is a single no-op choice (the embodiment does not act).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gato_like.data_pipelines.episodes import Episode
from gato_like.envs.base import Actor
from gato_like.envs.control import CONTROL_TASKS, IMAGE_SIZE, ControlTask
from gato_like.tokenizers.spec import EmbodimentSpec

CAPTION_SPEC: dict[str, Any] = {
    "name": "captions",
    "description": "rendered frames of control bodies; text: caption of the previous frame; no-op action",
    "control_hz": 1.0,
    "observations": {
        "caption": {"kind": "text"},
        "pixels": {"kind": "image", "shape": [IMAGE_SIZE, IMAGE_SIZE, 3]},
    },
    "action": {"kind": "discrete", "shape": [1], "num_choices": 1},
}


def _side(x: float, scale: float) -> str:
    return "left of" if x < -scale else "right of" if x > scale else "at"


def describe(domain: str, physics: Any) -> str:
    """A caption of the current frame of ``domain``, from the simulator state."""
    data = physics.data
    if domain == "cartpole":
        x, theta = float(data.qpos[0]), float(np.arctan2(np.sin(data.qpos[1]), np.cos(data.qpos[1])))
        pole = (
            "upright" if abs(theta) < 0.3 else "hanging down" if abs(theta) > 2.6
            else "tilted to the left" if theta > 0 else "tilted to the right"
        )  # fmt: skip
        return f"the cart is {_side(x, 0.25)} the centre and the pole is {pole}"
    if domain == "pendulum":
        theta = float(np.arctan2(np.sin(data.qpos[0]), np.cos(data.qpos[0])))
        degrees = int(round(abs(np.degrees(theta)) / 10.0) * 10)
        spin = "clockwise" if data.qvel[0] < -0.5 else "counterclockwise" if data.qvel[0] > 0.5 else "slowly"
        return f"the pendulum is {degrees} degrees from upright, swinging {spin}"
    if domain == "point_mass":
        position = physics.named.data.geom_xpos["pointmass"][:2]
        target = physics.named.data.geom_xpos["target"][:2]
        near = "close to" if np.linalg.norm(position - target) < 0.05 else "far from"
        return f"the point mass is at x {position[0]:.2f} y {position[1]:.2f}, {near} the target"
    if domain in ("reacher", "arm3"):
        distance = np.linalg.norm(
            physics.named.data.geom_xpos["target"][:2] - physics.named.data.geom_xpos["finger"][:2]
        )
        near = "touching" if distance < 0.03 else "close to" if distance < 0.08 else "far from"
        return f"the fingertip is {near} the red target"
    raise ValueError(f"describe: no captions for domain {domain!r}")


@dataclass
class CaptionTask:
    """Captioned frames from random-policy rollouts of the pretraining control bodies."""

    name: str = "captions"
    frames: int = 32
    bodies: tuple[str, ...] = (
        "dmc-cartpole-swingup",
        "dmc-pendulum-swingup",
        "dmc-point_mass-easy",
        "dmc-reacher-easy",
    )
    max_steps: int = 32

    @property
    def spec(self) -> EmbodimentSpec:
        return EmbodimentSpec.from_dict(CAPTION_SPEC)

    @property
    def embodiment(self) -> str:
        return "captions"

    def rollout(
        self,
        seed: int,
        policy: str | Actor = "expert",
        render: bool = True,
        max_steps: int | None = None,
        perturbation: Any = None,
        record: bool = False,
    ) -> Episode:
        """``frames`` captioned frames of one body (chosen by ``seed``), one every 5 control steps
        (``perturbation`` does not apply: captions have no actions to perturb; the frames are
        always observations)."""
        from gato_like.envs.control import _renderer

        frames = min(max_steps or self.frames, self.frames)
        body: ControlTask = next(t for t in CONTROL_TASKS if t.name == self.bodies[seed % len(self.bodies)])
        env = body._environment(seed)
        env.reset()
        rng = np.random.default_rng([seed, 3])
        renderer = _renderer(body.name, env.physics)
        pixels, captions = [], [""]
        for _ in range(frames):
            renderer.update_scene(env.physics.data.ptr, camera=0)
            pixels.append(renderer.render().copy())
            captions.append(describe(body.domain, env.physics))
            for _ in range(5):
                env.step(rng.uniform(-1.0, 1.0, body.action_size))
        return Episode(
            task=self.name,
            embodiment="captions",
            observations={"caption": np.asarray(captions[:frames], dtype=str), "pixels": np.stack(pixels)},
            actions=np.zeros((frames, 1), dtype=np.int64),
            rewards=np.zeros(frames, dtype=np.float32),
            instruction=f"describe the {body.domain.replace('_', ' ')}",
            success=True,
            source=f"random policy frames of {body.name}, captions from simulator state",
            seed=seed,
            extra={"body": body.name, "last_caption": captions[frames]},
        )
