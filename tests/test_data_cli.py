"""Bring-your-own demos (`data convert`) and the `data` verbs, run as a user runs them."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gato_like.data_pipelines.convert import ConversionError, convert_npz
from gato_like.data_pipelines.loader import DatasetSource, LoaderConfig, SequenceDataset
from gato_like.data_pipelines.shards import iter_shard, read_index, verify
from gato_like.envs.registry import get_task

BIN = Path(sys.executable).parent


def _write_demos(folder: Path, count: int = 3, steps: int = 12) -> Path:
    """Plain .npz episodes of the held-out 3-link arm, as a user would save them."""
    folder.mkdir(parents=True, exist_ok=True)
    task = get_task("arm3-reach")
    for i in range(count):
        episode = task.rollout(100 + i, "expert", render=True, max_steps=steps)
        np.savez(
            folder / f"demo_{i:02d}.npz",
            **{f"obs.{k}": v for k, v in episode.observations.items()},
            actions=episode.actions,
            rewards=episode.rewards,
        )
    spec = folder.parent / "arm3.json"
    spec.write_text(task.spec.to_json())
    return spec


def test_convert_npz_demos_and_train_on_them(tmp_path: Path) -> None:
    spec = _write_demos(tmp_path / "demos")
    index = convert_npz(
        tmp_path / "demos", spec, tmp_path / "ds", task="arm3-reach", instruction="reach the goal"
    )
    entry = index["tasks"]["arm3-reach"]
    assert entry["episodes"] == 3 and entry["timesteps"] == 36 and entry["returns"]["random"] is None
    assert verify(tmp_path / "ds") == []
    episodes = list(iter_shard(tmp_path / "ds" / entry["shards"][0]["path"]))
    assert [e.source for e in episodes] == ["converted from demo_00.npz", "converted from demo_01.npz", "converted from demo_02.npz"]  # fmt: skip
    loaded = np.load(tmp_path / "demos" / "demo_01.npz")
    np.testing.assert_array_equal(episodes[1].observations["pixels"], loaded["obs.pixels"])
    for episode, i in zip(episodes, range(3), strict=True):  # every demo's actions and rewards too
        demo = np.load(tmp_path / "demos" / f"demo_{i:02d}.npz")
        np.testing.assert_array_equal(episode.actions, demo["actions"])
        np.testing.assert_array_equal(episode.rewards, demo["rewards"])
        for key in episode.observations:
            np.testing.assert_array_equal(episode.observations[key], demo[f"obs.{key}"])
    dataset = SequenceDataset(DatasetSource.open(tmp_path / "ds"), LoaderConfig(context_length=512))
    sample = next(iter(dataset))
    assert sample["loss_mask"].sum() > 0
    with pytest.raises(Exception, match="already has task 'arm3-reach'"):
        convert_npz(tmp_path / "demos", spec, tmp_path / "ds", task="arm3-reach")


def test_convert_rejects_bad_demos_before_writing(tmp_path: Path) -> None:
    spec = _write_demos(tmp_path / "demos", count=2, steps=6)
    bad = dict(np.load(tmp_path / "demos" / "demo_01.npz"))
    bad["obs.velocity"] = bad["obs.velocity"].copy()
    bad["obs.velocity"][2, 1] = np.nan
    np.savez(tmp_path / "demos" / "demo_01.npz", **bad)
    missing = {k: v for k, v in bad.items() if k != "obs.to_target"}
    np.savez(tmp_path / "demos" / "demo_02.npz", **missing)
    with pytest.raises(ConversionError) as error:
        convert_npz(tmp_path / "demos", spec, tmp_path / "out")
    text = str(error.value)
    assert (
        "demo_01.npz: obs.velocity: non-finite value: expected finite values, got nan at index (2, 1)" in text
    )
    assert "demo_02.npz: obs.to_target: missing key" in text
    assert not (tmp_path / "out").exists()  # nothing written


def test_cli_generate_inspect_convert(tmp_path: Path) -> None:
    env = {"PATH": str(BIN), "MUJOCO_GL": "egl", "COLUMNS": "200"}
    out = tmp_path / "ds"
    run = subprocess.run(
        [BIN / "gato-like", "data", "generate", "--out", str(out), "--tasks", "dmc-reacher-easy",
         "--episodes", "2", "--max-steps", "20", "--normalizer-episodes", "2", "--workers", "1"],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    assert "wrote 2 episodes of 1 task(s)" in run.stdout
    again = subprocess.run([BIN / "gato-like", "data", "generate", "--out", str(out)], capture_output=True, text=True, env=env)  # fmt: skip
    assert again.returncode == 2 and "pass --overwrite" in again.stderr and "Traceback" not in again.stderr
    shown = subprocess.run([BIN / "gato-like", "data", "inspect", str(out)], capture_output=True, text=True, env=env, check=True)  # fmt: skip
    assert "dmc-reacher-easy" in shown.stdout and "checksums: all shards match" in shown.stdout
    assert (out / "montage.png").stat().st_size > 0 and (out / "dmc-reacher-easy.gif").stat().st_size > 0
    spec = _write_demos(tmp_path / "demos", count=2, steps=5)
    converted = subprocess.run(
        [BIN / "gato-like", "data", "convert", "--source", str(tmp_path / "demos"), "--spec", str(spec), "--out", str(out)],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    assert "wrote 2 episodes (10 timesteps) of task 'arm3'" in converted.stdout
    assert sorted(read_index(out)["tasks"]) == ["arm3", "dmc-reacher-easy"]
    assert json.loads((out / "arm3" / "embodiment.json").read_text())["name"] == "arm3"


def test_convert_rejects_unreadable_files_and_bad_names(tmp_path: Path) -> None:
    spec = _write_demos(tmp_path / "demos", count=1, steps=4)
    np.save(tmp_path / "demos" / "single.npy", np.zeros(3))
    (tmp_path / "demos" / "single.npy").rename(tmp_path / "demos" / "renamed.npz")
    (tmp_path / "demos" / "truncated.npz").write_bytes(
        (tmp_path / "demos" / "demo_00.npz").read_bytes()[:300]
    )
    good = dict(np.load(tmp_path / "demos" / "demo_00.npz"))
    np.savez(tmp_path / "demos" / "huge.npz", **good | {"rewards": np.full(4, 1e39)})
    np.savez(tmp_path / "demos" / "success.npz", **good | {"success": np.array([1, 0])})
    with pytest.raises(ConversionError) as error:
        convert_npz(tmp_path / "demos", spec, tmp_path / "out")
    text = str(error.value)
    assert "renamed.npz: not a readable .npz" in text and "truncated.npz: not a readable .npz" in text
    assert "huge.npz: rewards: expected finite float32 values" in text
    assert "success.npz: success: expected a 0-d bool or integer" in text
    for bad in ("my.robot", "../escape"):
        with pytest.raises(ValueError, match="expected letters, digits"):
            convert_npz(tmp_path / "demos", spec, tmp_path / "out2", task=bad)
