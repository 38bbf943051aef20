"""Checkpoints: one directory, no pickle.

::

    CKPT/model.safetensors          weights (safetensors)
    CKPT/config.json                the model Config
    CKPT/tokenizer/text.model       the SentencePiece model (its size V fixes every id range)
    CKPT/embodiments/<name>.json    the embodiment specs the model knows
    CKPT/tasks.json                 task -> embodiment, instruction, return normalizers (optional)
    CKPT/meta.json                  anything else (training step, data, scores)

Written into a temporary sibling directory and renamed into place, so a crash never leaves a
half-written checkpoint under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from gato_like.config import CONFIG_FILE, Config
from gato_like.model import GatoModel
from gato_like.tokenizers import EmbodimentSpec, TextTokenizer

WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer/text.model"


class CheckpointError(ValueError):
    """A directory that is not a usable checkpoint; the message says what is missing or wrong."""


@dataclass
class Checkpoint:
    model: GatoModel
    text: TextTokenizer
    specs: dict[str, EmbodimentSpec]
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def spec_for(self, task_or_embodiment: str) -> EmbodimentSpec:
        name = self.tasks.get(task_or_embodiment, {}).get("embodiment", task_or_embodiment)
        if name not in self.specs:
            known = sorted(set(self.specs) | set(self.tasks))
            raise KeyError(
                f"the checkpoint knows no task or embodiment {task_or_embodiment!r} (known: {known})"
            )
        return self.specs[name]


def tokenizer_sha256(text: TextTokenizer) -> str:
    """The sha256 of a text model's bytes, recorded in ``meta.json`` so a later fine-tune can
    refuse a checkpoint whose ``tokenizer/text.model`` was swapped after training."""
    return hashlib.sha256(text.model_proto).hexdigest()


def save_checkpoint(
    directory: str | Path,
    model: GatoModel,
    text: TextTokenizer,
    specs: dict[str, EmbodimentSpec],
    tasks: dict[str, dict[str, Any]] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (replacing an existing one)."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "embodiments").mkdir(parents=True)
        (tmp / "tokenizer").mkdir()
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "gato-like"})
        model.config.save(tmp / CONFIG_FILE)
        (tmp / TOKENIZER_FILE).write_bytes(text.model_proto)
        for name, spec in specs.items():
            (tmp / "embodiments" / f"{name}.json").write_text(spec.to_json())
        (tmp / "tasks.json").write_text(json.dumps(tasks or {}, indent=2, sort_keys=True) + "\n")
        (tmp / "meta.json").write_text(json.dumps(meta or {}, indent=2, sort_keys=True) + "\n")
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


#: Parameter prefixes only one timestep representation (``Config.backbone``) has.
_BACKBONE_WEIGHTS = {"perceiver": ("latents", "cross."), "pooled": ("pool.",)}


def _representation_hint(config: Config, missing: list[str], unexpected: list[str]) -> str:
    """``: the weights are of backbone X ...`` when the mismatch is the timestep representation."""
    for backbone, prefixes in _BACKBONE_WEIGHTS.items():
        if backbone != config.backbone and any(k.startswith(prefixes) for k in unexpected):
            return (f": the weights are of backbone {backbone!r} but config.json says backbone "
                    f"{config.backbone!r} (the timestep representation must be the one trained)")  # fmt: skip
    if config.backbone in _BACKBONE_WEIGHTS and any(k.startswith(_BACKBONE_WEIGHTS[config.backbone]) for k in missing):  # fmt: skip
        return (f": config.json says backbone {config.backbone!r} but the weights have none of its "
                f"parameters (the timestep representation must be the one trained)")  # fmt: skip
    return ""


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint directory (weights through safetensors; nothing is unpickled)."""
    directory = Path(directory)
    for required in (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE):
        if not (directory / required).is_file():
            raise CheckpointError(f"{directory}: not a gato-like checkpoint (no {required})")
    config = Config.from_file(directory / CONFIG_FILE)
    text = TextTokenizer(directory / TOKENIZER_FILE)
    if text.vocab_size != config.text_vocab_size:
        raise CheckpointError(
            f"{directory}: tokenizer has {text.vocab_size} pieces but the config expects "
            f"text_vocab_size={config.text_vocab_size}"
        )
    model = GatoModel(config)
    state = load_file(str(directory / WEIGHTS_FILE), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{directory}: weights do not fit the config{_representation_hint(config, missing, unexpected)} "
            f"(missing {missing}, unexpected {unexpected})"
        )
    model.to(device).eval()
    specs = {p.stem: EmbodimentSpec.from_file(p) for p in sorted((directory / "embodiments").glob("*.json"))}
    tasks = json.loads((directory / "tasks.json").read_text()) if (directory / "tasks.json").is_file() else {}
    meta = json.loads((directory / "meta.json").read_text()) if (directory / "meta.json").is_file() else {}
    return Checkpoint(model, text, specs, tasks, meta)
