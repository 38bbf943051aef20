"""Few-shot fine-tuning: LoRA algebra, what each mode trains, every bad input refused before
training, and an end-to-end run from `data convert` to a Policy acting on the new body."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gato_like.checkpoint import load_checkpoint, save_checkpoint, tokenizer_sha256
from gato_like.cli import main
from gato_like.config import Config
from gato_like.data_pipelines.convert import convert_npz
from gato_like.data_pipelines.episodes import Episode
from gato_like.data_pipelines.generate import without_images
from gato_like.data_pipelines.shards import TaskShardWriter, write_index
from gato_like.envs.registry import get_task
from gato_like.lora import LoRALinear, apply_lora, merge_lora
from gato_like.model import GatoModel
from gato_like.policy import Policy
from gato_like.tokenizers import TextTokenizer
from gato_like.training.finetune import FinetuneConfig, FinetuneError, finetune, load_demos, select_trainable
from gato_like.training.recipes import ACTING

ARM3 = without_images(get_task("arm3-reach").spec)  # proprioception only: cheap and fully observed


def _batch(config: Config) -> dict[str, torch.Tensor]:
    from gato_like.data_pipelines.loader import collate, sequence_sample
    from gato_like.tokenizers import SequenceBuilder

    episode = get_task("arm3-reach").rollout(3, "expert", render=False, max_steps=6)
    tokens = SequenceBuilder(ARM3).build(episode.observations, episode.actions)
    return collate([sequence_sample(tokens, 0, 0, "e")], config.layout.pad_id)


def test_lora_starts_as_the_base_and_merges_exactly() -> None:
    torch.manual_seed(0)
    config = Config.from_name("debug")
    model = GatoModel(config).eval()
    batch = _batch(config)
    keys = set(model.state_dict())
    before = model(batch, logits=True)["policy_logits"]
    adapted = apply_lora(model, rank=4, alpha=8.0)
    assert adapted == [
        f"blocks.{i}.{n}" for i in range(config.n_layer) for n in ("qkv", "proj", "fc", "fc_out")
    ]
    torch.testing.assert_close(model(batch, logits=True)["policy_logits"], before)  # B = 0
    for module in model.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_b, std=0.05)
    with torch.no_grad():
        lora = model(batch, logits=True)["policy_logits"]
    assert not torch.allclose(lora, before, atol=1e-3)
    assert merge_lora(model) == 4 * config.n_layer
    assert set(model.state_dict()) == keys  # the base checkpoint format, nothing added
    torch.testing.assert_close(model(batch, logits=True)["policy_logits"], lora, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("mode", "trained", "frozen"),
    [
        ("head", {"tokens.weight", "ln_f.weight", "dynamics_adapter.0.weight"}, {"blocks.0.qkv.weight", "local.weight"}),
        ("lora", {"blocks.0.qkv.lora_a", "blocks.1.fc_out.lora_b", "blocks.0.ln_1.weight", "goal_adapter.0.weight", "dynamics_adapter.2.bias", "goal_segment"}, {"blocks.0.qkv.base.weight", "tokens.weight"}),
        ("full", {"blocks.0.qkv.weight", "tokens.weight", "patches.stem.weight"}, set()),
    ],
)  # fmt: skip
def test_each_mode_trains_what_it_says(mode: str, trained: set[str], frozen: set[str]) -> None:
    model = GatoModel(Config.from_name("debug"))
    count = select_trainable(model, mode, rank=4, alpha=8.0)  # type: ignore[arg-type]
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained <= grads and not frozen & grads
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)
    share = {"lora": 0.25, "head": 0.6, "full": 1.0}[mode]  # head: the tied output layer is most of it
    assert count <= share * sum(p.numel() for p in model.parameters())


# -- inputs ------------------------------------------------------------------------------------------


def _base(path: Path, model: dict | None = None, **meta: object) -> Path:
    """A debug base checkpoint on point mass; ``model``: overrides of its config."""
    torch.manual_seed(0)
    text = TextTokenizer()
    point = get_task("dmc-point_mass-easy")
    spec = without_images(point.spec)
    meta = {
        "preset": "debug",
        "step": 7,
        "tokenizer_sha256": tokenizer_sha256(text),
    } | meta
    tasks = {point.name: {"embodiment": spec.name, "returns": None, "max_steps": 40}}
    config = Config.from_name("debug", **(model or {}))
    return save_checkpoint(path, GatoModel(config), text, {spec.name: spec}, tasks, meta)


def _demos(root: Path, count: int = 4, steps: int = 30, spec_json: str | None = None) -> Path:
    """``count`` expert demos of the 3-link arm saved as plain .npz and brought in with `data convert`."""
    task = get_task("arm3-reach")
    npz = root / "npz"
    npz.mkdir(parents=True)
    for i in range(count):
        e = task.rollout(500 + i, "expert", render=False, max_steps=steps)
        arrays = {f"obs.{k}": v for k, v in e.observations.items()}
        np.savez(npz / f"demo_{i}.npz", **arrays, actions=e.actions, rewards=e.rewards)
    spec = root / "my_arm.json"
    spec.write_text(spec_json or ARM3.to_json())
    convert_npz(npz, spec, root / "demos", task="arm3-reach")
    return root / "demos"


def test_a_spec_that_does_not_match_the_demos_is_named(tmp_path: Path) -> None:
    demos = _demos(tmp_path, count=2, steps=5)
    data = json.loads(ARM3.to_json())
    data["observations"]["wrist_force"] = {"kind": "proprio", "shape": [3]}
    del data["observations"]["velocity"]
    (tmp_path / "other.json").write_text(json.dumps(data))
    with pytest.raises(FinetuneError) as error:
        load_demos(demos, spec_file=tmp_path / "other.json")
    message = str(error.value)
    assert "missing from the demos: ['wrist_force']" in message and "not in the spec: ['velocity']" in message
    assert "obs.velocity: missing key" in message or "velocity" in message


def test_nan_in_a_demo_is_named_with_its_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Demos edited on disk after `data convert` (whose writer refuses NaN) are checked again."""
    task = get_task("arm3-reach")
    monkeypatch.setattr(Episode, "check", lambda self, spec: None)  # let the bad demo reach the shard
    writer = TaskShardWriter(tmp_path, "arm3-reach", ARM3, 4)
    for i in range(3):
        e = task.rollout(i, "expert", render=False, max_steps=5)
        if i == 1:
            e.observations["velocity"][3, 2] = np.nan
        writer.add(e)
    writer.flush()
    entry = {"embodiment": "arm3", "spec": "arm3-reach/embodiment.json", "episodes": 3, "timesteps": 15,
             "success_rate": 0.0, "max_steps": 5, "returns": None, "shards": [vars(s) for s in writer.shards]}  # fmt: skip
    write_index(tmp_path, {"arm3-reach": entry})
    monkeypatch.undo()
    with pytest.raises(
        FinetuneError, match=r"demo 'arm3-reach-000001': obs.velocity: non-finite value.*\(3, 2\)"
    ):
        load_demos(tmp_path)


def test_too_few_demos_to_hold_one_out(tmp_path: Path) -> None:
    demos = _demos(tmp_path, count=1, steps=5)
    with pytest.raises(FinetuneError, match="1 demo\\(s\\); at least 2 are needed"):
        load_demos(demos)
    more = _demos(tmp_path / "more", count=3, steps=5)
    with pytest.raises(FinetuneError, match="holdout: expected 1 to 2"):
        load_demos(more, holdout=3)


def test_a_base_whose_tokenizer_differs_is_refused_before_training(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", tokenizer_sha256="0" * 64)
    demos = _demos(tmp_path, count=2, steps=5)
    with pytest.raises(FinetuneError, match=r"tokenizer/text.model has sha256 .* trained with the tokenizer"):
        finetune(base, demos, tmp_path / "run", FinetuneConfig(max_steps=2), progress=False)
    assert not (tmp_path / "run").exists()  # nothing started
    # the command line says it in one line, exit code 2
    code = main(["finetune", "--from", str(base), "--data", str(demos), "--out", str(tmp_path / "run")])
    assert code == 2


@pytest.mark.parametrize(("max_steps", "steps_run", "early"), [(24, 12, True), (12, 12, False)])
def test_early_stopping_is_reported_only_when_it_ended_the_run(
    tmp_path: Path, max_steps: int, steps_run: int, early: bool
) -> None:
    """Weights that cannot move (lr 1e-30: below float32's resolution) never improve the held-out
    loss: with patience 1 the second validation (step 12) ends the run, which is early only when
    the step budget was larger."""
    base = _base(tmp_path / "base")
    demos = _demos(tmp_path, count=3, steps=10)
    config = FinetuneConfig(mode="head", lr=1e-30, max_steps=max_steps, val_every=6, patience=1, batch_size=2)
    finetune(base, demos, tmp_path / "run", config, progress=False)
    info = json.loads((tmp_path / "run" / "finetune.json").read_text())
    assert (info["steps_run"], info["early_stopped"]) == (steps_run, early)


def test_an_embodiment_name_the_base_uses_differently(tmp_path: Path) -> None:
    point = without_images(get_task("dmc-point_mass-easy").spec)
    base = _base(tmp_path / "base")
    clash = json.loads(ARM3.to_json()) | {"name": point.name}
    demos = _demos(tmp_path, count=2, steps=5, spec_json=json.dumps(clash))
    with pytest.raises(FinetuneError, match="already has an embodiment named 'point_mass'"):
        load_demos(demos, base_specs={point.name: point})
    with pytest.raises(FinetuneError, match="mode: expected one of"):
        finetune(base, demos, tmp_path / "run", FinetuneConfig(mode="adapters"), progress=False)  # type: ignore[arg-type]


# -- end to end ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "backbone"), [("lora", "decoder"), ("head", "decoder"), ("lora", "pooled")])
def test_finetune_learns_the_new_body_and_exports_a_base_format_checkpoint(tmp_path: Path, mode: str, backbone: str) -> None:  # fmt: skip
    """LoRA and head fine-tuning on 4 demos of a body the base never saw; ``pooled``: with the CPU
    recipes' settings (two-step windows, masked action inputs)."""
    model = {"backbone": "pooled", **ACTING} if backbone == "pooled" else None
    base = _base(tmp_path / "base", model)
    demos = _demos(tmp_path, count=5, steps=30)
    batch = 4 if model is None else 64  # two-step windows: 6 action targets each, not a full context's ~90
    config = FinetuneConfig(mode=mode, max_steps=24, val_every=6, patience=10, batch_size=batch, lr=3e-3)  # type: ignore[arg-type]
    checkpoint = finetune(
        base, demos, tmp_path / "run", config, progress=False, command="gato-like finetune ..."
    )
    info = json.loads((tmp_path / "run" / "finetune.json").read_text())
    assert info["mode"] == mode and info["demos"] == 4 and info["held_out"] == 1
    assert info["base"] == str(base) and info["base_step"] == 7 and len(info["demo_keys"]) == 4
    losses = [loss for _, loss in info["validation"]]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert info["best_held_out_policy_loss"] == min(losses) < losses[0]  # it learns the new body
    loaded = load_checkpoint(checkpoint)
    base_state = load_checkpoint(base).model.state_dict()
    assert set(loaded.model.state_dict()) == set(base_state)  # LoRA merged: the base's format
    assert {"arm3", "point_mass"} == set(loaded.specs) and loaded.tasks["arm3-reach"]["episodes"] == 5
    frozen = "blocks.0.qkv.weight" if mode == "head" else "tokens.weight"
    torch.testing.assert_close(loaded.model.state_dict()[frozen], base_state[frozen])
    changed = "blocks.0.qkv.weight" if mode == "lora" else "tokens.weight"
    assert not torch.equal(loaded.model.state_dict()[changed], base_state[changed])
    assert (tmp_path / "run" / "losses.png").is_file()
    # the runtime agent acts on the new body, prompted with a demo
    policy = Policy.from_checkpoint(checkpoint)
    e = get_task("arm3-reach").rollout(9, "expert", render=False, max_steps=3)
    policy.reset("arm3-reach", prompt=(e.observations, e.actions))
    action = policy.act({k: v[0] for k, v in e.observations.items()})
    assert action.shape == (3,) and np.all(np.abs(action) <= 1.0)


def test_finetune_cli_then_eval_with_a_demo_prompt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = _base(tmp_path / "base")
    demos = _demos(tmp_path, count=3, steps=20)
    run = tmp_path / "run"
    args = ["finetune", "--from", str(base), "--data", str(demos), "--out", str(run), "--max_steps", "6", "--val-every", "3"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "fine-tuned lora on 2 demos of arm3-reach (1 held out)" in out
    # captured output is no terminal: plain progress lines, the first step's and the last
    lines = [line for line in out.splitlines() if line.startswith("[finetune] ")]
    assert lines[0].startswith("[finetune] step 1/6") and lines[-1].endswith("(done)")
    assert main(["eval", "--ckpt", str(run / "checkpoint"), "--tasks", "arm3-reach", "--episodes", "1",
                 "--max_steps", "10", "--prompt", str(demos)]) == 0  # fmt: skip
    summary = json.loads((run / "eval" / "eval.json").read_text())
    result = summary["tasks"]["arm3-reach"]
    assert result["prompted"] and result["normalizers"]["random_measured_here"]
    # 10 steps is not the demos' 20: both normalizers are measured at the evaluated length
    assert result["normalizers"]["expert_measured_here"] and result["max_steps"] == 10
    assert (
        result["normalizers"]["random"]["episodes"] == 1 and result["normalizers"]["expert"]["episodes"] == 1
    )
    card = (run / "eval" / "model_card.md").read_text()
    assert "## Fine-tuning" in card and str(base) in card and "| mode | lora |" in card


def test_goal_demos_train_and_select_by_the_goal_head(tmp_path: Path) -> None:
    """Goal-reaching demos: the goal head trains every step and the kept weights follow its loss
    on the held-out demos, each demo's last observation as the goal."""
    from gato_like.data_pipelines.generate import generate

    base = _base(tmp_path / "base")
    data = tmp_path / "goals"
    generate(data, tasks=["dmc-point_mass-goals"], episodes=4, max_steps=30, normalizer_episodes=1,
             workers=1, progress=False, pixels=False)  # fmt: skip
    with pytest.raises(FinetuneError, match="monitor: expected 'policy' or 'goal'"):
        finetune(base, data, tmp_path / "bad", FinetuneConfig(monitor="value"), progress=False)  # type: ignore[arg-type]
    with pytest.raises(FinetuneError, match="goal_every 0 never trains"):
        finetune(base, data, tmp_path / "bad", FinetuneConfig(monitor="goal", goal_every=0), progress=False)
    config = FinetuneConfig(goal_every=1, monitor="goal", max_steps=16, val_every=4, patience=10, batch_size=4, lr=3e-3)  # fmt: skip
    checkpoint = finetune(base, data, tmp_path / "run", config, progress=False)
    info = json.loads((tmp_path / "run" / "finetune.json").read_text())
    losses = [loss for _, loss in info["validation"]]
    assert info["monitor"] == "goal" and len(losses) == 4 and all(np.isfinite(losses))
    assert info["best_held_out_goal_loss"] == min(losses) < losses[0]
    assert "best_held_out_policy_loss" not in info
    policy = Policy.from_checkpoint(checkpoint)
    episode = get_task("dmc-point_mass-goals").rollout(5, "expert", render=False, max_steps=3)
    policy.reset("dmc-point_mass-goals", goal={k: v[-1] for k, v in episode.observations.items()})
    assert policy.act({k: v[0] for k, v in episode.observations.items()}).shape == (2,)
