"""The text the project's SentencePiece model is trained on, generated from templates (no download).

It covers what the agent reads and writes: BabyAI missions (minigrid's grammar), captions of
rendered simulator frames, task descriptions of the control suite, numbers and a few plain
sentences. Deterministic for a given seed, so the shipped model can be reproduced bit for bit by
``python -m gato_like.tokenizers.train_text``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

COLORS = ["red", "green", "blue", "purple", "yellow", "grey"]
OBJECTS = ["ball", "box", "key", "door"]
LOCATIONS = ["", " in front of you", " behind you", " on your left", " on your right"]
DIRECTIONS = ["left", "right", "up", "down", "forward", "backward"]
BODIES = {
    "cartpole": [
        "balance the pole on the cart",
        "swing up the pole and balance it",
        "keep the cart near the centre",
    ],
    "pendulum": ["swing the pendulum up and hold it upright", "keep the pendulum balanced at the top"],
    "point mass": ["move the point mass to the target", "reach the target with the point mass"],
    "reacher": ["move the fingertip to the target", "reach the red target with the two link arm"],
    "arm": ["reach the goal with the three link arm", "move the end effector to the goal"],
    "gridworld agent": ["follow the instruction", "complete the mission"],
}
PLAIN = [
    "The agent observes the scene and chooses an action.",
    "A generalist agent uses one network for many tasks and many bodies.",
    "Each timestep has observation tokens, a separator, then action tokens.",
    "The robot moved its arm slowly towards the goal.",
    "Images are split into patches of sixteen by sixteen pixels.",
    "Joint angles and velocities are encoded with mu-law and binned.",
    "The episode ended when the time limit was reached.",
    "Success means the goal was reached before the end of the episode.",
    "This is a picture of a simulated robot in a checkered arena.",
    "The camera looks down at the table from above.",
]


def _object(rng: random.Random, definite: bool = True) -> str:
    kind = rng.choice(OBJECTS[:3])
    color = rng.choice(COLORS)
    article = "the" if definite else rng.choice(["a", "the"])
    return f"{article} {color} {kind}" if rng.random() < 0.8 else f"{article} {kind}"


def babyai_mission(rng: random.Random) -> str:
    """A mission in the grammar of minigrid's BabyAI levels."""

    def simple() -> str:
        verb = rng.choice(["go to", "pick up", "open", "put"])
        loc = rng.choice(LOCATIONS)
        if verb == "open":
            return f"open the {rng.choice(COLORS)} door{loc}"
        if verb == "put":
            return f"put {_object(rng)} next to {_object(rng)}{loc}"
        return f"{verb} {_object(rng, definite=False)}{loc}"

    shape = rng.random()
    if shape < 0.6:
        return simple()
    joiner = rng.choice([", then ", " and ", " after you "])
    return f"{simple()}{joiner}{simple()}"


def _num(rng: random.Random) -> str:
    return f"{rng.uniform(-3.0, 3.0):.2f}"


def control_caption(rng: random.Random) -> str:
    """A caption of a rendered control-suite frame, as the data pipeline generates from state."""
    kind = rng.randrange(6)
    if kind == 0:
        side = rng.choice(["left of", "right of", "at"])
        pole = rng.choice(["upright", "tilted to the left", "tilted to the right", "hanging down"])
        return f"the cart is {side} the centre and the pole is {pole}"
    if kind == 1:
        angle = rng.randrange(0, 181)
        spin = rng.choice(["clockwise", "counterclockwise", "slowly", "fast"])
        return f"the pendulum is {angle} degrees from upright, swinging {spin}"
    if kind == 2:
        near = rng.choice(["close to", "far from", "touching", "above", "below"])
        return f"the fingertip is {near} the {rng.choice(COLORS)} target"
    if kind == 3:
        return f"the point mass is at x {_num(rng)} y {_num(rng)}, the target at x {_num(rng)} y {_num(rng)}"
    if kind == 4:
        return f"a {rng.choice(COLORS)} {rng.choice(OBJECTS)} is {rng.randrange(1, 7)} steps {rng.choice(DIRECTIONS)}"
    body, tasks = rng.choice(list(BODIES.items()))
    return f"task for the {body}: {rng.choice(tasks)}"


def corpus(num_lines: int = 20000, seed: int = 0) -> Iterator[str]:
    """``num_lines`` lines of generated text, deterministic for ``seed``."""
    rng = random.Random(seed)
    makers = (babyai_mission, control_caption)
    for i in range(num_lines):
        if i % 50 == 0:
            yield PLAIN[(i // 50) % len(PLAIN)]
        elif i % 7 == 0:
            yield " ".join(str(rng.randrange(0, 1000)) for _ in range(rng.randrange(1, 6)))
        else:
            yield makers[i % 2](rng)
