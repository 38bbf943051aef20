"""Training: the stack learns. A debug-sized model trained for a few hundred steps on BabyAI
GoToRedBall expert episodes, then rolled out with the runtime agent in the real environment,
beats a uniform-random policy by a stated expert-normalized margin."""

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from gato_like.data_pipelines.generate import generate

#: The stated target: expert-normalized score (R - R_random) / (R_expert - R_random) after 300 steps.
TARGET_SCORE = 0.1


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gato_like.training.train import train

    root = tmp_path_factory.mktemp("train")
    generate(
        root / "data",
        tasks=["babyai-GoToRedBall"],
        episodes=200,
        normalizer_episodes=20,
        workers=1,
        progress=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(root / "data", root / "run", preset="debug", max_steps=300, batch_size=16, context_length=512,
                     lr=1e-3, warmup_steps=30, val_every=1000, workers=1, progress=False)  # fmt: skip


def test_precision_probe_times_both_and_leaves_the_rng(trained: Path) -> None:
    from gato_like.config import Config
    from gato_like.training.data import GatoData
    from gato_like.training.train import precision_choice, probe_precision

    config = Config.from_name("debug", context_length=512)
    data = GatoData(trained.parent.parent / "data", 4, 512, 0)
    stream = iter(data._loader(0))
    batches = [next(stream)]
    before = torch.random.get_rng_state()
    probe = probe_precision(config, batches, repeats=1)
    assert torch.equal(torch.random.get_rng_state(), before)  # training's seeded RNG is not consumed
    assert probe["fp32_s"] > 0 and probe["bf16_s"] > 0
    assert probe["choice"] == precision_choice(probe["fp32_s"], probe["bf16_s"])
    # bf16 on a near tie (it learned BabyAI better at the same steps); fp32 only when clearly faster
    assert precision_choice(0.064, 0.065) == precision_choice(0.050, 0.045) == "bf16-mixed"
    assert precision_choice(0.040, 0.050) == "32-true"
    with pytest.raises(ValueError, match="at least one batch"):
        probe_precision(config, [])


def test_run_directory_and_logs(trained: Path) -> None:
    run = trained.parent
    assert (trained / "model.safetensors").is_file() and json.loads((trained / "meta.json").read_text())[
        "step"
    ] == 300
    lines = (run / "logs" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    losses = [float(row.split(",")[header.index("train/policy_loss")]) for row in lines[1:] if row.split(",")[header.index("train/policy_loss")]]  # fmt: skip
    assert losses[-1] < 0.25 * losses[0]  # the policy loss falls by 4x or more
    assert (run / "lightning" / "last.ckpt").is_file()


def test_trained_policy_beats_random_in_the_environment(trained: Path) -> None:
    import gymnasium as gym
    import minigrid  # noqa: F401

    from gato_like.policy import Policy

    policy = Policy.from_checkpoint(trained)
    normalizers = policy.checkpoint.tasks["babyai-GoToRedBall"]["returns"]
    returns = []
    for seed in range(1000, 1020):
        policy.reset("babyai-GoToRedBall")
        env = gym.make("BabyAI-GoToRedBall-v0", max_steps=64)
        with contextlib.redirect_stdout(io.StringIO()):
            obs, _ = env.reset(seed=seed)
        total = 0.0
        for _ in range(64):
            observation = {"mission": obs["mission"], "image": np.asarray(obs["image"], np.uint8), "direction": int(obs["direction"])}  # fmt: skip
            obs, reward, terminated, truncated, _ = env.step(int(policy.act(observation)[0]))
            total += float(reward)
            if terminated or truncated:
                break
        returns.append(total)
    expert, random = normalizers["expert"]["mean"], normalizers["random"]["mean"]
    score = (np.mean(returns) - random) / (expert - random)
    assert score >= TARGET_SCORE, (score, np.mean(returns), expert, random)


def test_eval_command_scores_writes_json_and_plot(trained: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    result = subprocess.run(
        [bin_dir / "gato-like", "eval", "--ckpt", str(trained), "--out", str(tmp_path), "--episodes", "3"],
        capture_output=True, text=True, check=True, env={"PATH": str(bin_dir), "MUJOCO_GL": "egl"},
    )  # fmt: skip
    assert "babyai-GoToRedBall" in result.stdout
    summary = json.loads((tmp_path / "eval.json").read_text())
    task = summary["tasks"]["babyai-GoToRedBall"]
    assert task["episodes"] == 3 and len(task["returns"]) == 3 and task["expert_normalized_score"] is not None
    assert (tmp_path / "scores.png").stat().st_size > 0
    card = (tmp_path / "model_card.md").read_text()
    assert "# Model card: gato-like `debug`" in card
    assert (
        f"| babyai-GoToRedBall | 3 | {task['mean_return']:,.2f} | {task['expert_normalized_score']:,.2f} |"
        in card
    )
    # the run was scored once, at its end (its validations came later than max_steps)
    assert "| optimizer steps | 300 (the " in card and "closed-loop score" in card
    assert "gato-like eval --ckpt" in card
    assert "| next-observation (dynamics) loss | weight 0.5" in card  # a departure from Gato's losses
    assert "{{" not in card and "Undefined" not in card


def test_training_meta_records_compute_and_tokens(trained: Path) -> None:
    meta = json.loads((trained / "meta.json").read_text())
    assert meta["preset"] == "debug" and meta["settings"]["batch_size"] == 16
    assert meta["tokens"] > 300 * 16 * 100  # 300 steps of 16 sequences, mostly full
    # every timestep has one separator: a decoder window of ~256 tokens holds a few dozen
    assert 300 * 16 <= meta["timesteps"] < meta["tokens"] / 4
    from gato_like.training.train import cpu_has_bf16, default_precision, precision_choice

    # bf16-mixed only where the machine has bf16 units; on such a CPU, what the timing probe chose
    probe = meta["settings"].get("precision_probe")
    assert (probe is not None) == (cpu_has_bf16() and not torch.cuda.is_available())
    chosen = probe["choice"] if probe else default_precision()
    assert meta["tokens_per_second"] > 0 and meta["compute"]["precision"] == chosen
    if probe:
        # bf16 unless fp32 is clearly faster (FP32_MARGIN)
        assert chosen == precision_choice(probe["fp32_s"], probe["bf16_s"])
        assert probe["fp32_s"] > 0 and probe["bf16_s"] > 0
    assert (trained.parent / "losses.png").stat().st_size > 0


@pytest.mark.parametrize(("stderr", "kept"), [(0.05, 200), (0.01, 100), (None, 200)])
def test_the_final_weights_are_exported_unless_a_validation_beat_them_beyond_the_noise(tmp_path: Path, stderr, kept: int) -> None:  # fmt: skip
    """A validation 0.05 ahead of the final score keeps its weights only when that lead is more
    than two standard errors of the difference; with no spread measured (one episode per task)
    the annealed final weights are exported."""
    from types import SimpleNamespace

    from gato_like.config import Config
    from gato_like.model import GatoModel
    from gato_like.training.rollouts import RolloutScores

    callback = RolloutScores(tmp_path, {}, {}, ["dmc-point_mass-easy"], episodes=3)
    scores = {"dmc-point_mass-easy": 0.0}
    callback.history = [
        {"step": 100, "mean_score": 0.60, "stderr": stderr, "scores": scores},
        {"step": 200, "mean_score": 0.55, "stderr": stderr, "scores": scores},
    ]
    callback.best = 0.60
    module = SimpleNamespace(model=GatoModel(Config.from_name("debug")))
    callback.choose(SimpleNamespace(global_step=200), module)  # type: ignore[arg-type]
    assert callback.chosen is not None and callback.chosen["step"] == kept
    exported = (tmp_path / "best" / "meta.json").is_file()
    assert exported == (kept == 200)
    if exported:
        assert json.loads((tmp_path / "best" / "meta.json").read_text())["rollout"]["step"] == 200
    assert json.loads((tmp_path / "rollouts.json").read_text())["chosen"] == callback.chosen
