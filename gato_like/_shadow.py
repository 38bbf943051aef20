"""Hand the top-level name ``tokenizers`` back to Hugging Face's package.

In a source checkout, ``python -c ...`` or ``python -m ...`` run from the repository root puts the
root on ``sys.path``, so ``import tokenizers`` (as ``transformers`` and others do) would find our
``tokenizers/`` folder. Installed, our folder is ``gato_like.tokenizers`` and this never runs.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def hand_over(our_file: str) -> None:
    """Load the real ``tokenizers`` from ``sys.path`` minus our checkout root, in our module's place."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(our_file)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("tokenizers", path)
    if spec is None or spec.loader is None:
        del sys.modules["tokenizers"]
        raise ImportError(
            f"No module named 'tokenizers' (gato-like's source folder {root}/tokenizers is only importable as "
            "gato_like.tokenizers; Hugging Face's tokenizers is not installed)",
            name="tokenizers",
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules["tokenizers"] = module  # the import statement returns what sys.modules holds
    spec.loader.exec_module(module)
