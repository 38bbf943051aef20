"""Gymnasium environments as embodiments: spaces -> spec, observations and actions converted both
ways, clear errors for spaces a spec cannot express, and a checkpoint rolled out by `eval --gym`."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

gym = pytest.importorskip("gymnasium")
from gymnasium import spaces  # noqa: E402

from gato_like.envs.gymnasium_env import GymTask  # noqa: E402
from gato_like.tokenizers.gym_spaces import SpaceMapping  # noqa: E402
from gato_like.tokenizers.spec import EmbodimentSpec, SpecError  # noqa: E402


def test_classic_control_spaces_become_specs() -> None:
    cartpole = EmbodimentSpec.from_gymnasium(gym.make("CartPole-v1"))
    assert cartpole.name == "gym-CartPole-v1" and cartpole.control_hz == 50.0  # 1 / tau
    assert cartpole.to_dict()["observations"] == {
        "observation": {"kind": "proprio", "shape": [4], "dtype": "float32"}
    }
    assert (
        cartpole.action.kind == "discrete"
        and cartpole.action.num_choices == 2
        and cartpole.action.shape == (1,)
    )

    pendulum = EmbodimentSpec.from_gymnasium(gym.make("Pendulum-v1"))
    obs = pendulum.observations["observation"]
    assert obs.low.tolist() == [-1, -1, -8] and obs.high.tolist() == [1, 1, 8]  # finite bounds kept
    assert pendulum.action.kind == "continuous" and pendulum.action.low.tolist() == [-2.0]
    assert pendulum.control_hz == 20.0  # 1 / dt


def test_nested_spaces_flatten_to_keys_and_convert_both_ways() -> None:
    observation_space = spaces.Dict(
        {
            "cam": spaces.Box(0, 255, (24, 40, 3), np.uint8),
            "joint": spaces.Dict({"pos": spaces.Box(-1, 1, (3,)), "vel": spaces.Box(-np.inf, np.inf, (3,))}),
            "mode": spaces.Discrete(3, start=1),
            "flags": spaces.MultiBinary(4),
            "goal": spaces.Text(20),
            "pair": spaces.Tuple((spaces.Box(-2, 2, ()), spaces.MultiDiscrete([5, 7]))),
        }
    )
    action_space = spaces.Discrete(4, start=-1)
    mapping = SpaceMapping.of((observation_space, action_space), name="rig", control_hz=10)
    spec = mapping.spec
    assert sorted(spec.observations) == [
        "cam",
        "flags",
        "goal",
        "joint/pos",
        "joint/vel",
        "mode",
        "pair/0",
        "pair/1",
    ]
    kinds = {k: v.kind for k, v in spec.observations.items()}
    assert kinds == {
        "cam": "image", "flags": "discrete", "goal": "text", "joint/pos": "proprio", "joint/vel": "proprio",
        "mode": "discrete", "pair/0": "proprio", "pair/1": "discrete",
    }  # fmt: skip
    assert spec.observations["joint/vel"].low is None  # infinite bounds: none recorded
    assert spec.observations["mode"].num_values == 3 and spec.observations["pair/1"].num_values == 7
    assert spec.observations["pair/0"].shape == (1,)  # a 0-d Box becomes one value
    renamed = SpaceMapping.of((observation_space, action_space), name="other-rig", control_hz=20).spec
    assert spec.differences(renamed, body_only=True) == []  # the same body under another name and rate
    assert [d.split(":")[0] for d in spec.differences(renamed)] == ["name", "control_hz"]

    observation_space.seed(3)
    sample = observation_space.sample()
    converted = mapping.observation(sample)
    spec.check_step(converted)  # every converted value fits the spec
    assert converted["mode"].tolist() == [int(sample["mode"]) - 1]  # Discrete's start subtracted
    assert converted["pair/0"].shape == (1,) and converted["goal"] == sample["goal"]

    # actions: the spec's choice 0..3 is the environment's -1..2, and back
    assert mapping.action(np.array([0])) == -1 and mapping.action(np.array([3])) == 2
    assert mapping.recorded_action(2).tolist() == [3]


@pytest.mark.parametrize(
    ("observation_space", "action_space", "named"),
    [
        (spaces.Graph(spaces.Box(0, 1, (2,)), None), spaces.Discrete(2), "Graph"),
        (spaces.Sequence(spaces.Discrete(3)), spaces.Discrete(2), "Sequence"),
        (spaces.Box(-1, 1, (2,)), spaces.Box(-np.inf, np.inf, (2,)), "finite bounds"),
        (spaces.Box(-1, 1, (2,)), spaces.Dict({"a": spaces.Discrete(2)}), "Dict('a'"),
        (spaces.Discrete(5000), spaces.Discrete(2), "at most 1024"),
        (spaces.Box(-5, 5, (2,), np.int64), spaces.Discrete(2), "cannot be discrete tokens"),
        (spaces.Box(-1, 1, (2,)), spaces.MultiDiscrete([3, 4]), "one number of choices"),
    ],
)
def test_inexpressible_spaces_are_named(observation_space, action_space, named: str) -> None:
    with pytest.raises(SpecError, match="gym-test") as error:
        EmbodimentSpec.from_gymnasium((observation_space, action_space), name="gym-test", control_hz=10)
    assert named in str(error.value)


def test_random_rollout_fits_its_spec_and_expert_is_refused() -> None:
    task = GymTask("Pendulum-v1")
    episode = task.rollout(seed=1, policy="random", max_steps=30)
    assert episode.length == 30 and episode.task == "gym-Pendulum-v1"
    assert task.spec.check_episode(episode.observations, episode.actions) == 30
    again = task.rollout(seed=1, policy="random", max_steps=30)
    assert np.array_equal(episode.actions, again.actions)  # seeded
    with pytest.raises(ValueError, match="no scripted expert"):
        task.rollout(seed=0, policy="expert")
    with pytest.raises(ValueError, match="NoSuchEnv-v0"):
        GymTask("NoSuchEnv-v0")


def _balance(observation: dict) -> np.ndarray:
    """A scripted CartPole controller: push toward the pole's fall (~200-500 steps up)."""
    _, _, angle, velocity = observation["observation"]
    return np.array([int(angle + 0.5 * velocity > 0)])


def test_checkpoint_rolls_out_in_a_gymnasium_env(tmp_path: Path) -> None:
    """Demos recorded in CartPole-v1 -> `data convert` -> a debug model -> `eval --gym`: it runs
    in the user's environment through its derived spec and beats the uniform-random policy."""
    from gato_like.data_pipelines.convert import convert_npz
    from gato_like.training.evaluate import evaluate
    from gato_like.training.train import train

    task = GymTask("CartPole-v1")
    demos = tmp_path / "demos"
    demos.mkdir()
    for i in range(20):
        episode = task.rollout(seed=100 + i, policy=_balance, max_steps=200)
        np.savez(demos / f"ep{i:02d}.npz", **{f"obs.{k}": v for k, v in episode.observations.items()},
                 actions=episode.actions, rewards=episode.rewards)  # fmt: skip
    (tmp_path / "spec.json").write_text(task.spec.to_json())
    convert_npz(demos, tmp_path / "spec.json", tmp_path / "data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checkpoint = train(
            tmp_path / "data", tmp_path / "run", preset="debug", max_steps=150, batch_size=64, lr=2e-3,
            warmup_steps=15, val_every=1000, workers=0, progress=False, rollout_episodes=0,
            model={"history_steps": 2, "action_input_dropout": 1.0}, batch_tokens=2048,
        )  # fmt: skip
    summary = evaluate(checkpoint, tmp_path / "eval", episodes=3, gym="CartPole-v1", media=False)
    result = summary["tasks"]["gym-CartPole-v1"]
    assert result["expert_normalized_score"] is None and result["normalizers"]["expert"] is None
    random_mean = result["normalizers"]["random"]["mean"]
    assert random_mean < 40  # a uniform-random CartPole policy falls within ~20 steps
    assert result["mean_return"] > 3 * random_mean, result  # it acts from the state

    with pytest.raises(ValueError, match="no task of the checkpoint"):  # a body it was not trained on
        evaluate(checkpoint, tmp_path / "eval2", episodes=1, gym="Pendulum-v1", media=False)
