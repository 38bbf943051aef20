"""Shared fixtures: one small generated dataset per test session (real simulators, short episodes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")

SMOKE = {"suite": "smoke", "episodes": 4, "max_steps": 40, "normalizer_episodes": 2, "episodes_per_shard": 2}


@pytest.fixture(scope="session")
def smoke_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """point mass (pixels + proprio), BabyAI (text + discrete) and captions (image + text)."""
    from gato_like.data_pipelines.generate import generate

    root = tmp_path_factory.mktemp("smoke")
    generate(root, workers=2, progress=False, **SMOKE)
    return root
