"""What one timestep costs the causal transformer, in backbone inputs, for each representation.

``context_length`` counts backbone inputs everywhere: the loader cuts training windows by this
cost and the acting core rolls its window by it, so a model acts over the timesteps it was
trained on. For Gato's ``decoder`` every token is an input; ``pooled`` timesteps fold each
non-empty observation group (text, image, values) into one input; the ``perceiver`` folds a
timestep's observation tokens into ``perceiver_latents`` latents. The separator and the action
tokens are inputs in all three. Torch-free: the loader and the data tools use it.
"""

from __future__ import annotations

import numpy as np

from gato_like.tokenizers.vocab import TokenType

#: Token type -> group of a timestep: text 0, image 1, values (continuous and discrete) 2, the
#: separator and actions 3, padding 4.
GROUP_OF_TYPE = (0, 1, 2, 2, 3, 3, 4)
POOLED_GROUPS = 3
"""Observation groups a ``pooled`` timestep folds into one token each (text, image, values)."""


def timestep_cost(backbone: str, latents: int, text: int, image: int, values: int, actions: int) -> int:
    """Backbone inputs of one timestep whose observation has ``text``, ``image`` and ``values``
    tokens; ``actions`` counts the separator and the action tokens."""
    observation = text + image + values
    if backbone == "decoder":
        return observation + actions
    if backbone == "pooled":
        return int(text > 0) + int(image > 0) + int(values > 0) + actions
    return (latents if observation else 0) + actions


def sequence_cost(backbone: str, latents: int, types: np.ndarray, timesteps: np.ndarray) -> int:
    """Backbone inputs of a token sequence of whole timesteps (e.g. a prompt): ``types`` and
    ``timesteps`` are its ``(L,)`` token types and timestep indices."""
    types = np.asarray(types)
    if backbone == "decoder":
        return len(types)
    folded = (types != TokenType.SEPARATOR) & (types != TokenType.ACTION) & (types != TokenType.PAD)
    kept = int(((types == TokenType.SEPARATOR) | (types == TokenType.ACTION)).sum())
    steps = np.asarray(timesteps)[folded].astype(np.int64)
    if backbone == "pooled":
        groups = np.asarray(GROUP_OF_TYPE)[types[folded].astype(np.int64)]
        return len(np.unique(steps * POOLED_GROUPS + groups)) + kept
    return latents * len(np.unique(steps)) + kept


def history_of(history_steps: int, discrete_history_steps: int, action_kind: str) -> int:
    """The most timesteps a window holds for a body whose action is ``action_kind``: the
    ``discrete_history_steps`` of a discrete body where set, else ``history_steps`` (0: no limit)."""
    if action_kind == "discrete" and discrete_history_steps:
        return discrete_history_steps
    return history_steps
