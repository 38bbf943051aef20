"""Write the LeRobot test fixtures: tiny LeRobot (v3.0) datasets made by lerobot's own writer.

The fixture for ``gato-like data convert --from lerobot PATH``. Its episodes are real gato-like expert
episodes of ``dmc-cartpole-balance`` (64x64 camera + proprio), re-written with
``LeRobotDataset.create`` / ``add_frame`` / ``save_episode`` / ``finalize`` of the ``lerobot`` package,
so the files are laid out exactly as lerobot lays them out (not as we think it does).

This script does NOT run in the project's venv: lerobot pins torch<2.11 and pulls a CUDA torchvision.
It runs in a throwaway venv made like this (Python 3.11; the pip mirror as configured on the machine):

    echo "torch==2.13.0" > /tmp/lr_constraints.txt
    python3 -m venv /tmp/lrvenv
    /tmp/lrvenv/bin/pip install -c /tmp/lr_constraints.txt torch==2.13.0        # the local CPU wheel
    /tmp/lrvenv/bin/pip install -c /tmp/lr_constraints.txt --no-deps lerobot==0.4.4
    /tmp/lrvenv/bin/pip install -c /tmp/lr_constraints.txt \\
        "datasets>=4.0.0,<5.0.0" "huggingface-hub>=0.34.2,<0.36.0" "av>=15.0.0,<16.0.0" \\
        "packaging>=24.2,<26.0" "jsonlines>=4.0.0,<5.0.0" "einops>=0.8.0,<0.9.0" \\
        pandas pyarrow Pillow "accelerate>=1.10.0,<2.0.0" "numpy<2.4"

Versions that wrote the committed fixture: lerobot 0.4.4, torch 2.13.0+cpu, numpy 2.3.5,
datasets 4.8.5, huggingface-hub 0.35.3, pyarrow 26.0.1, pandas 3.1.1, av 15.1.0 (libavcodec
61.19.101), pillow 13.0.0, accelerate 1.15.0 (only imported). pip reports lerobot's unmet pins
(torch<2.11, torchvision, torchcodec, wandb, ...); the write path needs none of them.

numpy<2.4: lerobot stores a shape-(1,) feature (``action``, ``next.reward`` here) as a scalar
``datasets.Value`` column, and datasets encodes each (1,)-array with ``float(value)``; numpy 2.4
turned that deprecated conversion into a TypeError ("only 0-dimensional arrays can be converted
to Python scalars"), so save_episode fails with numpy 2.4.

torchvision: ``lerobot.datasets.utils`` does ``from torchvision import transforms`` and
``lerobot.datasets.video_utils`` does ``import torchvision`` at import time, but the write path never
calls either (``transforms.ToTensor`` is only used when *reading* image columns, and
``torchvision.io`` only by the torchvision video decoder). PyPI's torchvision (0.28.0, the one built
for torch 2.13) is a CUDA build that cannot load beside the CPU torch ("operator torchvision::nms does
not exist"), so this script puts an empty stub module in ``sys.modules`` (after importing ``datasets``,
so that ``datasets.config.TORCHVISION_AVAILABLE`` stays False). Any use of the stub raises.

Source episodes (gato-like's own generator, from the repo root, project venv):

    .venv/bin/gato-like data generate --out /tmp/lr_src --tasks dmc-cartpole-balance \\
        --episodes 3 --max_steps 120 --workers 1 --normalizer_episodes 2 --pixels true

Then:

    PYTHONHASHSEED=0 /tmp/lrvenv/bin/python scripts/make_lerobot_fixture.py --src /tmp/lr_src \\
        --out tests/fixtures/lerobot_cartpole --overwrite

The other two fixtures (same venv):

    PYTHONHASHSEED=0 /tmp/lrvenv/bin/python scripts/make_lerobot_fixture.py --src /tmp/lr_src \
        --out tests/fixtures/lerobot_cartpole_images --episodes 2 --max_steps 4 --images --overwrite
    PYTHONHASHSEED=0 /tmp/lrvenv/bin/python scripts/make_lerobot_fixture.py --synthetic \
        --out tests/fixtures/lerobot_gray_levels --overwrite

``--images`` stores the frames as PNG images in the data parquet (``dtype: image``) instead of a
video; ``--synthetic`` writes 3 episodes (7, 11, 5 frames) whose every frame is one uniform gray
level, distinct across the dataset, so a reader's video frame -> timestep mapping is checked exactly.

PYTHONHASHSEED=0 makes the output byte-identical from run to run (the video and parquet files are
anyway; only the key order of meta/stats.json follows the string hash seed).
(.gitignore re-includes ``tests/fixtures/**``, which its ``data/`` pattern would hide.)

Mapping (gato-like episode -> LeRobot frame):
    observation.state          float32 (5,) = concat(obs.position (3,), obs.velocity (2,)), with names
    observation.images.camera  video 64x64x3 (obs.pixels, uint8 HWC), codec libsvtav1 by default
    action                     float32 (1,) = ``actions`` (the expert's recorded labels, not
                               ``executed_actions``)
    next.reward                float32 (1,) = ``rewards`` (reward after the action)
    task                       the episode's instruction ("balance the pole on the cart")
    fps                        the embodiment's control_hz (100 for cartpole)

After writing, the script checks the result: decodes every video frame with PyAV, maps it to
(episode, frame_index) through meta/episodes' from_timestamp and the frame's pts, and compares it
with the source pixels (prints the mean absolute error); compares the parquet columns with the
source arrays exactly.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import sys
import tarfile
import types
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here talks to the Hub


def _stub_torchvision() -> None:
    """An empty torchvision so that lerobot.datasets imports; only if the real one cannot import."""
    try:
        import torchvision  # noqa: F401

        return
    except Exception:  # the CUDA wheel beside a CPU torch raises RuntimeError, not ImportError
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    import datasets  # noqa: F401  (first: datasets.config must not see the stub)

    def missing(module: str):
        def __getattr__(name: str):
            raise AttributeError(f"{module}.{name}: torchvision is stubbed (write path only)")

        return __getattr__

    tv = types.ModuleType("torchvision")
    tr = types.ModuleType("torchvision.transforms")
    tv.transforms = tr
    tv.__getattr__ = missing("torchvision")
    tr.__getattr__ = missing("torchvision.transforms")
    sys.modules["torchvision"] = tv
    sys.modules["torchvision.transforms"] = tr


def read_episodes(src: Path, task: str, limit: int | None) -> tuple[dict, list[dict]]:
    """The embodiment spec and the episodes (metadata + arrays) of ``task`` in a generated dataset."""
    spec = json.loads((src / task / "embodiment.json").read_text())
    episodes = []
    for shard in sorted((src / task).glob("shard-*.tar")):
        parts: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.rpartition(".")
                parts.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key in sorted(parts):
            meta = json.loads(parts[key]["json"])
            with np.load(io.BytesIO(parts[key]["npz"]), allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}
            episodes.append({"key": key, "meta": meta, "arrays": arrays})
    return spec, episodes[:limit]


STATE_NAMES = {  # dm_control cartpole: position = (cart x, cos, sin of pole angle); velocity
    "position": ["cart_position", "pole_angle_cos", "pole_angle_sin"],
    "velocity": ["cart_velocity", "pole_angular_velocity"],
}


#: ``--synthetic``: episode lengths, and the uniform gray level of global frame g (all distinct).
SYNTHETIC_LENGTHS = (7, 11, 5)


def gray_level(g: int) -> int:
    return 20 + 9 * g


def write_synthetic(args: argparse.Namespace) -> None:
    """Episodes whose every camera frame is one uniform gray level, distinct for each frame of the
    dataset (which survives video compression), so a reader's frame-to-timestep mapping can be
    checked exactly; the state holds (episode, frame, 0, 0, 0)."""
    _stub_torchvision()
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    features = {
        "observation.state": {"dtype": "float32", "shape": (5,), "names": ["episode", "frame", "a", "b", "c"]},
        "observation.images.camera": {"dtype": "video", "shape": (64, 64, 3), "names": ["height", "width", "channels"]},
        "action": {"dtype": "float32", "shape": (1,), "names": ["force"]},
    }  # fmt: skip
    if args.out.exists():
        if not args.overwrite:
            raise SystemExit(f"{args.out} exists (pass --overwrite)")
        shutil.rmtree(args.out)
    dataset = LeRobotDataset.create(repo_id="gato-like/gray_levels", fps=30, features=features, root=args.out,
                                    robot_type="gray", use_videos=True, vcodec=args.vcodec, encoder_threads=1)  # fmt: skip
    g = 0
    for e, length in enumerate(SYNTHETIC_LENGTHS):
        for k in range(length):
            dataset.add_frame(
                {
                    "observation.state": np.array([e, k, 0, 0, 0], dtype=np.float32),
                    "observation.images.camera": np.full((64, 64, 3), gray_level(g), dtype=np.uint8),
                    "action": np.zeros(1, dtype=np.float32),
                    "task": "show gray levels",
                }
            )
            g += 1
        dataset.save_episode()
    dataset.finalize()
    images = args.out / "images"
    if images.is_dir() and not any(p.is_file() for p in images.rglob("*")):
        shutil.rmtree(images)
    print(f"wrote {len(SYNTHETIC_LENGTHS)} synthetic episodes to {args.out} (30 fps, {args.vcodec})")


def write(args: argparse.Namespace) -> None:
    if args.synthetic:
        return write_synthetic(args)
    _stub_torchvision()
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    spec, episodes = read_episodes(args.src, args.task, args.episodes)
    if not episodes:
        raise SystemExit(f"no episodes of {args.task} under {args.src}")
    proprio = [k for k, o in spec["observations"].items() if o["kind"] == "proprio"]
    image = [k for k, o in spec["observations"].items() if o["kind"] == "image"]
    assert image == ["pixels"] and proprio == ["position", "velocity"], (image, proprio)
    state_names = [f"{k}.{n}" for k in proprio for n in STATE_NAMES[k]]
    h, w, c = spec["observations"]["pixels"]["shape"]
    features = {
        "observation.state": {"dtype": "float32", "shape": (len(state_names),), "names": state_names},
        "observation.images.camera": {
            "dtype": "image" if args.images else "video",
            "shape": (h, w, c),
            "names": ["height", "width", "channels"],
        },
        "action": {"dtype": "float32", "shape": tuple(spec["action"]["shape"]), "names": ["cart_force"]},
        "next.reward": {"dtype": "float32", "shape": (1,), "names": None},
    }
    fps = round(spec["control_hz"])
    if args.out.exists():
        if not args.overwrite:
            raise SystemExit(f"{args.out} exists (pass --overwrite)")
        shutil.rmtree(args.out)
    dataset = LeRobotDataset.create(
        repo_id="gato-like/cartpole_fixture",
        fps=fps,
        features=features,
        root=args.out,
        robot_type=spec["name"],
        use_videos=not args.images,
        vcodec=args.vcodec,
        encoder_threads=1,
    )
    for ep in episodes:
        a = ep["arrays"]
        t_len = min(len(a["actions"]), args.max_steps or len(a["actions"]))
        state = np.concatenate([a[f"obs.{k}"] for k in proprio], axis=-1).astype(np.float32)
        for t in range(t_len):
            dataset.add_frame(
                {
                    "observation.state": state[t],
                    "observation.images.camera": a["obs.pixels"][t],
                    "action": a["actions"][t].astype(np.float32),
                    "next.reward": np.array([a["rewards"][t]], dtype=np.float32),
                    "task": args.instruction or ep["meta"]["instruction"],
                }
            )
        dataset.save_episode()
    dataset.finalize()
    # The writer leaves an empty images/ folder (PNG staging for the encoder): not part of the format.
    images = args.out / "images"
    if images.is_dir() and not any(p.is_file() for p in images.rglob("*")):
        shutil.rmtree(images)
    print(
        f"wrote {len(episodes)} episodes to {args.out} ({fps} fps, {'PNG images' if args.images else args.vcodec})"
    )
    if not args.images:  # the check decodes videos; PNG frames are lossless
        check(args, episodes, proprio)


def check(args: argparse.Namespace, episodes: list[dict], proprio: list[str]) -> None:
    """Read the written dataset back with pyarrow and PyAV and compare it with the source."""
    import av
    import pyarrow.parquet as pq

    root = args.out
    info = json.loads((root / "meta" / "info.json").read_text())
    fps = info["fps"]
    data = pq.read_table(sorted((root / "data").rglob("*.parquet"))).to_pydict()
    meta = pq.read_table(sorted((root / "meta" / "episodes").rglob("*.parquet"))).to_pydict()
    key = "observation.images.camera"
    errors = []
    for i, ep in enumerate(episodes):
        a = ep["arrays"]
        t_len = min(len(a["actions"]), args.max_steps or len(a["actions"]))
        rows = [r for r, e in enumerate(data["episode_index"]) if e == i]
        assert len(rows) == t_len == meta["length"][i], (len(rows), t_len, meta["length"][i])
        state = np.concatenate([a[f"obs.{k}"] for k in proprio], axis=-1)[:t_len]
        assert np.array_equal(np.array([data["observation.state"][r] for r in rows], np.float32), state)
        # shape-(1,) features are written as scalar columns (datasets.Value), not lists
        action = np.array([data["action"][r] for r in rows], np.float32).reshape(t_len, -1)
        assert np.array_equal(action, a["actions"][:t_len])
        reward = np.array([data["next.reward"][r] for r in rows], np.float32)
        assert np.array_equal(reward, a["rewards"][:t_len])
        video = root / info["video_path"].format(
            video_key=key,
            chunk_index=meta[f"videos/{key}/chunk_index"][i],
            file_index=meta[f"videos/{key}/file_index"][i],
        )
        start = meta[f"videos/{key}/from_timestamp"][i]
        end = meta[f"videos/{key}/to_timestamp"][i]
        frames = {}
        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                t = float(frame.pts * stream.time_base)
                if start - 0.5 / fps <= t < end - 0.5 / fps:
                    frames[round((t - start) * fps)] = frame.to_ndarray(format="rgb24")
        assert sorted(frames) == list(range(t_len)), (i, sorted(frames)[:5], len(frames))
        decoded = np.stack([frames[f] for f in range(t_len)]).astype(np.int16)
        err = np.abs(decoded - a["obs.pixels"][:t_len].astype(np.int16))
        errors.append(err.mean())
        print(
            f"episode {i}: {t_len} frames, video {video.relative_to(root)} "
            f"[{start:.4f}, {end:.4f}) s, mean |err| {err.mean():.3f}, max {err.max()} "
            f"(codec {stream.codec_context.name})"
        )
    print(f"PyAV decode check passed: mean abs pixel error {np.mean(errors):.3f} (0-255 scale)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", type=Path, default=Path("/tmp/lr_src"), help="gato-like data generate --out")
    parser.add_argument("--task", default="dmc-cartpole-balance")
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/lerobot_cartpole"))
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--max_steps", type=int, default=None, help="truncate each episode")
    parser.add_argument("--instruction", default=None, help="task string (default: the episode's)")
    parser.add_argument("--vcodec", default="libsvtav1", choices=["libsvtav1", "h264"])
    parser.add_argument(
        "--images", action="store_true", help="frames as PNG images in the parquet, not videos"
    )
    parser.add_argument(
        "--synthetic", action="store_true", help="uniform gray frames, one level per frame (no --src)"
    )
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--check_only", action="store_true", help="only compare --out with --src")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.check_only:
        spec, episodes = read_episodes(args.src, args.task, args.episodes)
        check(args, episodes, [k for k, o in spec["observations"].items() if o["kind"] == "proprio"])
    else:
        write(args)


if __name__ == "__main__":
    main()
