"""The streaming loader: whole-timestep windows, prompts, goals, domain weights, worker splits,
named errors for broken shards, and URLs."""

import functools
import http.server
import itertools
import shutil
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from gato_like.data_pipelines.episodes import EpisodeFormatError
from gato_like.data_pipelines.loader import DatasetSource, LoaderConfig, SequenceDataset, make_dataloader
from gato_like.data_pipelines.shards import DatasetError, read_index
from gato_like.tokenizers import TokenType


def _take(root, n: int, **config) -> list[dict]:
    dataset = SequenceDataset(DatasetSource.open(root), LoaderConfig(**config))
    out = []
    for sample in dataset:
        out.append(sample)
        if len(out) == n:
            break
    return out


def test_windows_are_whole_timesteps_within_the_context(smoke_dataset: Path) -> None:
    samples = _take(smoke_dataset, 60, context_length=256, prompt_probability=0.0)
    for s in samples:
        assert len(s["ids"]) <= 256
        ts, local = s["timesteps"], s["local_positions"]
        assert ts[0] == 0 and (np.diff(ts) >= 0).all()
        # every timestep starts at local position 0 and ends with its actions
        starts = np.flatnonzero(np.diff(ts, prepend=-1))
        assert (local[starts] == 0).all()
        assert s["types"][-1] == TokenType.ACTION
        assert (s["loss_mask"] == np.isin(s["types"], [TokenType.TEXT, TokenType.ACTION])).all()
        assert len(s["patches"]) == int((s["types"] == TokenType.IMAGE).sum())
    # windows use the context: most are longer than half of it
    assert np.median([len(s["ids"]) for s in samples]) > 128


def test_prompts_goals_and_loss_mask(smoke_dataset: Path) -> None:
    samples = _take(smoke_dataset, 400, context_length=512, prompt_probability=0.25)
    prompted = [s for s in samples if s["prompt_mask"].any()]
    share = len(prompted) / len(samples)
    assert 0.15 < share < 0.35, share
    for s in prompted:
        n = int(s["prompt_mask"].sum())
        assert s["prompt_mask"][:n].all() and not s["prompt_mask"][n:].any()  # the prompt comes first
        assert not s["loss_mask"][:n].any()  # and is not a target
        assert s["local_positions"][n] == 0  # the episode window starts at a timestep boundary
    for s in samples:
        goal_types = s["goal_types"]
        assert len(goal_types) and not np.isin(goal_types, [TokenType.SEPARATOR, TokenType.ACTION]).any()


def test_domain_weights(smoke_dataset: Path) -> None:
    source = DatasetSource.open(smoke_dataset)
    weights = dict.fromkeys(source.tasks, 0.0) | {"captions": 1.0}
    samples = _take(smoke_dataset, 30, context_length=256, domain_weights=weights)
    assert {int(s["task"]) for s in samples} == {source.tasks.index("captions")}
    counts = Counter(int(s["task"]) for s in _take(smoke_dataset, 300, context_length=256))
    # equal weights by default: each task's episodes are drawn alike; a window share follows the
    # episode's length in tokens (a BabyAI episode of 49-cell views gives 1-3 windows of 256)
    assert len(counts) == 3 and min(counts.values()) > 30, counts


def test_one_pass_split_across_workers_sees_each_episode_once(smoke_dataset: Path) -> None:
    config = LoaderConfig(context_length=256, resampled=False, hindsight_goals=False)
    loader = make_dataloader(smoke_dataset, batch_size=3, config=config, num_workers=2)
    seen = [key for batch in loader for key in batch["episode"]]
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 12  # 3 tasks x 4 episodes, no repeats


def test_batches_are_padded_with_masks(smoke_dataset: Path) -> None:
    loader = make_dataloader(
        smoke_dataset, batch_size=4, config=LoaderConfig(context_length=256), num_workers=0
    )
    batch = next(iter(loader))
    pad_id = 1024 + 2049
    b, length = batch["ids"].shape
    assert b == 4 and batch["attention_mask"].shape == (b, length)
    assert (batch["ids"][~batch["attention_mask"]] == pad_id).all()
    assert not batch["loss_mask"][~batch["attention_mask"]].any()
    assert batch["patches"].shape[2:] == (3, 16, 16) and batch["patches"].dtype == torch.float32
    assert batch["patch_mask"].sum() == (batch["types"] == TokenType.IMAGE).sum()
    assert batch["goal_ids"].shape[0] == 4


def test_broken_shards_and_samples_name_the_shard(smoke_dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "broken"
    shutil.copytree(smoke_dataset, root)
    shard = root / read_index(root)["tasks"]["babyai-GoToRedBall"]["shards"][0]["path"]
    shard.write_bytes(shard.read_bytes()[:1500])  # truncated mid-member
    with pytest.raises(EpisodeFormatError, match=r"shard .*babyai-GoToRedBall/shard-000000.tar"):
        _take(root, 200, context_length=256, domain_weights={"babyai-GoToRedBall": 1.0, "captions": 0.0, "dmc-point_mass-easy": 0.0})  # fmt: skip
    # with on_error="skip" training goes on with the readable shards
    assert len(_take(root, 20, context_length=256, on_error="skip")) == 20


def test_spec_mismatch_names_shard_and_sample(smoke_dataset: Path, tmp_path: Path) -> None:
    import json

    root = tmp_path / "mismatch"
    shutil.copytree(smoke_dataset, root)
    spec_path = root / "dmc-point_mass-easy" / "embodiment.json"
    spec = json.loads(spec_path.read_text())
    spec["observations"]["position"]["shape"] = [3]
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(
        EpisodeFormatError,
        match=r"(?s)shard .*dmc-point_mass-easy/shard-00000\d.tar: sample 'dmc-point_mass-easy-00000\d'.*obs.position: wrong shape",
    ):
        _take(root, 50, context_length=256, domain_weights={"dmc-point_mass-easy": 1.0, "captions": 0.0, "babyai-GoToRedBall": 0.0})  # fmt: skip


def test_missing_index_and_too_short_context(tmp_path: Path, smoke_dataset: Path) -> None:
    with pytest.raises(DatasetError, match=r"no index\.json"):
        DatasetSource.open(tmp_path)
    with pytest.raises(DatasetError, match=r"no task\(s\) \['nope'\]"):
        DatasetSource.open(smoke_dataset, tasks=["nope"])
    with pytest.raises(
        ValueError,
        match=r"context_length 32 is shorter than one timestep of babyai-GoToRedBall \(52\+ backbone inputs\)",
    ):
        SequenceDataset(DatasetSource.open(smoke_dataset), LoaderConfig(context_length=32))


def test_streams_from_an_http_url(smoke_dataset: Path) -> None:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(smoke_dataset))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        remote = _take(url, 12, context_length=256)
        local = _take(smoke_dataset, 12, context_length=256)
        for a, b in zip(remote, local, strict=True):
            assert a["episode"] == b["episode"]
            np.testing.assert_array_equal(a["ids"], b["ids"])
    finally:
        server.shutdown()


def test_config_mistakes_are_named(smoke_dataset: Path) -> None:
    source = DatasetSource.open(smoke_dataset)
    with pytest.raises(ValueError, match=r"domain_weights: no task\(s\) \['babyai-gotoredball'\]"):
        SequenceDataset(source, LoaderConfig(domain_weights={"babyai-gotoredball": 0.0}))
    with pytest.raises(ValueError, match="at least one positive"):
        SequenceDataset(source, LoaderConfig(domain_weights=dict.fromkeys(source.tasks, 0.0)))
    with pytest.raises(ValueError, match="on_error: expected 'raise' or 'skip', got 'Raise'"):
        SequenceDataset(source, LoaderConfig(on_error="Raise"))


@pytest.mark.parametrize(("context", "fraction"), [(160, 0.5), (200, 0.9), (300, 0.3), (512, 0.5)])
def test_sequences_never_exceed_the_context(smoke_dataset: Path, context: int, fraction: float) -> None:
    samples = _take(
        smoke_dataset, 150, context_length=context, prompt_probability=0.5, prompt_max_fraction=fraction
    )
    assert max(len(s["ids"]) for s in samples) <= context


def test_one_pass_tokenization_equals_tokenizing_each_window(smoke_dataset: Path) -> None:
    """The loader tokenizes every timestep an episode's windows, goals and prompt candidates need
    in one pass and cuts them apart; each piece must equal tokenizing its span on its own."""
    import random
    from collections import deque

    from gato_like.data_pipelines.loader import WindowSampler
    from gato_like.data_pipelines.shards import iter_task

    source = DatasetSource.open(smoke_dataset)
    sampler = WindowSampler(source, LoaderConfig(context_length=512, history_steps=3, prompt_probability=0.5))
    fields = ("ids", "types", "timesteps", "local_positions", "loss_mask", "patches", "patch_positions")
    checked = 0
    for task in source.tasks:  # images (captions), proprioception and text
        builder = sampler.builders[task]
        pool: deque = deque(maxlen=4)
        for episode in list(iter_task(smoke_dataset, task))[:3]:
            bounds = sampler.bounds(episode)
            samples, candidates = sampler.episode_samples(episode, bounds, random.Random(7), pool, 5)
            plans, spans, chosen = sampler.plan(episode, bounds, random.Random(7), pool, 5)
            assert len(samples) == 5 and len(candidates) == chosen
            alone = [
                builder.build({k: v[a:b] for k, v in episode.observations.items()}, episode.actions[a:b])
                for a, b in spans
            ]
            pieces = iter(alone)
            for i, (sample, (prompt, has_goal)) in enumerate(zip(samples, plans, strict=True)):
                n = len(prompt) if prompt is not None else 0
                window = next(pieces)
                for name in ("ids", "types", "local_positions", "loss_mask"):
                    np.testing.assert_array_equal(sample[name][n:], getattr(window, name), err_msg=name)
                np.testing.assert_array_equal(
                    sample["timesteps"][n:] - sample["timesteps"][n], window.timesteps
                )
                # the dynamics head's change targets: each proprio value minus the episode's step
                # before (the window's first step too); none after another episode's prompt
                a, b = spans[2 * i]
                before = np.maximum(np.arange(a, b) - 1, 0)
                previous = {k: episode.observations[k][before] for k in builder.tensor_keys}
                observations = {k: v[a:b] for k, v in episode.observations.items()}
                changes = builder.build(observations, episode.actions[a:b], previous=previous).dynamics_ids
                if prompt is not None:
                    first = (window.timesteps == 0) & (window.types < TokenType.SEPARATOR)
                    changes = np.where(first, -1, changes)
                np.testing.assert_array_equal(sample["dynamics_ids"][n:], changes)
                np.testing.assert_array_equal(
                    sample["patches"][len(sample["patches"]) - len(window.patches) :], window.patches
                )
                assert has_goal
                goal_step = spans[2 * i + 1][0]
                goal = builder.build_step({k: v[goal_step] for k, v in episode.observations.items()})
                keep = goal.types != TokenType.SEPARATOR
                np.testing.assert_array_equal(sample["goal_ids"], goal.ids[keep])
                np.testing.assert_array_equal(sample["goal_local_positions"], goal.local_positions[keep])
                np.testing.assert_array_equal(sample["goal_patches"], goal.patches)
                next(pieces)
                checked += 1
            for candidate in candidates:
                reference = next(pieces)
                for name in fields:
                    np.testing.assert_array_equal(
                        getattr(candidate, name), getattr(reference, name), err_msg=name
                    )
            pool.append((episode.key, candidates))
    assert checked == 5 * 3 * len(source.tasks)
    # the prompts drawn from the pool were exercised too
    assert any(p is not None for p, _ in plans)


@pytest.mark.parametrize("backbone", ["pooled", "perceiver", "decoder"])
def test_training_windows_and_the_acting_window_hold_the_same_timesteps(smoke_dataset: Path, tmp_path: Path, backbone: str) -> None:  # fmt: skip
    """``context_length`` counts backbone inputs for the loader as for the acting core: a folding
    backbone is trained on windows of as many timesteps as it attends over when it acts (before,
    the loader counted raw tokens, so a pooled model acted over several times the history it had
    been trained on)."""
    from gato_like.checkpoint import save_checkpoint
    from gato_like.config import Config
    from gato_like.data_pipelines.shards import iter_task
    from gato_like.model import GatoModel
    from gato_like.policy import Policy
    from gato_like.timestep import sequence_cost
    from gato_like.tokenizers import TextTokenizer

    task = "dmc-point_mass-easy"  # pixels and proprio: two groups, 4 latents, or 16 patches + 4 values
    config = Config.from_name("debug", backbone=backbone, context_length=64)
    source = DatasetSource.open(smoke_dataset, [task])
    loader = LoaderConfig(context_length=64, backbone=backbone, perceiver_latents=config.perceiver_latents,
                          prompt_probability=0.0, hindsight_goals=False)  # fmt: skip
    samples = list(itertools.islice(SequenceDataset(source, loader), 40))
    costs = [sequence_cost(backbone, config.perceiver_latents, s["types"], s["timesteps"]) for s in samples]
    trained = max(len(np.unique(s["timesteps"])) for s in samples)
    assert max(costs) <= 64

    path = save_checkpoint(tmp_path / "ckpt", GatoModel(config), TextTokenizer(), {task: source.specs[task]}, {task: {}})  # fmt: skip
    policy = Policy.from_checkpoint(path)
    policy.reset(task)
    episode = next(iter_task(smoke_dataset, task))
    acted = 0
    for t in range(episode.length):
        policy.act({k: v[t] for k, v in episode.observations.items()})
        acted = max(acted, len(policy.envs[0].steps))
    per_step = {"pooled": 2 + 3, "perceiver": config.perceiver_latents + 3}.get(backbone, costs[0] // trained)
    assert trained == acted == 64 // per_step, (trained, acted, per_step)


def test_discrete_bodies_get_their_own_history(smoke_dataset: Path) -> None:
    """``discrete_history_steps`` caps the windows (and prompts) of tasks with discrete actions;
    the others keep ``history_steps``: BabyAI windows of one timestep beside point mass's two."""
    from gato_like.data_pipelines.loader import WindowSampler

    tasks = ["dmc-point_mass-easy", "babyai-GoToRedBall"]
    source = DatasetSource.open(smoke_dataset, tasks)
    config = LoaderConfig(context_length=1024, backbone="pooled", history_steps=2, discrete_history_steps=1,
                          prompt_probability=1.0, prompt_max_fraction=0.9, hindsight_goals=False)  # fmt: skip
    sampler = WindowSampler(source, config)
    assert [sampler.history(t) for t in tasks] == [2, 1]
    steps: dict[int, set[int]] = {0: set(), 1: set()}
    prompted: dict[int, set[int]] = {0: set(), 1: set()}
    for sample in itertools.islice(SequenceDataset(source, config), 200):
        n = int(sample["prompt_mask"].sum())  # the prompt comes first
        window, prompt = sample["timesteps"][n:], sample["timesteps"][:n]
        steps[int(sample["task"])].add(len(np.unique(window)))
        if n:
            prompted[int(sample["task"])].add(len(np.unique(prompt)))
    ids = {t: i for i, t in enumerate(source.tasks)}
    assert steps[ids["dmc-point_mass-easy"]] == {2} and steps[ids["babyai-GoToRedBall"]] == {1}
    assert max(prompted[ids["babyai-GoToRedBall"]]) == 1 and max(prompted[ids["dmc-point_mass-easy"]]) == 2


def test_pad_rows_matches_one_copy_per_row() -> None:
    """The batch padding scatters every row at once; it must equal the plain loop, on both sides,
    with empty rows and trailing dimensions (image patches)."""
    from gato_like.data_pipelines.loader import pad_rows

    rng = np.random.default_rng(0)
    for shape in [(), (3,), (3, 2, 2)]:
        arrays = [rng.integers(0, 100, size=(int(n), *shape)) for n in rng.integers(0, 7, size=9)]
        arrays[0] = arrays[0][:0]  # an empty row
        longest = max(len(a) for a in arrays)
        for left in (False, True):
            expected = np.full((len(arrays), longest, *shape), -1, dtype=np.int64)
            for i, a in enumerate(arrays):
                if len(a) and left:
                    expected[i, longest - len(a) :] = a
                elif len(a):
                    expected[i, : len(a)] = a
            got = pad_rows(arrays, -1, np.int64, left=left)
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, expected)
