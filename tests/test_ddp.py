"""Scale-out without code changes: the same ``train()`` under Lightning's DDP with 2 CPU
processes (gloo). Each rank must see its own data and both must end with identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import load_file

DRIVER = """
    import hashlib, json, sys
    import lightning as L
    from safetensors.torch import save_file
    from gato_like.training.train import train

    class Record(L.Callback):
        def __init__(self):
            self.batches = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            digest = hashlib.sha256(batch["ids"].numpy().tobytes()).hexdigest()
            self.batches.append({"digest": digest, "episodes": batch["episode"]})

        def on_train_end(self, trainer, module):
            out = sys.argv[2]
            rank = trainer.global_rank
            state = {k: v.detach().cpu().contiguous() for k, v in module.model.state_dict().items()}
            save_file(state, f"{out}/rank{rank}.safetensors")
            with open(f"{out}/rank{rank}.json", "w") as f:
                json.dump({"world_size": trainer.world_size, "batches": self.batches}, f)

    if __name__ == "__main__":
        train(sys.argv[1], sys.argv[2] + "/run", preset="debug", max_steps=6, batch_size=2,
              context_length=256, warmup_steps=2, val_every=3, val_batches=1, workers=1,
              devices=2, accelerator="cpu", strategy="ddp", progress=False, callbacks=[Record()])
"""


def test_ddp_two_cpu_processes_split_data_and_agree_on_weights(smoke_dataset: Path, tmp_path: Path) -> None:
    driver = tmp_path / "ddp.py"
    driver.write_text(textwrap.dedent(DRIVER))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(driver), str(smoke_dataset), str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=400)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert [len(r["batches"]) for r in records] == [6, 6]
    digests = [{b["digest"] for b in r["batches"]} for r in records]
    assert not digests[0] & digests[1], "the two ranks trained on identical batches"
    episodes = [sorted({e for b in r["batches"] for e in b["episodes"]}) for r in records]
    assert episodes[0] != episodes[1]

    weights = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    initial = load_file(tmp_path / "run" / "checkpoint" / "model.safetensors")  # rank 0's export
    assert all(torch.equal(initial[n], weights[0][n]) for n in initial)
    assert json.loads((tmp_path / "run" / "checkpoint" / "meta.json").read_text())["step"] == 6


class _ClipRecorder:
    """Stands in for the FSDP-wrapped module: records the norm it is asked to clip to."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def clip_grad_norm_(self, max_norm: float) -> None:
        self.calls.append(max_norm)


def _module_with_grads() -> tuple[Any, torch.optim.Optimizer]:
    from gato_like.config import Config
    from gato_like.training.module import GatoLightning

    module = GatoLightning(Config.from_name("debug", n_layer=1))
    for parameter in module.parameters():
        parameter.grad = torch.full_like(parameter, 10.0)
    return module, torch.optim.SGD(module.parameters(), lr=0.1)


def test_fsdp_clips_by_norm_through_the_fsdp_module() -> None:
    """Lightning's FSDP precision plugin refuses clipping by norm (it raised on an H200 with
    ``--strategy fsdp``); the module hands the norm to the FSDP wrapper's ``clip_grad_norm_``."""
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.strategies import FSDPStrategy

    module, optimizer = _module_with_grads()
    wrapper = _ClipRecorder()
    module.trainer = SimpleNamespace(  # type: ignore[assignment]
        strategy=FSDPStrategy(),
        model=wrapper,
        precision_plugin=Precision(),
        gradient_clip_val=None,
        gradient_clip_algorithm=None,
    )
    module.configure_gradient_clipping(optimizer, 1.0, "norm")
    assert wrapper.calls == [1.0]
    module.configure_gradient_clipping(optimizer, None, None)  # no clip value: nothing clipped
    assert wrapper.calls == [1.0]
    assert all(bool((p.grad == 10.0).all()) for p in module.parameters())


def test_single_device_still_clips_the_total_norm() -> None:
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.strategies import SingleDeviceStrategy

    module, optimizer = _module_with_grads()
    module.trainer = SimpleNamespace(  # type: ignore[assignment]
        strategy=SingleDeviceStrategy("cpu"),
        precision_plugin=Precision(),
        gradient_clip_val=1.0,
        gradient_clip_algorithm=None,
    )
    module.configure_gradient_clipping(optimizer, 1.0, "norm")
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters()]))
    assert abs(float(total) - 1.0) < 1e-4
