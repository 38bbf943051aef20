"""Tokenizer throughput: tokens/s of the sequence builder on real episodes, one process.

    .venv/bin/python benchmarks/tokenize_throughput.py [--steps 200] [--repeats 5]

Prints tokens/s and timesteps/s for a cartpole episode (64x64 pixels + proprioception) and a
BabyAI episode under a random policy (text mission + 7x7x3 symbolic view), and the ratio of the vectorized builder over a
timestep-by-timestep tokenization of the same episode (same ids, checked).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from gato_like.envs.registry import get_task
from gato_like.tokenizers import SequenceBuilder, TextTokenizer, TokenSequence


def per_step(builder: SequenceBuilder, obs: dict, actions: np.ndarray) -> TokenSequence:
    parts = [
        builder.build({k: v[t : t + 1] for k, v in obs.items()}, actions[t : t + 1])
        for t in range(len(actions))
    ]
    return TokenSequence.concatenate(parts)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    text = TextTokenizer()
    print(f"{'episode':<14}{'steps':>6}{'tokens':>9}{'tokens/s':>14}{'steps/s':>11}{'vs per-step':>13}")
    for name in ("dmc-cartpole-swingup", "babyai-GoToLocal"):
        task = get_task(name)
        # a random policy keeps BabyAI episodes at their step limit (the bot solves them in ~5 steps)
        episode = task.rollout(0, "expert" if name.startswith("dmc") else "random", max_steps=args.steps)
        spec, obs, actions = task.spec, episode.observations, episode.actions
        builder = SequenceBuilder(spec, text)
        seq = builder.build(obs, actions)
        assert (per_step(builder, obs, actions).ids == seq.ids).all()
        fast = best_of(lambda b=builder, o=obs, a=actions: b.build(o, a), args.repeats)
        slow = best_of(lambda b=builder, o=obs, a=actions: per_step(b, o, a), args.repeats)
        steps = len(actions)
        print(
            f"{spec.name:<14}{steps:>6}{len(seq):>9}{len(seq) / fast:>14,.0f}{steps / fast:>11,.0f}{slow / fast:>12.1f}x"
        )


if __name__ == "__main__":
    main()
