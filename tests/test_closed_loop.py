"""The agent acts: a debug model trained for ~1 minute on DART-perturbed cartpole-balance expert
episodes (proprioception only) balances the pole in closed loop, in the real simulator, on seeds no
training episode used; and the scores of that rollout are what training logs and keeps.

This test fails when the agent stops reading the state (e.g. copies its previous action: a constant
action scores ~0.4 here and a copying agent scored 0.53, the expert 1.0, uniform random 0.0). Both
timestep representations are trained: Gato's tokens (decoder) and pooled timesteps."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from gato_like.data_pipelines.generate import generate
from gato_like.training.recipes import ACTING

#: Well above the 0.53 of a copying agent (a pooled model with action tokens as inputs scored exactly
#: that here, and 0.33 with 16 windows a batch); both representations as set below pass it. Not 0.8:
#: a pooled run that balanced 4 of the 5 episodes scored 0.78 on a clean clone (the training is not
#: bit-reproducible across machines), and the bar must not flake.
TARGET_SCORE = 0.7
EPISODES = 5
TASK = "dmc-cartpole-balance"


#: Each representation with the settings it is used with (model fields, batch size): Gato's tokens as
#: the paper has them, 16 windows of the whole context; pooled timesteps with the CPU recipes'
#: departures (actions never inputs, 2 timesteps), so as many action targets a batch takes 256
#: windows. With action tokens as inputs, a pooled model trained so copies the last action (0.53).
#: Pooled trains 360 steps: at 240 it sat at the bar, and a change of the fold's summation order
#: alone (the same sums, rounded differently) took it from a pass to 0.47.
SETTINGS = {"decoder": ({}, 16, 240), "pooled": ({"backbone": "pooled", **ACTING}, 256, 360)}


@pytest.fixture(scope="module", params=list(SETTINGS))
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gato_like.training.train import train

    root = tmp_path_factory.mktemp(f"closed_loop_{request.param}")
    generate(root / "data", tasks=[TASK], episodes=12, max_steps=500, normalizer_episodes=4, workers=1,
             progress=False, pixels=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, batch_size, steps = SETTINGS[request.param]
        return train(root / "data", root / "run", preset="debug", max_steps=steps, batch_size=batch_size, lr=2e-3,
                     warmup_steps=24, val_every=steps // 2, workers=0, progress=False, rollout_episodes=2,
                     model=model)  # fmt: skip


def test_training_logs_closed_loop_scores_and_keeps_the_best(run: Path) -> None:
    assert run.name == "best"
    history = json.loads((run.parent / "rollouts.json").read_text())
    steps = json.loads((run / "meta.json").read_text())["settings"]["max_steps"]
    assert [h["step"] for h in history["history"]] == [steps // 2, steps]
    minutes = [h["minutes"] for h in history["history"]]
    assert 0 < minutes[0] < minutes[1] < 10  # training minutes beside each score: the curve's x
    assert (run.parent / "scores.png").stat().st_size > 10_000
    best = max(h["mean_score"] for h in history["history"])
    assert history["best"] == best
    # best/ holds the weights the run chose: the final ones unless a validation led them by more
    # than its noise (this test once compared with the best score, and failed when the midpoint
    # scored 1.0008 and the chosen final weights 1.0006)
    meta = json.loads((run / "meta.json").read_text())
    chosen = next(h for h in history["history"] if h["step"] == history["chosen"]["step"])
    assert meta["rollout"]["step"] == chosen["step"]
    assert meta["rollout"]["mean_score"] == round(chosen["mean_score"], 4)
    assert history["chosen"]["reason"] == meta["rollout"]["chosen"]
    header = (run.parent / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert f"rollout/{TASK}/score" in header.split(",") and "rollout/mean_score" in header.split(",")


def test_trained_policy_balances_the_pole_in_closed_loop(run: Path, tmp_path: Path) -> None:
    from gato_like.training.evaluate import evaluate

    summary = evaluate(run, tmp_path, episodes=EPISODES, write_card_file=False, media=False)
    result = summary["tasks"][TASK]
    assert result["max_steps"] == 500 and not result["normalizers"]["expert_measured_here"]
    assert result["expert_normalized_score"] >= TARGET_SCORE, result


def test_rollout_tasks_without_a_simulator_are_refused_before_training(run: Path, tmp_path: Path) -> None:
    from gato_like.training.train import train

    with pytest.raises(ValueError, match="'captions' is not a task of the dataset"):
        train(
            run.parent.parent / "data",
            tmp_path / "x",
            preset="debug",
            max_steps=1,
            rollout_tasks=["captions"],
        )
    assert not (tmp_path / "x").exists()
