"""The id layout of the one token vocabulary: every number of the token scheme, in one place.

Gato (Reed et al., 2022, section 2.1) puts text ids in ``[0, 32000)`` and continuous/discrete
values in ``[32000, 33024)``. We keep text and continuous exactly as the paper and give discrete
values a range of their own, so the model can tell a grid action ``3`` from a joint angle bin ``3``::

    TEXT         [0, V)                 SentencePiece ids; V = text vocabulary size
    CONTINUOUS   [V, V + 1024)          mu-law (mu=100, M=256), clipped, 1024 uniform bins
    DISCRETE     [V + 1024, V + 2048)   integer values 0..1023 (button presses, grid actions)
    SEPARATOR    V + 2048               between a timestep's observation and its action
    PAD          V + 2049               batch padding; never attended to, never a target
    IMAGE_PATCH  V + 2050               placeholder id at image-patch positions (the patch itself
                                        travels beside the ids and is embedded by the image encoder)
    total        V + 2051
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

#: Gato's text vocabulary size (used by the ``gato-*`` presets).
GATO_TEXT_VOCAB_SIZE = 32000
#: mu-law parameters of the paper.
MU = 100.0
M = 256.0
#: Uniform bins for continuous values.
CONTINUOUS_BINS = 1024
#: Number of distinct discrete values (ids ``[V + 1024, V + 2048)``).
DISCRETE_VALUES = 1024
#: Side of the square, non-overlapping image patches.
PATCH_SIZE = 16
#: Pixels are scaled to [-1, 1] and then divided by this (sqrt(PATCH_SIZE)).
PATCH_PIXEL_DIVISOR = 4.0
#: Resolution of the quantized patch row/column intervals for the within-image position encoding.
PATCH_POSITION_RESOLUTION = 128


class TokenType(enum.IntEnum):
    """What a position of the sequence holds; stored as ``int8`` beside the ids."""

    TEXT = 0
    IMAGE = 1
    CONTINUOUS = 2  #: continuous observation (proprioception)
    DISCRETE = 3  #: discrete observation
    SEPARATOR = 4
    ACTION = 5  #: an action token (continuous or discrete id range)
    PAD = 6


@dataclass(frozen=True)
class VocabLayout:
    """Id ranges for a text vocabulary of ``text_size`` pieces (the table in the module docstring)."""

    text_size: int = GATO_TEXT_VOCAB_SIZE
    continuous_bins: int = CONTINUOUS_BINS
    discrete_values: int = DISCRETE_VALUES

    def __post_init__(self) -> None:
        for name in ("text_size", "continuous_bins", "discrete_values"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"VocabLayout.{name}: expected a positive int, got {value!r}")
            object.__setattr__(self, name, int(value))

    @property
    def continuous_offset(self) -> int:
        return self.text_size

    @property
    def discrete_offset(self) -> int:
        return self.text_size + self.continuous_bins

    @property
    def separator_id(self) -> int:
        return self.discrete_offset + self.discrete_values

    @property
    def pad_id(self) -> int:
        return self.separator_id + 1

    @property
    def image_patch_id(self) -> int:
        return self.separator_id + 2

    @property
    def size(self) -> int:
        """Rows of the embedding table: every id of the layout."""
        return self.separator_id + 3

    def ranges(self) -> dict[str, tuple[int, int]]:
        """Half-open ``[start, stop)`` range of every id group, for tables and checks."""
        return {
            "text": (0, self.text_size),
            "continuous": (self.continuous_offset, self.continuous_offset + self.continuous_bins),
            "discrete": (self.discrete_offset, self.discrete_offset + self.discrete_values),
            "separator": (self.separator_id, self.separator_id + 1),
            "pad": (self.pad_id, self.pad_id + 1),
            "image_patch": (self.image_patch_id, self.image_patch_id + 1),
        }

    def action_range(self, kind: str, num_choices: int | None = None) -> tuple[int, int]:
        """Ids ``[low, high)`` of an action token: every continuous bin (``kind="continuous"``),
        or the discrete ids of choices ``0 .. num_choices - 1``."""
        if kind == "continuous":
            return self.continuous_offset, self.continuous_offset + self.continuous_bins
        if kind != "discrete" or num_choices is None or not 0 < num_choices <= self.discrete_values:
            raise ValueError(
                f"action_range: expected kind 'continuous', or 'discrete' with 1..{self.discrete_values} "
                f"choices; got kind {kind!r} with {num_choices!r} choices"
            )
        return self.discrete_offset, self.discrete_offset + num_choices


def bin_centres(bins: int = CONTINUOUS_BINS) -> np.ndarray:
    """Centres ``(bins,)`` of the uniform bins on [-1, 1] (companded space): ``-1 + (2 b + 1) / bins``."""
    return -1.0 + (2.0 * np.arange(bins, dtype=np.float64) + 1.0) / bins


def bin_of(values: np.ndarray, bins: int = CONTINUOUS_BINS) -> np.ndarray:
    """The uniform bin of values in [-1, 1] (companded space), ``min(floor((y + 1) / 2 bins), bins - 1)``."""
    index = np.floor((np.clip(np.asarray(values, np.float64), -1.0, 1.0) + 1.0) / 2.0 * bins).astype(np.int64)
    return np.minimum(index, bins - 1)
