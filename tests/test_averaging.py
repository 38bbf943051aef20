"""The moving average of the weights (``ema_decay``): its arithmetic step by step, that a run
exports and scores the average rather than the raw weights, and that a bad decay is refused
before any work."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from gato_like.config import Config
from gato_like.model import GatoModel
from gato_like.training.averaging import EMAWeights, exported_model


def _step(callback: EMAWeights, module: Any, step: int) -> None:
    trainer = SimpleNamespace(global_step=step, callbacks=[callback])
    callback.on_train_batch_end(trainer, module, None, None, step - 1)  # type: ignore[arg-type]


def test_average_follows_the_warmed_up_decay() -> None:
    torch.manual_seed(0)
    model = GatoModel(Config.from_name("debug", backbone="pooled"))
    module = SimpleNamespace(model=model)
    callback = EMAWeights(0.9)
    callback.setup(SimpleNamespace(strategy=object()), module, "fit")  # type: ignore[arg-type]
    name, param = next(iter(model.named_parameters()))
    expected = None
    for step in range(1, 7):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        _step(callback, module, step)
        _step(callback, module, step)  # a second call within one optimizer step changes nothing
        now = param.detach().clone()
        if expected is None:
            expected = now  # the first update copies the weights
        else:
            n = step - 1  # updates before this one
            decay = min(0.9, (1 + n) / (10 + n))  # 2/11, 3/12, 4/13, ... then 0.9
            expected = decay * expected + (1 - decay) * now
        averaged = dict(callback.model().named_parameters())[name]
        torch.testing.assert_close(averaged, expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(averaged, param)  # the average is not the raw weights
    trainer = SimpleNamespace(callbacks=[callback])
    assert exported_model(trainer, module) is callback.model()  # type: ignore[arg-type]
    assert exported_model(SimpleNamespace(callbacks=[]), module) is model  # type: ignore[arg-type]


def test_run_exports_the_average(smoke_dataset: Path, tmp_path: Path) -> None:
    from gato_like.training.train import train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(smoke_dataset, tmp_path / "run", preset="debug", max_steps=6, batch_size=2, lr=3e-3,
              warmup_steps=1, val_every=100, workers=0, rollout_episodes=0, progress=False,
              ema_decay=0.5)  # fmt: skip
    exported = load_file(tmp_path / "run" / "checkpoint" / "model.safetensors")
    state = torch.load(tmp_path / "run" / "lightning" / "last.ckpt", weights_only=True)
    raw = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}
    (average,) = [v["average"] for k, v in state["callbacks"].items() if k.startswith("EMAWeights")]
    assert int(average["n_averaged"]) == 6
    differ = 0
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, average[f"module.{name}"], msg=name)  # the average went out
        differ += int(not torch.equal(tensor, raw[name]))
    assert differ > len(exported) // 2  # ... and it is not the raw weights the optimizer trained


@pytest.mark.parametrize("decay", [1.0, -0.1])
def test_bad_decay_is_refused_before_any_work(smoke_dataset: Path, tmp_path: Path, decay: float) -> None:
    from gato_like.training.train import train

    with pytest.raises(ValueError, match=r"ema_decay: expected a decay per step in \[0, 1\)"):
        train(smoke_dataset, tmp_path / "run", preset="debug", max_steps=2, ema_decay=decay, progress=False)
    assert not (tmp_path / "run").exists()


def test_a_sharded_run_is_refused_with_the_option_named() -> None:
    class FSDPStrategy:  # stands in for Lightning's: the callback reads the strategy's kind
        pass

    module = SimpleNamespace(model=GatoModel(Config.from_name("debug")))
    with pytest.raises(ValueError, match=r"ema_decay: .*sharded \(FSDP\).*--ema_decay 0"):
        EMAWeights(0.999).setup(SimpleNamespace(strategy=FSDPStrategy()), module, "fit")  # type: ignore[arg-type]
