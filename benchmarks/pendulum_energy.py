"""Where a checkpoint's pendulum swing-up departs from its expert, read through the expert's own
quantity: the pole's energy relative to upright, ``E = I w^2 / 2 + m g l (cos(theta) - 1)``.

The scripted expert (``PendulumExpert``) pumps with ``u = -5 E sign(w)`` (clipped to [-1, 1]):
along the swing while ``E < 0``, against it once ``E > 0``, and catches with LQR where
``cos(theta) > 0.95``. A policy that spins through the top keeps ``E > 0`` there. On the
evaluation's unseen episodes (the seeds of ``gato-like eval``), this prints per episode the
return, the share of steps with ``E > 0.1 m g l`` (too much energy), and by energy band the
policy's mean torque against the expert's at the same states (signed along the swing, so
positive is pumping and negative braking).

    .venv/bin/python benchmarks/pendulum_energy.py --ckpt runs/cpu68/best --episodes 10 --threads 1
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch
from expert_beside import ExpertBeside  # (benchmarks/, beside this script)

from gato_like.envs.control import PendulumExpert, _wrap
from gato_like.policy import Policy

TASK = "dmc-pendulum-swingup"
#: energy bands, in units of m g l (the energy a pole at rest below lacks: -2)
BANDS = [(-2.01, -1.0), (-1.0, -0.3), (-0.3, -0.05), (-0.05, 0.05), (0.05, 0.3), (0.3, 10.0)]


def energy_row(
    physics: Any, expert: PendulumExpert, action: np.ndarray, expert_u: float
) -> tuple[float, ...]:
    """``(E / mgl, the policy's torque along the swing, the expert's, cos(theta))`` of one step."""
    theta, w = _wrap(physics.data.qpos[0]), float(physics.data.qvel[0])
    along = float(np.sign(w) or 1.0)
    return (
        expert.energy(theta, w) / expert.mgl,
        float(action[0]) * along,
        expert_u * along,
        float(np.cos(theta)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", required=True, help="a checkpoint directory (e.g. runs/cpu68/best)")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument(
        "--seed", type=int, default=0, help="the evaluation's seed (as gato-like eval --seed)"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    recorder = ExpertBeside(Policy.from_checkpoint(args.ckpt), TASK, PendulumExpert, energy_row)
    episodes = []
    print(f"{'episode':>7s} {'return':>7s} {'E > 0.1 mgl':>12s} {'top (cos > 0.95)':>17s}")
    for i in range(args.episodes):
        played, rows = recorder.episode(args.seed, i)
        e, top = rows[:, 0], rows[:, 3] > 0.95
        print(f"{i:7d} {played.episode_return:7.0f} {np.mean(e > 0.1):12.0%} {np.mean(top):17.0%}")
        episodes.append(rows)
    table = np.concatenate(episodes)
    print(
        f"\n{'E / mgl':>16s} {'steps':>7s} {'policy torque':>14s} {'expert torque':>14s} {'|policy - expert|':>18s}"
    )
    for low, high in BANDS:
        inside = (table[:, 0] >= low) & (table[:, 0] < high)
        if inside.any():
            p, x = table[inside, 1], table[inside, 2]
            print(
                f"[{low:5.2f}, {high:5.2f}) {inside.sum():7d} {p.mean():14.2f} {x.mean():14.2f} {np.abs(p - x).mean():18.2f}"
            )
    print("(torques signed along the swing: + pumps, - brakes)")


if __name__ == "__main__":
    main()
