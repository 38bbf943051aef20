"""Recipes, the acting departures' data path (history windows, one-task token-budget batches),
action bounds, and the precision probe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gato_like.data_pipelines.loader import LoaderConfig, make_dataloader
from gato_like.tokenizers import SequenceBuilder
from gato_like.training.recipes import RECIPES, get_recipe
from gato_like.training.train import cpu_has_bf16

BIN = Path(sys.executable).parent


def test_recipes_are_valid_and_a_wrong_name_is_refused_before_any_work(tmp_path: Path) -> None:
    from gato_like.config import Config

    for recipe in RECIPES.values():
        Config.from_name(recipe.preset, **recipe.model)  # every override is a real, valid field
    with pytest.raises(KeyError, match="unknown recipe 'cpux'; did you mean 'cpu'"):
        get_recipe("cpux")
    result = subprocess.run([BIN / "gato-like", "train", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                             "--recipe", "cpux"], capture_output=True, text=True)  # fmt: skip
    assert result.returncode != 0 and "unknown recipe 'cpux'" in result.stderr
    assert not (tmp_path / "run").exists()


def test_history_windows_and_one_task_token_budget_batches(smoke_dataset: Path) -> None:
    config = LoaderConfig(context_length=512, history_steps=3, task_batches=True, batch_tokens=600, seed=1)
    loader = make_dataloader(smoke_dataset, 8, config, num_workers=0)
    seen = set()
    for _, batch in zip(range(12), loader, strict=False):
        assert len(set(batch["task"].tolist())) == 1  # one task per batch
        seen.add(int(batch["task"][0]))
        rows, width = batch["ids"].shape
        assert rows <= 8 and (rows == 1 or rows * width <= 600)
        for row in range(rows):
            window = ~batch["prompt_mask"][row] & batch["attention_mask"][row]
            steps = batch["timesteps"][row][window].unique()
            assert len(steps) <= 3  # at most history_steps timesteps (the prompt is apart)
    assert len(seen) >= 2


def test_a_task_weight_is_its_share_of_batches_whatever_its_episode_length(smoke_dataset: Path) -> None:
    # point mass episodes are long and BabyAI's short: drawn per decoded episode, BabyAI got several
    # times the batches of a control task; drawn per batch, equal weights give equal shares
    weights = {"dmc-point_mass-easy": 1.0, "babyai-GoToRedBall": 1.0, "captions": 0.0}
    config = LoaderConfig(context_length=512, history_steps=3, task_batches=True, batch_tokens=600, seed=3,
                          domain_weights=weights)  # fmt: skip
    counts: dict[int, int] = {}
    for _, batch in zip(range(300), make_dataloader(smoke_dataset, 8, config, num_workers=0), strict=False):
        task = int(batch["task"][0])
        counts[task] = counts.get(task, 0) + 1
    assert len(counts) == 2
    share = min(counts.values()) / sum(counts.values())
    assert 0.4 <= share <= 0.5, counts  # 300 fair draws: 0.5 +- 0.06 at 2 sigma


def test_a_one_pass_stream_of_task_batches_never_mixes_tasks(smoke_dataset: Path) -> None:
    # a finished task's short remainder must not shift later fixed-size batches across tasks
    config = LoaderConfig(context_length=512, history_steps=3, task_batches=True, resampled=False, seed=2)
    batches = list(make_dataloader(smoke_dataset, 3, config, num_workers=0))  # 4 windows a task
    assert sum(len(b["ids"]) for b in batches) == 12
    assert all(len(set(b["task"].tolist())) == 1 for b in batches)
    assert len({int(b["task"][0]) for b in batches}) == 3


@pytest.fixture(scope="module")
def two_bodies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two control tasks (continuous actions) and a BabyAI level (discrete), proprio only."""
    from gato_like.data_pipelines.generate import generate

    root = tmp_path_factory.mktemp("two_bodies")
    generate(root, tasks=["dmc-point_mass-easy", "dmc-cartpole-balance", "babyai-GoToRedBall"], episodes=2,
             max_steps=40, normalizer_episodes=1, pixels=False, workers=1, progress=False)  # fmt: skip
    return root


def test_mixed_batches_mix_the_tasks_of_one_kind_of_action_by_their_weights(two_bodies: Path) -> None:
    from gato_like.data_pipelines.loader import DatasetSource

    tasks = DatasetSource.open(two_bodies).tasks
    ids = {name: tasks.index(name) for name in tasks}
    control = {ids["dmc-point_mass-easy"], ids["dmc-cartpole-balance"]}
    weights = {"dmc-point_mass-easy": 3.0, "dmc-cartpole-balance": 1.0, "babyai-GoToRedBall": 4.0}
    config = LoaderConfig(context_length=512, history_steps=2, task_batches=True, mix_tasks=True, batch_tokens=600,
                          seed=4, domain_weights=weights)  # fmt: skip
    windows = dict.fromkeys(ids.values(), 0)
    mixed = kinds = 0
    for _, batch in zip(range(200), make_dataloader(two_bodies, 32, config, num_workers=0), strict=False):
        held = set(batch["task"].tolist())
        assert held <= control or held == {ids["babyai-GoToRedBall"]}  # never both kinds of action
        mixed += len(held) == 2
        kinds += held <= control
        for task in batch["task"].tolist():
            windows[task] += 1
    # a control batch holds both bodies (not one task a batch); windows come ~20 an episode, so
    # a batch of ~40 is sometimes two episodes of one body
    assert mixed > 0.7 * kinds, (mixed, kinds)
    assert 0.35 <= kinds / 200 <= 0.65  # a kind's share of batches: its weights' sum (4 of 8)
    share = windows[ids["dmc-point_mass-easy"]] / (
        windows[ids["dmc-point_mass-easy"]] + windows[ids["dmc-cartpole-balance"]]
    )
    assert 0.65 <= share <= 0.85, windows  # a task's share of its kind's windows: its weight (3 of 4)

    # without mixing, the same weights make batches of one task each
    config = LoaderConfig(context_length=512, history_steps=2, task_batches=True, batch_tokens=600, seed=4,
                          domain_weights=weights)  # fmt: skip
    for _, batch in zip(range(30), make_dataloader(two_bodies, 32, config, num_workers=0), strict=False):
        assert len(set(batch["task"].tolist())) == 1


def test_a_time_budget_anneals_the_learning_rate_by_the_clock() -> None:
    from gato_like.training.module import OptimConfig, lr_factor

    by_steps = OptimConfig(lr=1.0, warmup_steps=10, max_steps=1000, min_lr_ratio=0.1)
    timed = OptimConfig(lr=1.0, warmup_steps=10, max_steps=1000, min_lr_ratio=0.1, max_seconds=60.0)
    assert lr_factor(5, timed, 59.0) == lr_factor(5, by_steps) == 0.6  # warm-up is by steps
    assert lr_factor(100, by_steps, 60.0) > 0.9  # steps alone: early in the cosine
    assert lr_factor(100, timed, 30.0) == pytest.approx(0.55)  # half the time gone: half-way down
    assert lr_factor(100, timed, 600.0) == pytest.approx(0.1)  # past the budget: the floor
    assert lr_factor(1000, timed, 1.0) == pytest.approx(0.1)  # the step budget still ends it


def test_the_end_of_a_run_is_scored_unless_a_validation_just_scored_it(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from gato_like.training.rollouts import RolloutScores

    callback = RolloutScores(tmp_path, {}, {}, ["dmc-cartpole-balance"], end_gap=125)
    scored: list[int] = []
    callback.score = lambda trainer, module: scored.append(trainer.global_step)  # type: ignore[method-assign]
    callback.history = [{"step": 2500}]
    for step in (2501, 2624, 2625, 3000):  # the clock stopped this many steps in
        callback.on_train_end(SimpleNamespace(global_rank=0, global_step=step), None)  # type: ignore[arg-type]
    assert scored == [2625, 3000]
    callback.history = []  # never validated: always scored at the end
    callback.on_train_end(SimpleNamespace(global_rank=0, global_step=7), None)  # type: ignore[arg-type]
    assert scored[-1] == 7


def test_out_of_bounds_actions_are_an_error_not_clipped() -> None:
    from gato_like.envs.registry import get_task

    builder = SequenceBuilder(get_task("dmc-reacher-easy").spec)
    ok = builder.encode_actions(np.array([[1.0, -1.0]], np.float32))
    assert ok.tolist() == [[builder.layout.continuous_offset + 1023, builder.layout.continuous_offset]]
    with pytest.raises(
        ValueError, match=r"action 1.5 at index \(0, 1\) is outside the action bounds \[-1.0, 1.0\]"
    ):
        builder.encode_actions(np.array([[0.0, 1.5]]))
    with pytest.raises(ValueError, match="outside the action bounds"):
        builder.encode_actions(np.array([[np.nan, 0.0]]))


def test_bf16_is_chosen_from_the_cpu_flags() -> None:
    assert cpu_has_bf16("model name: x\nflags\t: fpu sse avx512f avx512_bf16 fma\n")
    assert cpu_has_bf16("flags : amx_bf16 amx_tile\n")
    assert not cpu_has_bf16("flags : fpu sse avx2 avx512f\n")
    assert not cpu_has_bf16("")


def test_the_recipes_task_weights_apply_to_the_tasks_a_dataset_has(
    smoke_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # the cpu recipe names the default suite's tasks; a dataset with only some of them still trains,
    # with the recipe's weights for those, and the run records what it used
    import json
    from dataclasses import replace

    from gato_like.training import recipes

    weighted = replace(
        get_recipe("cpu"), name="cpu", domain_weights=dict(recipes.SUITE_WEIGHTS), goal_every=8
    )
    monkeypatch.setitem(recipes.RECIPES, "cpu", weighted)  # the CLI below runs in this process
    run = tmp_path / "run"
    argv = ["gato-like", "train", "--data", str(smoke_dataset), "--out", str(run), "--recipe", "cpu",
            "--preset", "debug", "--max_steps", "2", "--val_every", "2", "--rollout_episodes", "0", "--max_minutes", "5"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    from gato_like.cli import main

    assert main(argv[1:]) == 0, capsys.readouterr().err[-2000:]
    settings = json.loads((run / "checkpoint" / "meta.json").read_text())["settings"]
    assert settings["domain_weights"] == {"babyai-GoToRedBall": 0.5, "dmc-point_mass-easy": 1.0}
    assert settings["goal_every"] == 8
    # its output is not a terminal: plain progress lines instead of a bar that draws nothing
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[train] ")]
    assert lines and lines[0].startswith("[train] step 1/2 (50%) | loss ")
    assert "tokens/s, " in lines[0] and "timesteps/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("[train] step 2/2 (100%)") and lines[-1].endswith("(done)")


def test_weights_of_tasks_the_dataset_lacks_are_refused_before_any_work(
    smoke_dataset: Path, tmp_path: Path
) -> None:
    result = subprocess.run([BIN / "gato-like", "train", "--data", str(smoke_dataset), "--out", str(tmp_path / "run"),
                             "--domain_weights", '{"dmc-pendulm-swingup": 2}'], capture_output=True, text=True)  # fmt: skip
    assert result.returncode != 0
    assert "domain_weights: no task(s) ['dmc-pendulm-swingup'] in the dataset" in result.stderr
    assert not (tmp_path / "run").exists()
    result = subprocess.run([BIN / "gato-like", "train", "--data", str(smoke_dataset), "--out", str(tmp_path / "run"),
                             "--goal_every", "-1"], capture_output=True, text=True)  # fmt: skip
    assert result.returncode != 0 and "goal_every: expected a step interval >= 0" in result.stderr
    assert not (tmp_path / "run").exists()
    result = subprocess.run([BIN / "gato-like", "train", "--data", str(smoke_dataset), "--out", str(tmp_path / "run"),
                             "--threads", "0"], capture_output=True, text=True)  # fmt: skip
    assert result.returncode != 0 and "threads: expected a count of torch threads >= 1" in result.stderr
    assert not (tmp_path / "run").exists()


def test_discrete_bodies_get_their_own_token_budget(smoke_dataset: Path) -> None:
    """``discrete_batch_tokens`` sets the budget of BabyAI's batches; the control tasks keep
    ``batch_tokens``."""
    from gato_like.data_pipelines.loader import DatasetSource

    weights = {"dmc-point_mass-easy": 1.0, "babyai-GoToRedBall": 1.0, "captions": 0.0}
    tasks = DatasetSource.open(smoke_dataset).tasks
    control, babyai = tasks.index("dmc-point_mass-easy"), tasks.index("babyai-GoToRedBall")
    rows: dict[int, dict[int, int]] = {}
    for budget in (0, 2400):
        config = LoaderConfig(context_length=512, history_steps=2, discrete_history_steps=1, task_batches=True,
                              batch_tokens=600, discrete_batch_tokens=budget, seed=3, domain_weights=weights)  # fmt: skip
        most: dict[int, int] = {}
        for _, batch in zip(
            range(40), make_dataloader(smoke_dataset, 64, config, num_workers=0), strict=False
        ):
            task, (n, width) = int(batch["task"][0]), batch["ids"].shape
            assert n == 1 or n * width <= (budget or 600) if task == babyai else n * width <= 600
            most[task] = max(most.get(task, 0), n)
        rows[budget] = most
    assert rows[2400][babyai] > 2 * rows[0][babyai]
    assert control in rows[2400]  # and its batches kept the 600-token budget (above)


def test_token_budget_batches_group_windows_of_like_length(smoke_dataset: Path) -> None:
    """With a token budget, a batch holds windows within ``length_groups`` of each other's length,
    so a prompted window (about twice as long) does not pad a batch of plain ones; without
    grouping the same stream's batches are padded."""
    padding: dict[float, float] = {}
    for factor in (0.0, 1.25):
        config = LoaderConfig(context_length=512, history_steps=1, task_batches=True, batch_tokens=2400,
                              seed=3, domain_weights={"babyai-GoToRedBall": 1.0, "captions": 0.0,
                              "dmc-point_mass-easy": 0.0}, length_groups=factor)  # fmt: skip
        real = padded = 0
        for _, batch in zip(
            range(40), make_dataloader(smoke_dataset, 64, config, num_workers=0), strict=False
        ):
            n, width = batch["ids"].shape
            assert n == 1 or n * width <= 2400
            lengths = batch["attention_mask"].sum(1).float()
            if factor:
                assert float(lengths.max() / lengths.min()) <= factor**2 + 1e-6, lengths
            real, padded = real + int(lengths.sum()), padded + n * width
        padding[factor] = 1 - real / padded
    assert padding[1.25] < 0.1 and padding[0.0] > 2 * padding[1.25], padding
