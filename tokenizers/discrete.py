"""Discrete values (button presses, grid actions, symbolic observations) to ids.

Integers in ``[0, num_values)``, flattened row-major, shifted into the discrete id range
``[vocab_offset, vocab_offset + num_values)`` (``[V + 1024, V + 2048)`` in the default layout).
"""

from __future__ import annotations

import operator

import numpy as np

from gato_like.tokenizers._checks import as_ids
from gato_like.tokenizers.vocab import DISCRETE_VALUES, GATO_TEXT_VOCAB_SIZE, VocabLayout


class DiscreteTokenizer:
    """Integers in ``[0, num_values)`` to ids ``[vocab_offset, vocab_offset + num_values)``.

    Only integer (or bool) arrays are accepted: a float array is an error, never rounded.
    """

    def __init__(
        self,
        vocab_offset: int = VocabLayout(GATO_TEXT_VOCAB_SIZE).discrete_offset,
        num_values: int = DISCRETE_VALUES,
    ) -> None:
        if operator.index(vocab_offset) < 0 or operator.index(num_values) < 1:
            raise ValueError(
                f"expected vocab_offset >= 0 and num_values >= 1, got {vocab_offset}, {num_values}"
            )
        self.vocab_offset = int(vocab_offset)
        self.num_values = int(num_values)

    def __repr__(self) -> str:
        return f"DiscreteTokenizer(vocab_offset={self.vocab_offset}, num_values={self.num_values})"

    def encode(self, values: np.ndarray) -> np.ndarray:
        """Integers of any shape ``(...)`` to ids of shape ``(prod(...),)``, int64."""
        array = as_ids(values).reshape(-1)
        if array.dtype.kind not in "biu":
            raise TypeError(f"DiscreteTokenizer.encode: expected an integer array, got dtype {array.dtype}")
        bad = (array < 0) | (array >= self.num_values)  # compared before any cast: no wrap-around
        if bad.any():
            index = int(np.argmax(bad))
            raise ValueError(
                f"DiscreteTokenizer.encode: expected values in [0, {self.num_values}), "
                f"got {array[index]} at flat index {index}"
            )
        return array.astype(np.int64) + self.vocab_offset

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Ids of any shape to the integer values, same shape, int64."""
        ids = as_ids(ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"DiscreteTokenizer.decode: expected integer ids, got dtype {ids.dtype}")
        values = ids.astype(np.int64) - self.vocab_offset
        bad = (values < 0) | (values >= self.num_values)
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"DiscreteTokenizer.decode: expected ids in [{self.vocab_offset}, "
                f"{self.vocab_offset + self.num_values}), got {int(ids[index])} at index {index}"
            )
        return values
