"""``gato-like data convert --from minari`` and ``--from lerobot``, on datasets written by the
real libraries: a Minari dataset created here with ``minari.create_dataset_from_buffers`` on
gymnasium's CartPole-v1, and the committed LeRobot fixture ``tests/fixtures/lerobot_cartpole``
(written by lerobot 0.4.4's own writer from 3 cartpole-balance expert episodes of our simulator:
``scripts/make_lerobot_fixture.py`` says how)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gato_like.cli import main
from gato_like.data_pipelines.loader import DatasetSource
from gato_like.data_pipelines.shards import iter_shard, read_index

FIXTURE = Path(__file__).parent / "fixtures" / "lerobot_cartpole"
DATASET_ID = "gatolike/cartpole/expert-v0"


def _episodes(root: Path, task: str) -> list:
    index = read_index(root)
    return [e for shard in index["tasks"][task]["shards"] for e in iter_shard(root / shard["path"])]


@pytest.fixture
def minari_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list]:
    """A local Minari store holding 3 CartPole-v1 episodes of a linear controller."""
    gym = pytest.importorskip("gymnasium")
    minari = pytest.importorskip("minari")
    from minari.data_collector import EpisodeBuffer

    store = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(store))
    env = gym.make("CartPole-v1")
    buffers = []
    for seed, steps in enumerate((40, 55, 30)):
        obs, _ = env.reset(seed=seed)
        observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
        for t in range(steps):
            action = int(obs[2] + 0.5 * obs[3] + 0.01 * obs[0] + 0.1 * obs[1] > 0)
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(reward)
            terminations.append(terminated)
            truncations.append(truncated or t == steps - 1)
        buffers.append(
            EpisodeBuffer(id=seed, seed=seed, observations=np.asarray(observations), actions=np.asarray(actions),
                          rewards=rewards, terminations=terminations, truncations=truncations, infos={})
        )  # fmt: skip
    with pytest.warns(UserWarning):  # minari asks for an author and a code link
        minari.create_dataset_from_buffers(DATASET_ID, buffers, env="CartPole-v1", algorithm_name="linear")
    return store, buffers


def test_minari_dataset_converts_exactly(minari_store: tuple[Path, list], tmp_path: Path) -> None:
    _, buffers = minari_store
    out = tmp_path / "demos"
    assert main(["data", "convert", "--from", "minari", DATASET_ID, "--out", str(out)]) == 0
    index = read_index(out)
    entry = index["tasks"]["gym-CartPole-v1"]  # named as `eval --gym CartPole-v1` names it
    assert entry["episodes"] == 3 and entry["timesteps"] == 40 + 55 + 30
    spec = json.loads((out / "gym-CartPole-v1" / "embodiment.json").read_text())
    assert spec["observations"] == {"observation": {"kind": "proprio", "shape": [4], "dtype": "float32"}}
    assert spec["action"]["kind"] == "discrete" and spec["action"]["num_choices"] == 2
    episodes = {e.length: e for e in _episodes(out, "gym-CartPole-v1")}
    for buffer in buffers:
        episode = episodes[len(buffer.actions)]
        assert episode.source.endswith(f"episode {buffer.id}")
        # Minari's T + 1 observations: the T that an action follows, unchanged
        np.testing.assert_array_equal(episode.observations["observation"], buffer.observations[:-1])
        np.testing.assert_array_equal(episode.actions.reshape(-1), buffer.actions)
        np.testing.assert_array_equal(episode.rewards, np.asarray(buffer.rewards, np.float32))
    # the converted folder is a dataset the training loader reads
    assert DatasetSource.open(str(out)).tasks == ["gym-CartPole-v1"]


def test_minari_dataset_by_folder_and_spec_override(minari_store: tuple[Path, list], tmp_path: Path) -> None:
    store, _ = minari_store
    spec = {
        "name": "cartpole-gym",
        "control_hz": 50.0,
        "observations": {"observation": {"kind": "proprio", "shape": [4]}},
        "action": {"kind": "discrete", "shape": [1], "num_choices": 2},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "demos"
    argv = ["data", "convert", "--from", "minari", "--source", str(store / DATASET_ID), "--out", str(out),
            "--spec", str(tmp_path / "spec.json"), "--max_episodes", "2"]  # fmt: skip
    assert main(argv) == 0
    assert read_index(out)["tasks"]["cartpole-gym"]["episodes"] == 2


def test_minari_missing_dataset_is_named_and_writes_nothing(
    minari_store: tuple[Path, list], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demos"
    assert main(["data", "convert", "--from", "minari", "gatolike/cartpole/nope-v0", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "'gatolike/cartpole/nope-v0' is not in the local store" in error
    assert "minari download" in error and DATASET_ID in error  # what to do, and what is there
    assert not out.exists()


def test_lerobot_fixture_converts(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "demos"
    assert main(["data", "convert", "--from", "lerobot", str(FIXTURE), "--out", str(out)]) == 0
    spec = json.loads((out / "cartpole" / "embodiment.json").read_text())
    assert spec["control_hz"] == 100.0
    assert spec["observations"]["camera"] == {"kind": "image", "shape": [64, 64, 3], "dtype": "uint8"}
    assert spec["observations"]["state"]["shape"] == [5]
    episodes = sorted(_episodes(out, "cartpole"), key=lambda e: e.seed)
    assert [e.length for e in episodes] == [120, 120, 120]
    assert {e.instruction for e in episodes} == {"balance the pole on the cart"}
    frames = pq.read_table(FIXTURE / "data" / "chunk-000" / "file-000.parquet").to_pydict()
    meta = pq.read_table(FIXTURE / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pydict()
    for i, episode in enumerate(episodes):
        rows = [r for r, e in enumerate(frames["episode_index"]) if e == i]
        np.testing.assert_array_equal(episode.observations["state"], np.asarray([frames["observation.state"][r] for r in rows], np.float32))  # fmt: skip
        np.testing.assert_array_equal(episode.actions.reshape(-1), np.asarray([frames["action"][r] for r in rows], np.float32))  # fmt: skip
        np.testing.assert_array_equal(episode.rewards, np.asarray([frames["next.reward"][r] for r in rows], np.float32))  # fmt: skip
        # the decoded frames are this episode's: their colour means match LeRobot's own per-episode stats
        stats = np.asarray(meta["stats/observation.images.camera/mean"][i], np.float64).reshape(3)
        ours = episode.observations["camera"].reshape(-1, 3).mean(axis=0) / 255.0
        np.testing.assert_allclose(ours, stats, atol=0.01)


def test_lerobot_with_a_simulator_spec_splits_the_state(tmp_path: Path) -> None:
    """--spec with the simulator's body: position and velocity come out of observation.state by
    their names, the one camera is its pixels, so the demos fine-tune a model the simulator scores."""
    from gato_like.envs import get_task

    spec = get_task("dmc-cartpole-balance").spec
    (tmp_path / "spec.json").write_text(json.dumps(spec.to_dict()))
    out = tmp_path / "demos"
    argv = ["data", "convert", "--from", "lerobot", str(FIXTURE), "--out", str(out), "--spec",
            str(tmp_path / "spec.json"), "--task", "dmc-cartpole-balance"]  # fmt: skip
    assert main(argv) == 0
    episode = min(_episodes(out, "dmc-cartpole-balance"), key=lambda e: e.seed)
    assert set(episode.observations) == {"position", "velocity", "pixels"}
    assert episode.observations["position"].shape == (120, 3) and episode.observations["velocity"].shape == (
        120,
        2,
    )
    # cos^2 + sin^2 of the pole angle: the right columns went to position
    cos, sin = episode.observations["position"][:, 1], episode.observations["position"][:, 2]
    np.testing.assert_allclose(cos**2 + sin**2, 1.0, atol=1e-5)


def _broken_copy(tmp_path: Path, change) -> Path:
    root = tmp_path / "broken"
    shutil.copytree(FIXTURE, root)
    info = json.loads((root / "meta" / "info.json").read_text())
    change(info)
    (root / "meta" / "info.json").write_text(json.dumps(info))
    return root


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda info: info.update(codebase_version="v2.1"),
            "LeRobot format 'v2.1' is not read here (supported: v3.0)",
        ),
        (
            lambda info: info["features"].update({"observation.language": {"dtype": "string", "shape": [1]}}),
            "observation.language (string [1]): supported observations are images",
        ),
        (
            lambda info: info["features"].update({"observation.grid": {"dtype": "float32", "shape": [3, 4]}}),
            "observation.grid (float32 [3, 4])",
        ),
    ],
)
def test_lerobot_bad_input_is_named_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change, expected: str
) -> None:
    root = _broken_copy(tmp_path, change)
    out = tmp_path / "demos"
    assert main(["data", "convert", "--from", "lerobot", str(root), "--out", str(out)]) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()


def test_unknown_source_format_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "convert", "--from", "rlds", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--from: expected one of npz, minari, lerobot, got 'rlds'" in capsys.readouterr().err


def test_minari_dict_observations_with_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nested (Dict) observations with a Text mission, as BabyAI's, map to one key each."""
    import string
    import warnings

    gym = pytest.importorskip("gymnasium")
    minari = pytest.importorskip("minari")
    import minigrid  # noqa: F401  (registers BabyAI)
    from gymnasium import spaces
    from minari.data_collector import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    env = gym.make("BabyAI-GoToRedBall-v0")
    space = spaces.Dict({"image": env.observation_space["image"], "direction": env.observation_space["direction"],
                         "mission": spaces.Text(max_length=100, charset=string.ascii_lowercase + " ")})  # fmt: skip
    obs, _ = env.reset(seed=3)
    seen = {"image": [obs["image"]], "direction": [obs["direction"]], "mission": [obs["mission"]]}
    actions = [0, 2, 1, 2, 2]
    for action in actions:
        obs, *_ = env.step(action)
        for key in seen:
            seen[key].append(obs[key])
    buffer = EpisodeBuffer(id=0, seed=3, observations={"image": np.asarray(seen["image"]), "direction": np.asarray(seen["direction"]),
                                                       "mission": seen["mission"]},
                           actions=np.asarray(actions), rewards=[0.0] * 5, terminations=[False] * 5, truncations=[False] * 4 + [True])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers("gatolike/babyai/dict-v0", [buffer], env="BabyAI-GoToRedBall-v0",
                                           observation_space=space, action_space=env.action_space)  # fmt: skip
    out = tmp_path / "demos"
    assert main(["data", "convert", "--from", "minari", "gatolike/babyai/dict-v0", "--out", str(out)]) == 0
    [episode] = _episodes(out, "gym-BabyAI-GoToRedBall-v0")
    assert episode.observations["mission"].tolist() == seen["mission"][:5]
    np.testing.assert_array_equal(episode.observations["image"], np.asarray(seen["image"][:5]))
    np.testing.assert_array_equal(
        episode.observations["direction"].reshape(-1), np.asarray(seen["direction"][:5])
    )
    np.testing.assert_array_equal(episode.actions.reshape(-1), actions)


def test_lerobot_image_frames_match_the_video_frames(tmp_path: Path) -> None:
    """``tests/fixtures/lerobot_cartpole_images``: the first 4 frames of the same 2 episodes, written
    by lerobot's writer as PNG images in the parquet (``make_lerobot_fixture.py --images``). Decoded,
    they match the video fixture's frames within the video's compression error. (Balance barely
    moves from frame to frame: which frame each video frame is, the gray-level test checks.)"""
    images, video = tmp_path / "images", tmp_path / "video"
    assert main(["data", "convert", "--from", "lerobot", str(FIXTURE.parent / "lerobot_cartpole_images"), "--out", str(images)]) == 0  # fmt: skip
    argv = ["data", "convert", "--from", "lerobot", str(FIXTURE), "--out", str(video), "--max_episodes", "2"]
    assert main(argv) == 0
    lossless = sorted(_episodes(images, "cartpole"), key=lambda e: e.seed)
    lossy = sorted(_episodes(video, "cartpole"), key=lambda e: e.seed)
    assert [e.length for e in lossless] == [4, 4]
    for png, mp4 in zip(lossless, lossy, strict=True):
        np.testing.assert_array_equal(png.observations["state"], mp4.observations["state"][:4])
        error = np.abs(png.observations["camera"].astype(np.int16) - mp4.observations["camera"][:4])
        error = error.mean(axis=(1, 2, 3))
        assert (error < 6.0).all(), error  # AV1 at crf 30: ~2.5 on average


def test_lerobot_video_frames_land_on_their_timesteps(tmp_path: Path) -> None:
    """``tests/fixtures/lerobot_gray_levels`` (``make_lerobot_fixture.py --synthetic``): 3 episodes
    of 7, 11 and 5 frames in one AV1 file, every frame one uniform gray level, distinct across the
    dataset (20 + 9 g for global frame g). Each decoded frame is the one of its (episode, frame)."""
    out = tmp_path / "demos"
    assert main(["data", "convert", "--from", "lerobot", str(FIXTURE.parent / "lerobot_gray_levels"), "--out", str(out)]) == 0  # fmt: skip
    episodes = sorted(_episodes(out, "gray"), key=lambda e: e.seed)
    assert [e.length for e in episodes] == [7, 11, 5]
    g = 0
    for e, episode in enumerate(episodes):
        for k in range(episode.length):
            assert episode.observations["state"][k, :2].tolist() == [e, k]
            level = float(episode.observations["camera"][k].mean())
            assert abs(level - (20 + 9 * g)) < 3.0, (e, k, level)  # neighbours are 9 levels apart
            g += 1
