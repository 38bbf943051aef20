"""Generation: real simulators, experts that beat random, deterministic bytes, atomic shards."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from gato_like.data_pipelines.episodes import Episode
from gato_like.data_pipelines.generate import generate
from gato_like.data_pipelines.shards import INDEX_FILE, iter_shard, read_index, verify
from gato_like.envs.registry import HELDOUT_TASKS, SUITES, TASKS, get_task, resolve_tasks

from .conftest import SMOKE


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout_index_and_plain_webdataset(smoke_dataset: Path) -> None:
    index = read_index(smoke_dataset)
    assert sorted(index["tasks"]) == sorted(SUITES["smoke"])
    for task, entry in index["tasks"].items():
        assert (smoke_dataset / task / "embodiment.json").is_file()
        assert entry["episodes"] == 4 and sum(s["episodes"] for s in entry["shards"]) == 4
        assert entry["returns"]["expert"]["episodes"] == 2 and entry["returns"]["random"]["episodes"] == 2
        assert all(len(s["sha256"]) == 64 for s in entry["shards"])
    assert verify(smoke_dataset) == []
    # plain webdataset, its own decoders: one sample per episode, json + npz
    urls = [str(smoke_dataset / s["path"]) for s in index["tasks"]["dmc-point_mass-easy"]["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert len(samples) == 4
    meta, arrays = samples[0]["json"], samples[0]["npz"]
    assert meta["task"] == "dmc-point_mass-easy" and meta["length"] == 40
    assert arrays["obs.pixels"].shape == (40, 64, 64, 3) and arrays["obs.pixels"].dtype == np.uint8
    assert arrays["obs.position"].shape == (40, 2) and arrays["actions"].shape == (40, 2)
    assert arrays["rewards"].shape == (40,)
    assert arrays["obs.pixels"].std() > 1  # really rendered
    babyai = next(iter_shard(smoke_dataset / index["tasks"]["babyai-GoToRedBall"]["shards"][0]["path"]))
    assert babyai.observations["mission"][0] == babyai.instruction and babyai.success


def test_same_seed_same_bytes_whatever_the_workers(smoke_dataset: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate(again, workers=1, progress=False, **SMOKE)
    assert _hashes(again) == _hashes(smoke_dataset)
    other = tmp_path / "other"
    generate(other, workers=1, progress=False, seed=1, **SMOKE)
    assert _hashes(other) != _hashes(smoke_dataset)


def test_tampered_shard_is_detected(smoke_dataset: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(smoke_dataset, copy)
    shard = sorted((copy / "captions").glob("shard-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    (problem,) = verify(copy)
    assert "captions/shard-000000.tar does not match its sha256" in problem


def test_refuses_to_overwrite_and_interruption_leaves_no_partial_shard(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        root = tmp_path / "d"
        generate(
            root, tasks=["babyai-GoToRedBall"], episodes=1, normalizer_episodes=1, workers=1, progress=False
        )
        generate(
            root, tasks=["babyai-GoToRedBall"], episodes=1, normalizer_episodes=1, workers=1, progress=False
        )

    task = get_task("babyai-GoToRedBall")
    real = type(task).rollout
    calls = {"n": 0}

    def flaky(self, seed, policy="expert", render=True, max_steps=None, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # the user hits Ctrl-C half way
        return real(self, seed, policy, render, max_steps, **kwargs)

    monkeypatch.setattr(type(task), "rollout", flaky)
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        generate(out, tasks=["babyai-GoToRedBall"], episodes=5, episodes_per_shard=2, normalizer_episodes=1, workers=1, progress=False)  # fmt: skip
    assert not (out / INDEX_FILE).exists()  # an index only for a complete dataset
    assert not list(out.rglob("*.tmp"))
    shards = sorted(out.rglob("shard-*.tar"))
    assert len(shards) == 1  # the first two episodes; the third never made a shard
    assert len(list(iter_shard(shards[0]))) == 2


def test_suites_keep_the_heldout_embodiment_out() -> None:
    heldout = {get_task(t).spec.name for t in HELDOUT_TASKS}
    for name, tasks in SUITES.items():
        if name != "heldout":
            assert not heldout & {get_task(t).spec.name for t in tasks}, name
    arm = get_task("arm3-reach").spec
    for task in SUITES["default"]:
        spec = get_task(task).spec
        dims = {k: v.shape for k, v in spec.observations.items() if v.kind == "proprio"}
        assert dims != {k: v.shape for k, v in arm.observations.items() if v.kind == "proprio"}
        assert spec.action.shape != arm.action.shape
    with pytest.raises(KeyError, match="did you mean 'default'"):
        resolve_tasks("defualt")


@pytest.mark.parametrize("name", ["dmc-point_mass-goals", "dmc-reacher-goals"])
def test_goal_reaching_variants_reward_the_goal_not_the_target(name: str) -> None:
    """Each seed draws its own goal position; the expert ends within the task's radius of it, the
    reward is 1 exactly while the body is that close, and the plain task's expert (driving to the
    target instead) does not reach it."""
    task = get_task(name)
    plain = get_task(name.replace("-goals", "-easy"))
    assert task.spec.to_dict() == plain.spec.to_dict()  # same body: the base's spec applies
    goals = np.stack([task.goal(seed) for seed in range(4)])
    assert len(np.unique(goals.round(6), axis=0)) == 4
    np.testing.assert_array_equal(task.goal(2), goals[2])
    assert task.goals is not None
    for seed in range(2):
        episode = task.rollout(seed, "expert", render=False)
        assert episode.success and episode.rewards[-1] == 1.0
        env = task._environment(seed)
        body = env.physics.named.data.geom_xpos[task.goals.body][:2]
        assert np.linalg.norm(body - task.goal(seed)) <= task.goals.radius  # the env is left at the end
        to_target = plain.rollout(seed, "expert", render=False, max_steps=task.max_steps)
        assert to_target.episode_return > 0  # the plain expert reaches the target ...
        plain_final = plain._environment(seed).physics.named.data.geom_xpos[task.goals.body][:2]
        assert np.linalg.norm(plain_final - task.goal(seed)) > task.goals.radius  # ... not this goal
    with pytest.raises(ValueError, match="has no goals"):
        plain.goal(0)
    assert set(SUITES["goals"]) == {"dmc-point_mass-goals", "dmc-reacher-goals"}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_expert_beats_random(name: str) -> None:
    task = TASKS[name]
    steps = {"dmc-cartpole-swingup": 400, "dmc-pendulum-swingup": 400}.get(name, 250)
    expert = [task.rollout(seed, "expert", render=False, max_steps=steps) for seed in range(3)]
    random = [task.rollout(seed, "random", render=False, max_steps=steps) for seed in range(3)]
    expert_return = np.mean([e.episode_return for e in expert])
    random_return = np.mean([e.episode_return for e in random])
    if name == "captions":
        assert all(e.success for e in expert)
        return
    assert expert_return > random_return + 0.1 * max(abs(expert_return), 1e-3), (expert_return, random_return)
    if name.startswith("babyai"):
        assert all(e.success for e in expert)


def test_episode_sample_round_trip_and_named_errors() -> None:
    task = get_task("babyai-GoToRedBall")
    episode = task.rollout(3)
    sample = episode.to_sample("k0")
    back = Episode.from_sample(dict(sample), where="shard x.tar")
    assert back.key == "k0" and back.instruction == episode.instruction
    np.testing.assert_array_equal(back.actions, episode.actions)
    np.testing.assert_array_equal(back.observations["mission"], episode.observations["mission"])
    assert json.loads(sample["json"])["return"] == round(episode.episode_return, 6)
    from gato_like.data_pipelines.episodes import EpisodeFormatError

    with pytest.raises(EpisodeFormatError, match=r"shard x.tar: sample 'k0': missing 'npz' member"):
        Episode.from_sample({"__key__": "k0", "json": sample["json"]}, where="shard x.tar")
    assert back.executed_actions is None  # an unperturbed rollout executes its labels
    with pytest.raises(EpisodeFormatError, match=r"sample 'k0': .npz is corrupt"):
        Episode.from_sample({"__key__": "k0", "json": sample["json"], "npz": b"garbage"}, where="shard x.tar")


def test_executed_actions_that_do_not_fit_the_spec_are_named() -> None:
    from gato_like.tokenizers import SpecMismatchError

    task = get_task("dmc-point_mass-easy")
    episode = task.rollout(1, "expert", render=True, max_steps=5)
    episode.executed_actions = np.zeros((5, 3), np.float32)  # point mass has 2 actuators
    with pytest.raises(SpecMismatchError, match=r"executed_actions.*wrong shape.*\(5, 2\)"):
        episode.check(task.spec)


def test_generate_without_pixels_writes_proprioception_only(tmp_path: Path) -> None:
    from gato_like.tokenizers import EmbodimentSpec

    index = generate(tmp_path, tasks=["arm3-reach"], episodes=2, max_steps=5, normalizer_episodes=1,
                     workers=1, progress=False, pixels=False)  # fmt: skip
    spec = EmbodimentSpec.from_file(tmp_path / "arm3-reach" / "embodiment.json")
    assert set(spec.observations) == {"position", "to_target", "velocity"}
    episodes = list(iter_shard(tmp_path / index["tasks"]["arm3-reach"]["shards"][0]["path"]))
    assert [set(e.observations) for e in episodes] == [set(spec.observations)] * 2
    assert index["timing"]["rendered_frames"] == 0
    with pytest.raises(ValueError, match="captions task describes camera frames"):
        generate(tmp_path / "c", suite="smoke", episodes=1, progress=False, pixels=False)


def test_dart_perturbation_records_the_clean_expert_action() -> None:
    """The executed action is perturbed, the recorded label is the expert's action in the state
    actually reached; the clean expert's own rollout is left alone (the normalizers use it)."""
    from gato_like.envs.base import Perturbation

    task = get_task("dmc-cartpole-balance")
    clean = task.rollout(7, "expert", render=False, max_steps=60)
    perturbed = task.rollout(7, "expert", render=False, max_steps=60, perturbation=Perturbation(0.3, 0.1))
    assert not np.allclose(clean.observations["position"], perturbed.observations["position"])
    assert "DART noise 0.3 random 0.1" in perturbed.source
    # replay the recorded states: each label is what the expert says there (not the executed action)
    env = task._environment(7)
    env.reset()
    expert = task.expert(env.physics)
    for t in (0, 30, 59):
        x, cos_theta, sin_theta = perturbed.observations["position"][t]
        env.physics.data.qpos[:] = [x, np.arctan2(sin_theta, cos_theta)]
        env.physics.data.qvel[:] = perturbed.observations["velocity"][t]
        np.testing.assert_allclose(expert(env.physics), perturbed.actions[t], atol=1e-3)
    # the executed actions are recorded beside the labels: replaying them reproduces the episode
    assert clean.executed_actions is None and perturbed.executed_actions is not None
    assert perturbed.executed_actions.shape == perturbed.actions.shape
    assert np.abs(perturbed.executed_actions - perturbed.actions).mean() > 0.05
    env = task._environment(7)
    timestep = env.reset()
    for t in range(59):
        np.testing.assert_allclose(
            timestep.observation["position"], perturbed.observations["position"][t], atol=1e-5
        )
        timestep = env.step(perturbed.executed_actions[t])
    back = Episode.from_sample(perturbed.to_sample("k"))
    np.testing.assert_array_equal(back.executed_actions, perturbed.executed_actions)
    babyai = get_task("babyai-GoToLocal")
    noisy = babyai.rollout(5, "expert", perturbation=Perturbation(random_prob=0.3))
    assert noisy.success  # the bot replans after random actions and still finishes
    assert noisy.executed_actions is not None and (noisy.executed_actions != noisy.actions).any()


def test_expert_labels_record_the_experts_action_where_the_policy_went() -> None:
    """DAgger: a policy acts (here one that always pushes right), the expert labels the states
    it reaches; replaying the executed actions reproduces the episode."""
    task = get_task("dmc-cartpole-balance")

    def push_right(observation: dict[str, np.ndarray]) -> np.ndarray:
        return np.ones(1, dtype=np.float32)

    episode = task.rollout(7, push_right, render=False, max_steps=40, expert_labels=True)
    assert episode.executed_actions is not None
    np.testing.assert_array_equal(episode.executed_actions, np.ones((40, 1), dtype=np.float32))
    env = task._environment(7)
    env.reset()
    expert = task.expert(env.physics)
    for t in (0, 20, 39):  # the labels are the expert's in the states the pushes reached
        x, cos_theta, sin_theta = episode.observations["position"][t]
        env.physics.data.qpos[:] = [x, np.arctan2(sin_theta, cos_theta)]
        env.physics.data.qvel[:] = episode.observations["velocity"][t]
        np.testing.assert_allclose(expert(env.physics), episode.actions[t], atol=1e-3)
    assert np.abs(episode.actions - episode.executed_actions).mean() > 0.1
    with pytest.raises(ValueError, match="expert_labels: the expert labels a callable policy's states"):
        task.rollout(7, "random", render=False, max_steps=5, expert_labels=True)


def test_perturbation_settings_are_recorded_and_checked(tmp_path: Path) -> None:
    from gato_like.envs.base import Perturbation

    index = generate(tmp_path, tasks=["dmc-point_mass-easy"], episodes=1, max_steps=5, normalizer_episodes=1,
                     workers=1, progress=False, pixels=False, perturbation=Perturbation(0.2, 0.05, 3))  # fmt: skip
    assert index["tasks"]["dmc-point_mass-easy"]["perturbation"] == {"scheme": "dart", "noise": 0.2, "random_prob": 0.05, "hold": 3}  # fmt: skip
    with pytest.raises(ValueError, match=r"noise: expected a standard deviation in \[0, 2\].*got -0.1"):
        Perturbation(noise=-0.1)
    with pytest.raises(ValueError, match=r"random_prob: expected a probability in \[0, 1\), got 1.5"):
        Perturbation(random_prob=1.5)
    with pytest.raises(ValueError, match=r"hold: expected an integer number of steps"):
        Perturbation(hold=0)


def test_hold_per_task_is_recorded_and_checked(tmp_path: Path) -> None:
    from gato_like.envs.base import Perturbation

    tasks = ["dmc-point_mass-easy", "dmc-pendulum-swingup", "babyai-GoToRedBall"]
    index = generate(tmp_path / "a", tasks=tasks, episodes=1, max_steps=60, normalizer_episodes=1, workers=1,
                     progress=False, pixels=False, perturbation=Perturbation(0.0, 0.5, 20),
                     task_hold={"dmc-point_mass-easy": 1})  # fmt: skip
    assert index["tasks"]["dmc-point_mass-easy"]["perturbation"]["hold"] == 1
    assert index["tasks"]["dmc-pendulum-swingup"]["perturbation"]["hold"] == 20
    assert index["tasks"]["babyai-GoToRedBall"]["perturbation"]["hold"] == 1  # discrete: never held
    with pytest.raises(ValueError, match=r"task_hold: \['babyai-GoToRedBall'\] act with discrete actions"):
        generate(tmp_path / "d", tasks=tasks, episodes=1, max_steps=5, normalizer_episodes=1, workers=1,
                 progress=False, pixels=False, task_hold={"babyai-GoToRedBall": 5})  # fmt: skip
    with pytest.raises(ValueError, match=r"task_hold: \['dmc-reacher-easy'\] are not tasks being generated"):
        generate(tmp_path / "b", tasks=tasks, episodes=1, max_steps=5, normalizer_episodes=1, workers=1,
                 progress=False, pixels=False, task_hold={"dmc-reacher-easy": 1})  # fmt: skip
    with pytest.raises(ValueError, match=r"hold: expected an integer number of steps in \[1, 1000\], got 0"):
        generate(tmp_path / "c", tasks=tasks, episodes=1, max_steps=5, normalizer_episodes=1, workers=1,
                 progress=False, pixels=False, task_hold={"dmc-pendulum-swingup": 0})  # fmt: skip
    assert not (tmp_path / "b").exists() and not (tmp_path / "c" / "index.json").exists()
