"""Exact resume: a training process killed (SIGKILL, no clean-up) after its step-4 checkpoint and
resumed from ``OUT/lightning/last.ckpt`` repeats the uninterrupted run's losses step for step and
ends with the same weights, the moving average of the weights it exports included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

STEPS, EVERY, KILL_AT = 8, 4, 6
ARGS: dict[str, Any] = dict(preset="debug", max_steps=STEPS, batch_size=2, context_length=256, lr=1e-3,
                            warmup_steps=2, val_every=EVERY, val_batches=1, workers=1, progress=False,
                            model={"dropout": 0.1}, ema_decay=0.9)  # fmt: skip


class Losses(L.Callback):
    """Training loss per optimizer step."""

    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, *args: Any) -> None:
        self.by_step[trainer.global_step] = float(outputs["loss"])


def _train(data: Path, out: Path, **extra: Any) -> dict[int, float]:
    from gato_like.training.train import train

    losses = Losses()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(data, out, **ARGS, callbacks=[losses], **extra)
    return losses.by_step


def test_killed_run_resumes_exactly(smoke_dataset: Path, tmp_path: Path) -> None:
    reference = _train(smoke_dataset, tmp_path / "reference")
    assert sorted(reference) == list(range(1, STEPS + 1))

    # the same run in its own process, killed hard after the step-4 checkpoint went to disk
    driver = tmp_path / "killed.py"
    driver.write_text(
        textwrap.dedent(f"""
        import json, os, signal, sys
        import lightning as L
        from gato_like.training.train import train

        class Kill(L.Callback):
            def on_train_batch_end(self, trainer, module, outputs, *args):
                with open(sys.argv[2], "a") as log:
                    log.write(json.dumps([trainer.global_step, float(outputs["loss"])]) + "\\n")
                if trainer.global_step == {KILL_AT}:
                    os.kill(os.getpid(), signal.SIGKILL)

        if __name__ == "__main__":
            train(sys.argv[1], sys.argv[3], **{ARGS!r}, callbacks=[Kill()])
    """)
    )
    log, run = tmp_path / "killed.jsonl", tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(driver), str(smoke_dataset), str(log), str(run)], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == -9, result.stderr[-2000:]
    before = dict(json.loads(line) for line in log.read_text().splitlines())
    assert max(before) == KILL_AT and (run / "lightning" / "last.ckpt").is_file()
    assert json.loads((run / "checkpoint" / "meta.json").read_text())["step"] == EVERY

    after = _train(smoke_dataset, run, resume=True)
    assert sorted(after) == list(range(EVERY + 1, STEPS + 1))  # continues after the checkpoint
    for step in range(1, KILL_AT + 1):  # the killed process itself repeated the reference
        assert before[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-6), step
    for step in after:
        assert after[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-6), step

    resumed = load_file(run / "checkpoint" / "model.safetensors")
    uninterrupted = load_file(tmp_path / "reference" / "checkpoint" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert json.loads((run / "checkpoint" / "meta.json").read_text())["step"] == STEPS

    # the run's weights were trained with its own config: a changed model field is refused by name
    from gato_like.training.train import train

    changed = {**ARGS, "model": {"dropout": 0.1, "dynamics_target": "delta"}}
    with pytest.raises(
        ValueError,
        match=r"dynamics_target: 'absolute' there, 'delta' now; resume with --model.dynamics_target absolute",
    ):
        train(smoke_dataset, run, **changed, resume=True)


def test_resume_without_state_says_what_is_missing(smoke_dataset: Path, tmp_path: Path) -> None:
    from gato_like.training.train import train

    with pytest.raises(FileNotFoundError, match=r"no trainer state at .*last\.ckpt"):
        train(smoke_dataset, tmp_path / "fresh", **ARGS, resume=True)
