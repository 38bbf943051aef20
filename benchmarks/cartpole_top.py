"""Where a checkpoint's cartpole swing-up departs from its expert once the pole is up.

The scripted expert (``CartpoleExpert``) catches the pole with LQR, ``u = -K [x, theta, x', theta']``
(clipped to [-1, 1]), wherever ``cos(theta) > 0.85``. dm_control's swing-up reward scales by how
centred the cart is, so a policy that holds the pole with too weak a pull on the cart's position
keeps the pole up and still loses ~0.1 a step. On the evaluation's unseen episodes (the seeds of
``gato-like eval``) this prints per episode the return, the first step upright and the mean
``|x|`` there, then fits a line through the policy's actions and one through the expert's at the
same upright states (where the expert is not clipped): the two fitted gains side by side say
which term the policy has not learned. With ``--data`` it also counts how many of a dataset's
timesteps show the pole up, and how far off centre the cart is in them.

    .venv/bin/python benchmarks/cartpole_top.py --ckpt runs/cpu69/best --episodes 4 --data data/suite60p
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch
from expert_beside import ExpertBeside  # (benchmarks/, beside this script)

from gato_like.envs.control import CartpoleExpert, _wrap
from gato_like.policy import Policy

TASK = "dmc-cartpole-swingup"
UP = 0.85  # cos(theta) above which the expert switches to LQR


def state_row(physics: Any, expert: CartpoleExpert, action: np.ndarray, expert_u: float) -> tuple[float, ...]:
    """``(x, theta, x', theta', the policy's action, the expert's)`` of one step."""
    x, theta = physics.data.qpos
    x_dot, theta_dot = physics.data.qvel
    return (x, _wrap(theta), x_dot, theta_dot, float(action[0]), expert_u)


def data_counts(root: str) -> None:
    """Print how many of the dataset's swing-up timesteps have the pole up, and the cart's offset there."""
    from gato_like.data_pipelines.shards import iter_task

    offsets, total = [], 0
    for episode in iter_task(root, TASK):
        position = episode.observations["position"]  # (T, 3): cart x, cos(theta), sin(theta)
        offsets.append(position[position[:, 1] > UP, 0])
        total += len(position)
    x = np.abs(np.concatenate(offsets))
    print(
        f"\n{root}: {len(x)} of {total} timesteps with the pole up ({len(x) / total:.0%}); "
        f"of those, |x| > 0.3 in {np.mean(x > 0.3):.0%}, |x| > 0.5 in {np.mean(x > 0.5):.0%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", required=True, help="a checkpoint directory (e.g. runs/cpu69/best)")
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument(
        "--seed", type=int, default=0, help="the evaluation's seed (as gato-like eval --seed)"
    )
    parser.add_argument("--data", default=None, help="also count a dataset's upright timesteps")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    recorder = ExpertBeside(Policy.from_checkpoint(args.ckpt), TASK, CartpoleExpert, state_row)
    print(f"{'episode':>7s} {'return':>7s} {'first step up':>14s} {'|x| while up':>13s}")
    episodes = []
    for i in range(args.episodes):
        played, episode = recorder.episode(args.seed, i)
        up = np.cos(episode[:, 1]) > UP
        first = int(np.argmax(up)) if up.any() else -1
        offset = np.abs(episode[up, 0]).mean() if up.any() else float("nan")
        print(f"{i:7d} {played.episode_return:7.0f} {first:14d} {offset:13.2f}")
        episodes.append(episode)

    table = np.concatenate(episodes)
    up = np.cos(table[:, 1]) > UP
    state, policy_u, expert_u = table[up, :4], table[up, 4], table[up, 5]
    free = np.abs(expert_u) < 0.95  # where the expert's LQR is not clipped, its action is linear
    design = np.c_[state[free], np.ones(free.sum())]
    expert_fit = np.linalg.lstsq(design, expert_u[free], rcond=None)[0]
    policy_fit = np.linalg.lstsq(design, policy_u[free], rcond=None)[0]
    print(f"\n{up.sum()} upright steps, {free.sum()} where the expert's action is not clipped")
    print(f"{'':>8s} {'x':>7s} {'theta':>7s} {'x_dot':>7s} {'theta_dot':>9s} {'bias':>7s}")
    for name, fit in (("expert", expert_fit), ("policy", policy_fit)):
        print(f"{name:>8s} " + " ".join(f"{v:7.2f}" if j != 3 else f"{v:9.2f}" for j, v in enumerate(fit)))
    print(f"mean |policy - expert| while up: {np.abs(policy_u - expert_u).mean():.2f}")
    if args.data:
        data_counts(args.data)


if __name__ == "__main__":
    main()
