"""Write a small Minari dataset with Minari's own writer, for the worked example in docs/data.md:
CartPole-v1 (gymnasium, nothing to download) driven by a linear balancing controller.

    .venv/bin/python scripts/make_minari_example.py [--episodes 20] [--id gatolike/cartpole/expert-v0]

It lands in the local Minari store ($MINARI_DATASETS_PATH, else ~/.minari/datasets), where
`gato-like data convert --from minari gatolike/cartpole/expert-v0` finds it.
"""

from __future__ import annotations

import argparse
import warnings

import gymnasium as gym
import minari
import numpy as np
from minari.data_collector import EpisodeBuffer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--id", default="gatolike/cartpole/expert-v0")
    args = parser.parse_args()
    env = gym.make("CartPole-v1")
    buffers = []
    for seed in range(args.episodes):
        obs, _ = env.reset(seed=seed)
        observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
        while True:
            action = int(obs[2] + 0.5 * obs[3] + 0.01 * obs[0] + 0.1 * obs[1] > 0)
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(reward)
            terminations.append(terminated)
            truncations.append(truncated)
            if terminated or truncated:
                break
        buffers.append(EpisodeBuffer(id=seed, seed=seed, observations=np.asarray(observations), actions=np.asarray(actions),
                                     rewards=rewards, terminations=terminations, truncations=truncations, infos={}))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # minari asks for an author and a code link
        dataset = minari.create_dataset_from_buffers(
            args.id, buffers, env="CartPole-v1", algorithm_name="linear controller"
        )
    print(
        f"{args.id}: {dataset.total_episodes} episodes, {dataset.total_steps} steps, in {dataset.spec.data_path}"
    )


if __name__ == "__main__":
    main()
