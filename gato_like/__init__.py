"""gato-like: a Gato-style generalist agent.

One transformer, one token sequence, many embodiments. The token scheme lives in
:mod:`gato_like.tokenizers`, episodes in :mod:`gato_like.data_pipelines`, the training loop in
:mod:`gato_like.training`, acting in :mod:`gato_like.acting` and the policy server in
:mod:`gato_like.serving`.

The public API at the top level::

    from gato_like import Policy, Config, GatoModel, EmbodimentSpec, PolicyClient

Names are imported on first use, so ``import gato_like`` (and the torch-free serving client)
does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Policy": "gato_like.policy",
    "ActingCore": "gato_like.acting",
    "Config": "gato_like.config",
    "GatoModel": "gato_like.model",
    "Checkpoint": "gato_like.checkpoint",
    "load_checkpoint": "gato_like.checkpoint",
    "save_checkpoint": "gato_like.checkpoint",
    "EmbodimentSpec": "gato_like.tokenizers",
    "SequenceBuilder": "gato_like.tokenizers",
    "PolicyClient": "gato_like.serving.client",
    "AsyncPolicyClient": "gato_like.serving.client",
}

__all__ = [
    "ActingCore",
    "AsyncPolicyClient",
    "Checkpoint",
    "Config",
    "EmbodimentSpec",
    "GatoModel",
    "Policy",
    "PolicyClient",
    "SequenceBuilder",
    "__version__",
    "load_checkpoint",
    "save_checkpoint",
]
assert set(__all__) == {"__version__", *_EXPORTS}

if TYPE_CHECKING:
    from gato_like.acting import ActingCore
    from gato_like.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from gato_like.config import Config
    from gato_like.model import GatoModel
    from gato_like.policy import Policy
    from gato_like.serving.client import AsyncPolicyClient, PolicyClient
    from gato_like.tokenizers import EmbodimentSpec, SequenceBuilder


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gato_like' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
